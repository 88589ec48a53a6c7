// The CUDA types that the kernels, the launch plan and the simulator name
// (see cuda_sim.h): dim3, uint4 (with its alignment check), the error codes and
// the launch configuration of the runtime API.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

// ---- CUDA types -----------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_sim {
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_sim: %s\n", what);
  std::fflush(stderr);
  std::abort();
}
inline void check_aligned16(const void* p, const char* what) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) fail(what);
}
}  // namespace cuda_sim

// A 16-byte vector. Copies check that both ends are 16-byte aligned (a
// misaligned vector load or store faults on the device).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  constexpr uint4(unsigned a, unsigned b, unsigned c, unsigned d) : x(a), y(b), z(c), w(d) {}
  uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) {
    cuda_sim::check_aligned16(&o, "misaligned 16-byte vector load");
    cuda_sim::check_aligned16(this, "misaligned 16-byte vector store");
  }
  uint4& operator=(const uint4& o) {
    cuda_sim::check_aligned16(&o, "misaligned 16-byte vector load");
    cuda_sim::check_aligned16(this, "misaligned 16-byte vector store");
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4(a, b, c, d); }
inline void __stcs(uint4* p, uint4 v) { *p = v; }

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
};
typedef cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrClusterLaunch,
  cudaDevAttrMaxGridDimX,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize,
  cudaFuncAttributeNonPortableClusterSizeAllowed,
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
};
