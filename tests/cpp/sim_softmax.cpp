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
//   6 entropy_backward, 7 logprobs_forward, 8 logprobs_backward), rows, V,
//   dtype (kdext::cuda::DType code), stride, offset (entries past a 16-byte
//   boundary), g_dtype (softmax_backward), flags (softmax_backward: 1 = log);
//   float64 temperature;
//   x ((rows - 1) * stride + V entries; for softmax_backward the output y),
//   then softmax_backward: grad_output [rows, V] contiguous in g_dtype;
//   entropy shard: lse [rows] float64; entropy_backward: grad, entropy [rows]
//   Acc, lse [rows] float64; logprobs_forward: tokens [rows] int64;
//   logprobs_backward: grad [rows] Acc, tokens [rows] int64, lse [rows] Acc.
// Acc is float64 for float64 inputs, else float32.
// OUT per job: int64 cudaError_t, then softmax, log_softmax,
// softmax_backward, entropy_backward, logprobs_backward: [rows, V] in the
// dtype of x; logsumexp: [rows] Acc; entropy_forward: entropy [rows] Acc, lse
// [rows] float64; entropy shard: entropy [rows] Acc; logprobs_forward:
// logprob, lse [rows] Acc.
#include <cuda_runtime.h>  // the simulator: this folder is first on the include path

#include "kdext/cuda/logprobs_launchers.cuh"
#include "kdext/cuda/softmax_launchers.cuh"
#include "sim_io.h"

using kdext::cuda::DType;
using sim_io::Buffer;

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
};

void run_job(sim_io::Reader& in, sim_io::Writer& out) {
  int64_t op, rows, V, dtype, stride, offset, g_dtype, flags;
  for (int64_t* f : {&op, &rows, &V, &dtype, &stride, &offset, &g_dtype, &flags}) *f = in.i64();
  const double temperature = in.f64();
  const size_t es = sim_io::dtype_size(dtype), acc = dtype == 3 ? 8 : 4;
  const size_t n = size_t(rows) * size_t(V);
  auto x = sim_io::read_buffer(in, sim_io::strided_bytes(rows, V, stride, es), size_t(offset) * es);
  const kdext::cuda::RowTensor rt{x->data(), DType(dtype), stride, rows, V};
  std::vector<std::unique_ptr<Buffer>> inputs, outputs;
  auto input = [&](size_t bytes) {
    inputs.push_back(sim_io::read_buffer(in, bytes, 0));
    return inputs.back()->data();
  };
  auto output = [&](size_t bytes) {
    outputs.push_back(sim_io::output_buffer(bytes));
    return outputs.back()->data();
  };
  sim_io::Pool pool;
  const kdext::cuda::Workspace ws = pool.workspace();
  cudaError_t err;
  switch (op) {
    case kSoftmax:
    case kLogSoftmax:
      err = kdext::cuda::softmax_forward(rt, temperature, op == kLogSoftmax, output(n * es), ws, nullptr);
      break;
    case kSoftmaxBackward: {
      const kdext::cuda::RowTensor g{input(n * sim_io::dtype_size(g_dtype)), DType(g_dtype), V, rows, V};
      err = kdext::cuda::softmax_backward(g, rt, temperature, flags & 1, output(n * es), ws, nullptr);
      break;
    }
    case kLogsumexp:
      err = kdext::cuda::logsumexp(rt, temperature, output(size_t(rows) * acc), ws, nullptr);
      break;
    case kEntropy: {
      void* h = output(size_t(rows) * acc);
      void* lse = output(size_t(rows) * 8);
      err = kdext::cuda::entropy_forward(rt, temperature, nullptr, h, lse, ws, nullptr);
      break;
    }
    case kEntropyShard: {
      const void* lse = input(size_t(rows) * 8);
      err = kdext::cuda::entropy_forward(rt, temperature, lse, output(size_t(rows) * acc), nullptr, ws, nullptr);
      break;
    }
    case kEntropyBackward: {
      const void* grad = input(size_t(rows) * acc);
      const void* h = input(size_t(rows) * acc);
      const void* lse = input(size_t(rows) * 8);
      err = kdext::cuda::entropy_backward(rt, temperature, grad, h, lse, output(n * es), nullptr);
      break;
    }
    case kLogprobs: {
      const auto* tokens = static_cast<const int64_t*>(input(size_t(rows) * 8));
      void* lp = output(size_t(rows) * acc);
      void* lse = output(size_t(rows) * acc);
      err = kdext::cuda::logprobs_forward(rt, tokens, temperature, lp, lse, ws, nullptr);
      break;
    }
    case kLogprobsBackward: {
      const void* grad = input(size_t(rows) * acc);
      const auto* tokens = static_cast<const int64_t*>(input(size_t(rows) * 8));
      const void* lse = input(size_t(rows) * acc);
      err = kdext::cuda::logprobs_backward(rt, tokens, temperature, grad, lse, output(n * es), nullptr);
      break;
    }
    default:
      sim_io::fail("bad op " + std::to_string(op));
  }
  out.i64(err);
  for (const auto& o : outputs) {
    out.bytes(o->data(), o->size());
    o->check("an output");
  }
  x->check("the logits");
  for (const auto& i : inputs) i->check("an input");
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
