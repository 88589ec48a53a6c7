// The pieces every adapter, CPU or CUDA, prepares its arguments with: a
// validated [rows, V] view of one logits-like tensor, per-row vectors in the
// accumulation dtype, and the allocator outputs come from (the CPU adapters
// draw [rows, V] outputs from a buffer pool, the CUDA ones from the caching
// allocator). The per-family argument structs (csrc/<stem>_args.h) are built
// from these, so that both backends check, convert and allocate alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "checks.h"

namespace kdext {

// Where an adapter's large outputs come from.
using OutputAllocator = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

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
