// Helpers shared by the CUDA adapters (csrc/cuda/*.cu): the torch side of the
// framework-free launchers in csrc/include/kdext/cuda/ — dtype tags,
// caching-allocator workspaces, and run_launcher, the one way an adapter runs
// a launcher (the one way a launcher launches a kernel is kdext::cuda::launch,
// csrc/include/kdext/cuda/launch_plan.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

#include "kdext/cuda/launch_plan.h"
#include "kdext/cuda/vec_load.cuh"

namespace kdext {
namespace cuda_adapter {

inline kdext::cuda::DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return kdext::cuda::DType::Float32;
    case c10::kHalf: return kdext::cuda::DType::Float16;
    case c10::kBFloat16: return kdext::cuda::DType::BFloat16;
    case c10::kDouble: return kdext::cuda::DType::Float64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "kdext CUDA kernels support float32, float16, bfloat16 and float64, got ", t);
  return kdext::cuda::DType::Float32;
}

// at::empty as an OutputAllocator (csrc/adapter_args.h). The adapters build
// their argument structs before they take the device guard, so that a tensor
// on the wrong device meets the checks' message (naming it) rather than the
// guard's; at::empty and the dtype conversions guard their own device.
inline at::Tensor empty_device_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// The current stream of the current device (the caller holds a device guard).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Hands out caching-allocator blocks for a launcher's temporaries and keeps
// them alive until run_launcher returns (an allocation that fails throws
// torch's out-of-memory error through the launcher). Freeing right after the kernels are
// enqueued is safe: the caching allocator only reuses a block for work that is
// ordered after them on the same stream.
class WorkspaceHolder {
 public:
  explicit WorkspaceHolder(c10::Device device) : device_(device) {}

  kdext::cuda::Workspace workspace() { return {&WorkspaceHolder::alloc, this}; }

 private:
  static void* alloc(void* ctx, size_t bytes) {
    auto* self = static_cast<WorkspaceHolder*>(ctx);
    self->blocks_.push_back(
        at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(self->device_)));
    return self->blocks_.back().data_ptr();
  }

  c10::Device device_;
  std::vector<at::Tensor> blocks_;
};

// Runs launcher(args..., queue), a framework-free launcher of
// csrc/include/kdext/cuda/, on `device`: under a device guard, with a Queue of
// the device's current stream and caching-allocator temporaries that live
// until it returns. The error the launcher returns (its first kernel launch
// or allocation that failed), or one the runtime was left holding, becomes an
// exception. The adapters build their argument structs, and so `args`, before
// (see empty_device_output).
template <typename Launcher, typename... Args>
void run_launcher(c10::Device device, Launcher&& launcher, Args&&... args) {
  const c10::cuda::CUDAGuard guard(device);
  WorkspaceHolder ws(device);
  const kdext::cuda::Queue queue{current_stream(), ws.workspace()};
  C10_CUDA_CHECK(launcher(std::forward<Args>(args)..., queue));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_adapter
}  // namespace kdext
