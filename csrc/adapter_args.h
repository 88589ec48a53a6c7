// The pieces every adapter, CPU or CUDA, prepares its arguments with: a
// validated [rows, V] view of one logits-like tensor, per-row vectors in the
// accumulation dtype, and the allocator outputs come from (the CPU adapters
// draw [rows, V] outputs from a buffer pool, the CUDA ones from the caching
// allocator).
//
// Every op has one argument struct, <Op>Args in csrc/<stem>_args.h, shared by
// both backends' adapters: its validated inputs are members (RowsInput here,
// PairInput in divergence_args.h) built in the initializer list, and its
// constructor runs the op's remaining checks, converts the per-row tensors
// and allocates the outputs, so that both backends check, convert and
// allocate alike and a backend only runs its kernels on the struct.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "checks.h"

namespace kdext {

// Where an adapter's large outputs come from.
using OutputAllocator = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

// The accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline c10::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// A [rows, V] view (or copy) whose last dimension has unit stride. Views are
// kept whenever the leading dims collapse; otherwise the rows are copied once.
inline at::Tensor as_rows(const at::Tensor& x) {
  const int64_t v = x.size(-1);
  at::Tensor y = x.stride(-1) == 1 ? x : x.contiguous();
  y = y.reshape({-1, v});
  if (y.stride(-1) != 1 || (y.size(0) > 1 && y.stride(0) < v)) y = y.contiguous();
  return y;
}

// The leading dims of a logits-like tensor: the shape of a per-row output.
inline std::vector<int64_t> row_shape(const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  return sizes;
}

// A validated [rows, V] view (or copy) of one logits-like tensor, unit stride in V.
struct RowsInput {
  at::Tensor x;
  int64_t rows, V;

  RowsInput(const at::Tensor& logits, const char* name) {
    check_logits(logits, name);
    x = as_rows(logits);
    rows = x.size(0);
    V = x.size(1);
  }
};

// A per-row tensor (checked with check_per_row) as a flat contiguous vector of `dtype`.
inline at::Tensor per_row_vector(const at::Tensor& t, c10::ScalarType dtype) {
  return t.to(dtype).contiguous().reshape({-1});
}

// Start of row r of a [rows, V] tensor with unit stride in V.
inline const void* row_ptr(const at::Tensor& x2d, int64_t r) {
  return static_cast<const char*>(x2d.const_data_ptr()) + r * x2d.stride(0) * x2d.element_size();
}
inline void* mutable_row_ptr(const at::Tensor& x2d, int64_t r) {
  return static_cast<char*>(x2d.data_ptr()) + r * x2d.stride(0) * x2d.element_size();
}

}  // namespace kdext
