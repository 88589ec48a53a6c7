// What the simulator drivers (tests/cpp/sim_divergence.cpp, sim_softmax.cpp)
// share: reading their little-endian input, writing their output, the
// simulated device, "device memory" that catches out-of-bounds accesses, the
// buffers of one launcher call (Job) and the loop over a run's jobs
// (run_driver).
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

// An output (or workspace) buffer: 0xFF bytes until a kernel writes it.
inline std::unique_ptr<Buffer> output_buffer(size_t bytes) { return std::make_unique<Buffer>(bytes, 0, 0xFF); }

// The device memory of one launcher call: its inputs (read from the stream),
// outputs and workspace. finish() writes the launcher's error and the outputs
// in the order they were made, and aborts if a kernel wrote outside any buffer.
class Job {
 public:
  explicit Job(Reader& in) : in_(in) {}

  // `bytes` read from the stream, starting `offset` bytes past a 16-byte boundary.
  void* input(size_t bytes, size_t offset = 0) {
    inputs_.push_back(std::make_unique<Buffer>(bytes, offset, 0));
    in_.bytes(inputs_.back()->data(), bytes);
    return inputs_.back()->data();
  }
  // An input the launcher updates in place (scale_): written back as an output.
  void* in_out(size_t bytes, size_t offset = 0) {
    void* p = input(bytes, offset);
    outputs_.push_back(inputs_.back().get());
    return p;
  }
  void* output(size_t bytes) {
    owned_.push_back(output_buffer(bytes));
    outputs_.push_back(owned_.back().get());
    return owned_.back()->data();
  }
  // The queue of the call: the (unmodelled) default stream and this job's workspace.
  kdext::cuda::Queue queue() { return {nullptr, {&Job::alloc, this}}; }

  void finish(Writer& out, cudaError_t err) {
    out.i64(err);
    for (const Buffer* o : outputs_) out.bytes(o->data(), o->size());
    for (const auto& b : inputs_) b->check("an input");
    for (const auto& b : owned_) b->check("an output or workspace block");
  }

 private:
  static void* alloc(void* ctx, size_t bytes) {
    auto* self = static_cast<Job*>(ctx);
    self->owned_.push_back(output_buffer(bytes));
    return self->owned_.back()->data();
  }

  Reader& in_;
  std::vector<std::unique_ptr<Buffer>> inputs_, owned_;
  std::vector<const Buffer*> outputs_;
};

// A driver's main: `driver IN OUT`; IN holds the device, then the number of
// jobs, then the jobs, each run by run_job.
inline int run_driver(int argc, char** argv, void (*run_job)(Reader&, Writer&)) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  Reader in(argv[1]);
  Writer out(argv[2]);
  read_device(in);
  const int64_t jobs = in.i64();
  for (int64_t i = 0; i < jobs; ++i) run_job(in, out);
  std::fprintf(stderr, "cuda_sim: %ld launches, %ld blocks, %ld block barriers, %ld shuffles\n", cuda_sim::g.launches,
               cuda_sim::g.blocks_run, cuda_sim::g.barriers, cuda_sim::g.shuffles);
  return out.f ? 0 : 1;
}

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
