// Runs the CUDA launchers and kernels of the softmax family
// (csrc/include/kdext/cuda/softmax_launchers.cuh) and of logprobs
// (logprobs_launchers.cuh) on the CPU through the simulator in
// tests/cpp/cuda_sim/, for machines without a GPU. Driven by
// tests/test_cuda_sim.py; built and run as tests/cpp/sim_divergence.cpp is.
//
// IN (little-endian int64 / float64): the device (sms, cc major, opt-in shared
// memory bytes, cluster launch, max grid blocks), the number of jobs, then per job:
//   int64 op (0 softmax, 1 log_softmax, 2 softmax_backward, 3 logsumexp,
//   4 entropy_forward, 5 entropy_forward of a shard (given the lse),
//   6 entropy_backward, 7 logprobs_forward, 8 logprobs_backward,
//   9 lse_float64), rows, V, dtype (kdext::cuda::DType code), stride, offset
//   (entries past a 16-byte boundary), g_dtype (softmax_backward), flags
//   (softmax_backward: 1 = log); float64 temperature;
//   x ((rows - 1) * stride + V entries; for softmax_backward the output y),
//   then softmax_backward: grad_output [rows, V] contiguous in g_dtype;
//   entropy shard: lse [rows] float64; entropy_backward: grad, entropy [rows]
//   Acc, lse [rows] float64; logprobs_forward: tokens [rows] int64;
//   logprobs_backward: grad [rows] Acc, tokens [rows] int64, lse [rows] Acc.
// Acc is float64 for float64 inputs, else float32.
// OUT per job: int64 cudaError_t, then softmax, log_softmax,
// softmax_backward, entropy_backward, logprobs_backward: [rows, V] in the
// dtype of x; logsumexp: [rows] Acc; lse_float64: [rows] float64;
// entropy_forward: entropy [rows] Acc, lse [rows] float64; entropy shard:
// entropy [rows] Acc; logprobs_forward: logprob, lse [rows] Acc.
#include <cuda_runtime.h>  // the simulator: this folder is first on the include path

#include "kdext/cuda/logprobs_launchers.cuh"
#include "kdext/cuda/softmax_launchers.cuh"
#include "sim_io.h"

using kdext::cuda::DType;

namespace {

enum Op : int64_t {
  kSoftmax = 0,
  kLogSoftmax,
  kSoftmaxBackward,
  kLogsumexp,
  kEntropy,
  kEntropyShard,
  kEntropyBackward,
  kLogprobs,
  kLogprobsBackward,
  kLseFloat64,
};

void run_job(sim_io::Reader& in, sim_io::Writer& out) {
  int64_t op, rows, V, dtype, stride, offset, g_dtype, flags;
  for (int64_t* f : {&op, &rows, &V, &dtype, &stride, &offset, &g_dtype, &flags}) *f = in.i64();
  const double temperature = in.f64();
  const size_t es = sim_io::dtype_size(dtype), acc = dtype == 3 ? 8 : 4;
  const size_t n = size_t(rows) * size_t(V), per_row = size_t(rows) * acc, per_row64 = size_t(rows) * 8;
  sim_io::Job job(in);
  const void* x = job.input(sim_io::strided_bytes(rows, V, stride, es), size_t(offset) * es);
  const kdext::cuda::RowTensor rt{x, DType(dtype), stride, rows, V};
  const kdext::cuda::Queue q = job.queue();
  const auto tokens = [&] { return static_cast<const int64_t*>(job.input(size_t(rows) * 8)); };
  cudaError_t err;
  switch (op) {
    case kSoftmax:
    case kLogSoftmax:
      err = kdext::cuda::softmax_forward(rt, temperature, op == kLogSoftmax, job.output(n * es), q);
      break;
    case kSoftmaxBackward: {
      const kdext::cuda::RowTensor g{job.input(n * sim_io::dtype_size(g_dtype)), DType(g_dtype), V, rows, V};
      err = kdext::cuda::softmax_backward(g, rt, temperature, flags & 1, job.output(n * es), q);
      break;
    }
    case kLogsumexp:
      err = kdext::cuda::logsumexp(rt, temperature, job.output(per_row), q);
      break;
    case kLseFloat64:
      err = kdext::cuda::lse_float64(rt, temperature, job.output(per_row64), q);
      break;
    case kEntropy: {
      void* h = job.output(per_row);
      err = kdext::cuda::entropy_forward(rt, temperature, nullptr, h, job.output(per_row64), q);
      break;
    }
    case kEntropyShard: {
      const void* lse = job.input(per_row64);
      err = kdext::cuda::entropy_forward(rt, temperature, lse, job.output(per_row), nullptr, q);
      break;
    }
    case kEntropyBackward: {
      const void* grad = job.input(per_row);
      const void* h = job.input(per_row);
      const void* lse = job.input(per_row64);
      err = kdext::cuda::entropy_backward(rt, temperature, grad, h, lse, job.output(n * es), q);
      break;
    }
    case kLogprobs: {
      const int64_t* tok = tokens();
      void* lp = job.output(per_row);
      err = kdext::cuda::logprobs_forward(rt, tok, temperature, lp, job.output(per_row), q);
      break;
    }
    case kLogprobsBackward: {
      const void* grad = job.input(per_row);
      const int64_t* tok = tokens();
      const void* lse = job.input(per_row);
      err = kdext::cuda::logprobs_backward(rt, tok, temperature, grad, lse, job.output(n * es), q);
      break;
    }
    default:
      sim_io::fail("bad op " + std::to_string(op));
  }
  job.finish(out, err);
}

}  // namespace

int main(int argc, char** argv) { return sim_io::run_driver(argc, argv, run_job); }
