// Runs the CUDA launcher and kernel of kdext::top_p_sample
// (csrc/include/kdext/cuda/top_p_sample_launchers.cuh) on the CPU through the
// simulator in tests/cpp/cuda_sim/, for machines without a GPU. Driven by
// tests/test_top_p_sample.py::test_kernel_logic_simulated:
//
//   g++ -std=c++20 -O2 -ffp-contract=off -pthread -Itests/cpp/cuda_sim -Icsrc/include \
//       tests/cpp/sim_top_p_sample.cpp -o sim_top_p_sample
//   sim_top_p_sample IN OUT
//
// IN (little-endian): int64 rows, V, dtype (0 float32, 1 bfloat16, 2 float16),
// has_teacher, top_k, seed, offset, has_row_ids; float64 top_p, temperature,
// alpha; then the student rows, (if has_teacher) the teacher rows in that
// dtype, and (if has_row_ids) int64 row_ids[rows].
// OUT: int64 tokens[rows], then float32 student_logprob, teacher_logprob,
// sample_logprob, threshold, [rows] each.
#include <cuda_runtime.h>  // the simulator: this folder is first on the include path

#include <cstdio>
#include <fstream>
#include <vector>

#include "kdext/cuda/top_p_sample_launchers.cuh"

using kdext::cuda::DType;
using kdext::top_p_cuda::Params;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t hdr[8];
  double f[3];
  in.read(reinterpret_cast<char*>(hdr), sizeof(hdr));
  in.read(reinterpret_cast<char*>(f), sizeof(f));
  const int64_t rows = hdr[0], V = hdr[1], dtype = hdr[2], has_t = hdr[3], has_ids = hdr[7];
  const size_t elem = dtype == 0 ? 4 : 2;
  std::vector<char> s(rows * V * elem), t(has_t ? rows * V * elem : 0);
  in.read(s.data(), s.size());
  if (has_t) in.read(t.data(), t.size());
  std::vector<int64_t> ids(has_ids ? rows : 0);
  if (has_ids) in.read(reinterpret_cast<char*>(ids.data()), rows * sizeof(int64_t));
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  std::vector<int64_t> tokens(rows);
  std::vector<float> out(4 * rows);
  Params p{};
  p.s = s.data();
  p.t = has_t ? t.data() : nullptr;
  p.s_row_stride = p.t_row_stride = V;
  p.V = V;
  p.inv_t = static_cast<float>(1.0 / f[1]);
  p.alpha = static_cast<float>(f[2]);
  p.top_p = f[0];
  p.top_k = hdr[4];
  p.seed = static_cast<uint64_t>(hdr[5]);
  p.offset = static_cast<uint64_t>(hdr[6]);
  p.row_ids = has_ids ? ids.data() : nullptr;
  p.tokens = tokens.data();
  p.student_logprob = out.data();
  p.teacher_logprob = out.data() + rows;
  p.sample_logprob = out.data() + 2 * rows;
  p.threshold = out.data() + 3 * rows;
  const DType dt = dtype == 0 ? DType::Float32 : dtype == 1 ? DType::BFloat16 : DType::Float16;
  const kdext::cuda::Queue queue{nullptr, {}};  // (the launcher takes no temporaries)
  if (const cudaError_t err = kdext::cuda::top_p_sample(p, dt, rows, queue); err != cudaSuccess) {
    std::fprintf(stderr, "the launcher returned cudaError %d\n", int(err));
    return 1;
  }
  std::fprintf(stderr, "simulated %lld blocks, %ld barriers\n", static_cast<long long>(rows), cuda_sim::g.barriers);
  std::ofstream o(argv[2], std::ios::binary);
  o.write(reinterpret_cast<const char*>(tokens.data()), rows * sizeof(int64_t));
  o.write(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(float));
  return o ? 0 : 1;
}
