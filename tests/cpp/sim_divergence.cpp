// Runs the CUDA launchers and kernels of the divergence family
// (csrc/include/kdext/cuda/divergence_launchers.cuh) and of scale_
// (common_kernels.cuh) on the CPU through the simulator in tests/cpp/cuda_sim/,
// for machines without a GPU. Driven by tests/test_cuda_sim.py:
//
//   g++ -std=c++20 -O1 -ffp-contract=off -rdynamic -DKDEXT_CUDA_BLOCK_THREADS=64
//       -Itests/cpp/cuda_sim -Icsrc/include tests/cpp/sim_divergence.cpp -o sim_divergence
//   KDEXT_CUDA_CHUNKS=3 sim_divergence IN OUT      (the tuning knobs as on a GPU)
//
// IN (little-endian int64 / float64): the device (sms, cc major, opt-in shared
// memory bytes, cluster launch, max grid blocks), the number of jobs, then per job:
//   int64 op (0 forward, 1 backward, 2 loss, 3 partial, 4 scale), kind
//   (kdext::Divergence), rows, V, s_dtype, t_dtype (kdext::cuda::DType codes),
//   s_stride, t_stride, s_offset, t_offset (entries past a 16-byte boundary),
//   flags (backward: 1 student, 2 teacher; scale: 1 factor on the device);
//   float64 param, temperature;
//   s ((rows - 1) * s_stride + V entries), t (likewise; not for scale), then
//   backward: grad_values [rows] Acc, stats [rows, 4] Acc; loss: weights
//   [rows] Acc; partial: student_lse, teacher_lse [rows] Acc each;
//   scale: float64 factor (s is x, rows x V entries, contiguous: stride V).
// Acc is float64 for float64 inputs, else float32.
// OUT per job: int64 cudaError_t, then forward: values [rows], stats [rows, 4]
// (Acc); backward: grad_s (dtype of s) if asked, grad_t (dtype of t) if asked,
// [rows, V] each; loss: loss (one Acc), grad_s [rows, V]; partial: [rows, 3]
// Acc; scale: x [rows, V].
#include <cuda_runtime.h>  // the simulator: this folder is first on the include path

#include "kdext/cuda/common_kernels.cuh"
#include "kdext/cuda/divergence_launchers.cuh"
#include "sim_io.h"

using kdext::Divergence;
using kdext::cuda::DType;
using sim_io::Buffer;

namespace {

enum Op : int64_t { kForward = 0, kBackward = 1, kLoss = 2, kPartial = 3, kScale = 4 };

struct Job {
  int64_t op, kind, rows, V, s_dtype, t_dtype, s_stride, t_stride, s_offset, t_offset, flags;
  double param, temperature;
};

void run_job(sim_io::Reader& in, sim_io::Writer& out) {
  Job j;
  for (int64_t* f : {&j.op, &j.kind, &j.rows, &j.V, &j.s_dtype, &j.t_dtype, &j.s_stride, &j.t_stride, &j.s_offset,
                     &j.t_offset, &j.flags})
    *f = in.i64();
  j.param = in.f64();
  j.temperature = in.f64();
  const size_t es = sim_io::dtype_size(j.s_dtype), et = sim_io::dtype_size(j.t_dtype);
  const size_t acc = j.s_dtype == 3 ? 8 : 4;
  const size_t rows = size_t(j.rows), n = rows * size_t(j.V);
  auto s = sim_io::read_buffer(in, sim_io::strided_bytes(j.rows, j.V, j.s_stride, es), size_t(j.s_offset) * es);
  std::vector<std::unique_ptr<Buffer>> outputs;
  auto output = [&](size_t bytes) {
    outputs.push_back(sim_io::output_buffer(bytes));
    return outputs.back()->data();
  };
  sim_io::Pool pool;
  cudaError_t err;
  if (j.op == kScale) {
    const double factor = in.f64();
    auto dev_factor = std::make_unique<Buffer>(8, 0, 0);
    std::memcpy(dev_factor->data(), &factor, 8);
    err = kdext::cuda::scale_inplace(s->data(), DType(j.s_dtype), j.rows * j.V,
                                     (j.flags & 1) ? dev_factor->data() : nullptr, DType::Float64, factor, nullptr);
    out.i64(err);
    out.bytes(s->data(), n * es);
    s->check("x");
    return;
  }
  auto t = sim_io::read_buffer(in, sim_io::strided_bytes(j.rows, j.V, j.t_stride, et), size_t(j.t_offset) * et);
  const kdext::cuda::PairTensors pt{s->data(), DType(j.s_dtype), j.s_stride, t->data(), DType(j.t_dtype),
                                    j.t_stride,  j.rows,          j.V};
  const Divergence kind = Divergence(j.kind);
  std::vector<std::unique_ptr<Buffer>> extra;
  auto input = [&](size_t bytes) {
    extra.push_back(sim_io::read_buffer(in, bytes, 0));
    return extra.back()->data();
  };
  switch (j.op) {
    case kForward: {
      void* values = output(rows * acc);
      void* stats = output(rows * 4 * acc);
      err = kdext::cuda::divergence_forward(pt, kind, j.param, j.temperature, values, stats, pool.workspace(),
                                            nullptr);
      break;
    }
    case kBackward: {
      const void* gv = input(rows * acc);
      const void* stats = input(rows * 4 * acc);
      void* gs = (j.flags & 1) ? output(n * es) : nullptr;
      void* gt = (j.flags & 2) ? output(n * et) : nullptr;
      err = kdext::cuda::divergence_backward(pt, kind, j.param, j.temperature, gv, stats, gs, gt, nullptr);
      break;
    }
    case kLoss: {
      const void* w = input(rows * acc);
      void* loss = output(acc);
      void* gs = output(n * es);
      err = kdext::cuda::divergence_loss(pt, kind, j.param, j.temperature, w, loss, gs, pool.workspace(), nullptr);
      break;
    }
    case kPartial: {
      const void* ls = input(rows * acc);
      const void* lt = input(rows * acc);
      void* o = output(rows * 3 * acc);
      err = kdext::cuda::divergence_partial(pt, kind, j.param, j.temperature, ls, lt, o, pool.workspace(), nullptr);
      break;
    }
    default:
      sim_io::fail("bad op " + std::to_string(j.op));
  }
  out.i64(err);
  for (const auto& o : outputs) {
    out.bytes(o->data(), o->size());
    o->check("an output");
  }
  s->check("the student logits");
  t->check("the teacher logits");
  for (const auto& e : extra) e->check("an input");
  pool.check();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  sim_io::Reader in(argv[1]);
  sim_io::Writer out(argv[2]);
  sim_io::read_device(in);
  const int64_t jobs = in.i64();
  for (int64_t i = 0; i < jobs; ++i) run_job(in, out);
  std::fprintf(stderr, "cuda_sim: %ld launches, %ld blocks, %ld block barriers, %ld shuffles\n", cuda_sim::g.launches,
               cuda_sim::g.blocks_run, cuda_sim::g.barriers, cuda_sim::g.shuffles);
  return out.f ? 0 : 1;
}
