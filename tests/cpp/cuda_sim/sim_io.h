// What the simulator drivers (tests/cpp/sim_*.cpp) share: reading their
// little-endian input, writing their output, the simulated device, and
// "device memory" that catches out-of-bounds accesses.
//
// Every buffer a kernel sees (inputs, outputs, workspace) ends at most 15
// bytes before a PROT_NONE page, so reading or writing a row past the end
// faults, and starts after a canary, so a write before it is found; outputs
// and workspace start as 0xFF bytes (NaN in every float type), so an output
// element that no kernel wrote shows up as NaN where a number is due.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "cuda_sim.h"

namespace sim_io {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "sim driver: %s\n", what.c_str());
  std::exit(2);
}

struct Reader {
  std::ifstream f;
  explicit Reader(const char* path) : f(path, std::ios::binary) {
    if (!f) fail(std::string("cannot open ") + path);
  }
  void bytes(void* p, size_t n) {
    f.read(static_cast<char*>(p), static_cast<std::streamsize>(n));
    if (!f) fail("short input");
  }
  int64_t i64() {
    int64_t v;
    bytes(&v, 8);
    return v;
  }
  double f64() {
    double v;
    bytes(&v, 8);
    return v;
  }
};

struct Writer {
  std::ofstream f;
  explicit Writer(const char* path) : f(path, std::ios::binary) {
    if (!f) fail(std::string("cannot open ") + path);
  }
  void bytes(const void* p, size_t n) { f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n)); }
  void i64(int64_t v) { bytes(&v, 8); }
};

// The simulated device: int64 sms, compute capability major, opt-in shared
// memory per block (bytes), cluster launch (0/1), blocks per launch at most.
inline void read_device(Reader& in) {
  cuda_sim::device.sms = static_cast<int>(in.i64());
  cuda_sim::device.major = static_cast<int>(in.i64());
  cuda_sim::device.smem_optin = static_cast<int>(in.i64());
  cuda_sim::device.smem_per_sm = cuda_sim::device.smem_optin + 1024;
  cuda_sim::device.clusters = in.i64() != 0;
  cuda_sim::device.max_grid = static_cast<int>(in.i64());
}

constexpr unsigned char kCanary = 0xA5;
constexpr size_t kPage = 4096;
constexpr size_t kCanaryBytes = 64;

// `bytes` of device memory starting `offset` bytes past a 16-byte boundary.
class Buffer {
 public:
  Buffer(size_t bytes, size_t offset, unsigned char fill) : bytes_(bytes) {
    const size_t span = (offset + bytes + 15) / 16 * 16;
    pages_ = (span + kCanaryBytes + kPage - 1) / kPage * kPage;
    void* p = mmap(nullptr, pages_ + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a buffer");
    region_ = static_cast<unsigned char*>(p);
    mprotect(region_ + pages_, kPage, PROT_NONE);
    std::memset(region_, kCanary, pages_);
    data_ = region_ + pages_ - span + offset;
    std::memset(data_, fill, bytes);
  }
  ~Buffer() { munmap(region_, pages_ + kPage); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return bytes_; }

  // Aborts if anything outside [data, data + size) was written.
  void check(const char* what) const {
    for (unsigned char* p = region_; p < region_ + pages_; ++p) {
      if (p == data_) p += bytes_;
      if (p < region_ + pages_ && *p != kCanary) fail(std::string("a kernel wrote outside ") + what);
    }
  }

 private:
  size_t bytes_, pages_;
  unsigned char* region_;
  unsigned char* data_;
};

// An input read from the stream into device memory.
inline std::unique_ptr<Buffer> read_buffer(Reader& in, size_t bytes, size_t offset) {
  auto b = std::make_unique<Buffer>(bytes, offset, 0);
  in.bytes(b->data(), bytes);
  return b;
}

// An output (or workspace) buffer: 0xFF bytes until a kernel writes it.
inline std::unique_ptr<Buffer> output_buffer(size_t bytes) { return std::make_unique<Buffer>(bytes, 0, 0xFF); }

// The workspace of one launcher call.
class Pool {
 public:
  kdext::cuda::Workspace workspace() { return {&Pool::alloc, this}; }
  void check() const {
    for (const auto& b : blocks_) b->check("a workspace block");
  }

 private:
  static void* alloc(void* ctx, size_t bytes) {
    auto* self = static_cast<Pool*>(ctx);
    self->blocks_.push_back(output_buffer(bytes));
    return self->blocks_.back()->data();
  }
  std::vector<std::unique_ptr<Buffer>> blocks_;
};

// Element size of the kdext::cuda::DType codes (0 float32, 1 float16, 2 bfloat16, 3 float64).
inline size_t dtype_size(int64_t code) {
  switch (code) {
    case 0: return 4;
    case 1: return 2;
    case 2: return 2;
    case 3: return 8;
  }
  fail("bad dtype code " + std::to_string(code));
}

// Bytes of a [rows, V] tensor with row stride `stride` (the last row need not be padded).
inline size_t strided_bytes(int64_t rows, int64_t V, int64_t stride, size_t esize) {
  return rows == 0 ? 0 : size_t((rows - 1) * stride + V) * esize;
}

}  // namespace sim_io
