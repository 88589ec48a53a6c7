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

namespace {

enum Op : int64_t { kForward = 0, kBackward = 1, kLoss = 2, kPartial = 3, kScale = 4 };

struct Header {
  int64_t op, kind, rows, V, s_dtype, t_dtype, s_stride, t_stride, s_offset, t_offset, flags;
  double param, temperature;
};

cudaError_t scale(sim_io::Job& job, const Header& h) {
  const size_t es = sim_io::dtype_size(h.s_dtype);
  void* x = job.in_out(size_t(h.rows * h.V) * es);
  const void* dev_factor = job.input(8);
  double factor;
  std::memcpy(&factor, dev_factor, 8);
  return kdext::cuda::scale_inplace(x, DType(h.s_dtype), h.rows * h.V, (h.flags & 1) ? dev_factor : nullptr,
                                    DType::Float64, factor, job.queue());
}

cudaError_t pair_op(sim_io::Job& job, const Header& h) {
  const size_t es = sim_io::dtype_size(h.s_dtype), et = sim_io::dtype_size(h.t_dtype);
  const size_t acc = h.s_dtype == 3 ? 8 : 4;
  const size_t rows = size_t(h.rows), n = rows * size_t(h.V);
  const void* s = job.input(sim_io::strided_bytes(h.rows, h.V, h.s_stride, es), size_t(h.s_offset) * es);
  const void* t = job.input(sim_io::strided_bytes(h.rows, h.V, h.t_stride, et), size_t(h.t_offset) * et);
  const kdext::cuda::PairTensors pt{s, DType(h.s_dtype), h.s_stride, t, DType(h.t_dtype), h.t_stride, h.rows, h.V};
  const Divergence kind = Divergence(h.kind);
  switch (h.op) {
    case kForward: {
      void* values = job.output(rows * acc);
      void* stats = job.output(rows * 4 * acc);
      return kdext::cuda::divergence_forward(pt, kind, h.param, h.temperature, values, stats, job.queue());
    }
    case kBackward: {
      const void* gv = job.input(rows * acc);
      const void* stats = job.input(rows * 4 * acc);
      void* gs = (h.flags & 1) ? job.output(n * es) : nullptr;
      void* gt = (h.flags & 2) ? job.output(n * et) : nullptr;
      return kdext::cuda::divergence_backward(pt, kind, h.param, h.temperature, gv, stats, gs, gt, job.queue());
    }
    case kLoss: {
      const void* w = job.input(rows * acc);
      void* loss = job.output(acc);
      void* gs = job.output(n * es);
      return kdext::cuda::divergence_loss(pt, kind, h.param, h.temperature, w, loss, gs, job.queue());
    }
    case kPartial: {
      const void* ls = job.input(rows * acc);
      const void* lt = job.input(rows * acc);
      void* o = job.output(rows * 3 * acc);
      return kdext::cuda::divergence_partial(pt, kind, h.param, h.temperature, ls, lt, o, job.queue());
    }
  }
  sim_io::fail("bad op " + std::to_string(h.op));
}

void run_job(sim_io::Reader& in, sim_io::Writer& out) {
  Header h;
  for (int64_t* f : {&h.op, &h.kind, &h.rows, &h.V, &h.s_dtype, &h.t_dtype, &h.s_stride, &h.t_stride, &h.s_offset,
                     &h.t_offset, &h.flags})
    *f = in.i64();
  h.param = in.f64();
  h.temperature = in.f64();
  sim_io::Job job(in);
  const cudaError_t err = h.op == kScale ? scale(job, h) : pair_op(job, h);
  job.finish(out, err);
}

}  // namespace

int main(int argc, char** argv) { return sim_io::run_driver(argc, argv, run_job); }
