// Simulator stand-in (see cuda_sim.h) for cub::BlockScan::ExclusiveSum with a
// block aggregate: every thread gets the sum of the inputs of the threads
// before it, and the total.
#pragma once
namespace cub {
template <typename T, int BLOCK>
class BlockScan {
 public:
  struct TempStorage {
    T in[BLOCK];
  };
  explicit BlockScan(TempStorage& s) : s_(s) {}
  void ExclusiveSum(T input, T& output, T& aggregate) {
    const int t = static_cast<int>(threadIdx.x);
    s_.in[t] = input;
    __syncthreads();
    T acc = T(0), total = T(0);
    for (int i = 0; i < BLOCK; ++i) {
      if (i == t) acc = total;
      total += s_.in[i];
    }
    output = acc;
    aggregate = total;
    __syncthreads();
  }

 private:
  TempStorage& s_;
};
}  // namespace cub
