// A small caching allocator for the large [rows, V] outputs of the CPU kernels
// (gradients, softmax outputs).
//
// PyTorch's CPU allocator returns big blocks to the OS on free, so every
// training step pays the kernel for fresh zeroed pages for its new gradient
// buffer: on a [2048, 32000] fp32 gradient that is ~40% of the fused loss's
// time. Like the CUDA caching allocator, this pool keeps freed blocks and
// hands them back out, so a loop that allocates the same-sized buffer every
// step reuses already-mapped memory. Blocks are 2 MiB aligned with
// transparent huge pages requested, which cuts page faults by 512x when a
// block is new.
//
// The pool keeps at most KDEXT_CPU_POOL_MB megabytes of *free* blocks (default
// 1024; 0 disables it). Live tensors are never counted against it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <list>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdext {
namespace cpu {

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: deleters may run at exit
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t numel = c10::multiply_integers(sizes);
    const size_t nbytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    if (limit_ == 0 || nbytes < kMinBytes) return at::empty(sizes, options);
    const size_t capacity = round_up(nbytes);
    void* ptr = take(capacity);
    if (ptr == nullptr) ptr = allocate(capacity);
    if (ptr == nullptr) return at::empty(sizes, options);
    return at::from_blob(
        ptr, sizes, [capacity](void* p) { BufferPool::instance().give_back(p, capacity); }, options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kAlign = size_t(2) << 20;

  struct Block {
    void* ptr;
    size_t bytes;
  };

  BufferPool() {
    const char* env = std::getenv("KDEXT_CPU_POOL_MB");
    limit_ = (env ? size_t(std::strtoull(env, nullptr, 10)) : size_t(1024)) << 20;
  }

  static size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  static void* allocate(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }

  // An exact-size free block, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes == bytes) {
        void* p = it->ptr;
        free_bytes_ -= bytes;
        free_.erase(it);
        return p;
      }
    }
    return nullptr;
  }

  void give_back(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_front({p, bytes});
    free_bytes_ += bytes;
    while (free_bytes_ > limit_ && !free_.empty()) {  // evict the least recently freed
      std::free(free_.back().ptr);
      free_bytes_ -= free_.back().bytes;
      free_.pop_back();
    }
  }

  std::mutex mutex_;
  std::list<Block> free_;
  size_t free_bytes_ = 0;
  size_t limit_ = 0;
};

// at::empty for the kernels' large outputs; see BufferPool.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferPool::instance().empty(sizes, options);
}

}  // namespace cpu
}  // namespace kdext
