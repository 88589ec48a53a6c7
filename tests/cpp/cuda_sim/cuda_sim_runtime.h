// The simulated CUDA runtime API (see cuda_sim.h): errors, device and function
// attributes, occupancy queries and cudaLaunchKernelEx, for the device
// described by cuda_sim::device. Included through the <cuda_runtime.h>
// stand-in of this folder.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_sim.h"

// ---- runtime API -----------------------------------------------------------------------

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_sim::g.last_error;
  cuda_sim::g.last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_sim::g.last_error; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  const cuda_sim::Device& d = cuda_sim::device;
  if (dev != 0) return cuda_sim::record(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = d.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *v = d.major; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = d.smem_optin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = d.smem_per_sm; break;
    case cudaDevAttrClusterLaunch: *v = d.major >= 9 && d.clusters ? 1 : 0; break;
    case cudaDevAttrMaxGridDimX: *v = d.max_grid; break;
    default: return cuda_sim::record(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  cuda_sim::KernelAttrs& a = cuda_sim::g.attrs[reinterpret_cast<const void*>(kernel)];
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || value > cuda_sim::device.smem_optin) return cuda_sim::record(cudaErrorInvalidValue);
      a.max_dynamic_smem = value;
      return cudaSuccess;
    case cudaFuncAttributeNonPortableClusterSizeAllowed:
      if (cuda_sim::device.major < 9) return cuda_sim::record(cudaErrorInvalidValue);
      a.nonportable_cluster = value != 0;
      return cudaSuccess;
  }
  return cuda_sim::record(cudaErrorInvalidValue);
}

template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* out, void (*)(P...)) {
  out->sharedSizeBytes = 0;  // unknown before the kernel runs (see the header comment)
  out->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

namespace cuda_sim {
// Blocks of `threads` threads and `smem` dynamic bytes resident per SM (the
// runtime reserves 1 KB of shared memory per block).
inline int blocks_per_sm(int threads, size_t smem) {
  if (smem > size_t(device.smem_optin)) return 0;
  int n = device.max_threads_per_sm / threads;
  const int by_smem = static_cast<int>(size_t(device.smem_per_sm) / (smem + 1024));
  if (by_smem < n) n = by_smem;
  return n < device.max_blocks_per_sm ? n : device.max_blocks_per_sm;
}

inline int cluster_of(const cudaLaunchConfig_t& cfg) {
  int c = 1;
  for (unsigned i = 0; i < cfg.numAttrs; ++i)
    if (cfg.attrs[i].id == cudaLaunchAttributeClusterDimension) {
      if (cfg.attrs[i].val.clusterDim.y != 1 || cfg.attrs[i].val.clusterDim.z != 1) fail("only 1-D clusters");
      c = static_cast<int>(cfg.attrs[i].val.clusterDim.x);
    }
  return c;
}

// Why a cluster of c blocks cannot be launched with kernel attributes `a`, or null.
inline const char* cluster_refusal(int c, const KernelAttrs& a) {
  if (c == 1) return nullptr;
  if (c < 1 || !device.clusters || device.major < 9) return "no clusters on this device";
  if (c > kMaxPortableCluster && !a.nonportable_cluster) return "cluster over 8 without the non-portable attribute";
  if (c > device.max_cluster_nonportable) return "cluster larger than the device allows";
  return nullptr;
}
}  // namespace cuda_sim

template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(P...), int threads, size_t smem) {
  *n = cuda_sim::blocks_per_sm(threads, smem);
  return cudaSuccess;
}

template <typename... P>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, void (*kernel)(P...), const cudaLaunchConfig_t* cfg) {
  const int c = cuda_sim::cluster_of(*cfg);
  const cuda_sim::KernelAttrs& a = cuda_sim::g.attrs[reinterpret_cast<const void*>(kernel)];
  if (cuda_sim::cluster_refusal(c, a) != nullptr) return cuda_sim::record(cudaErrorInvalidConfiguration);
  if (cfg->dynamicSmemBytes > size_t(a.max_dynamic_smem)) return cuda_sim::record(cudaErrorInvalidValue);
  const int per_sm = cuda_sim::blocks_per_sm(static_cast<int>(cfg->blockDim.x), cfg->dynamicSmemBytes);
  *n = per_sm * cuda_sim::device.sms / c;
  return cudaSuccess;
}

namespace cuda_sim {
// The name of a kernel (the executable must be linked with -rdynamic), without
// its template arguments.
inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : info.dli_sname;
  std::free(d);
  const size_t lt = s.find('<');
  if (lt != std::string::npos) s.resize(lt);
  const size_t sp = s.rfind(' ');
  if (sp != std::string::npos) s = s.substr(sp + 1);
  const size_t ns = s.rfind("::");
  return ns == std::string::npos ? s : s.substr(ns + 2);
}

// With CUDA_SIM_LOG set, one line on stderr per launch (tests check which
// kernels and geometries a case went through).
inline void log_launch(const void* fn, const cudaLaunchConfig_t& cfg, int cluster) {
  static const bool on = std::getenv("CUDA_SIM_LOG") != nullptr;
  if (!on) return;
  std::fprintf(stderr, "cuda_sim: launch %s grid=%u block=%u cluster=%d smem=%zu\n", kernel_name(fn).c_str(),
               cfg.gridDim.x, cfg.blockDim.x, cluster, cfg.dynamicSmemBytes);
}
}  // namespace cuda_sim

// Runs the kernel on the simulator (synchronously: streams are not modelled).
template <typename... Exp, typename... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Exp...), Act&&... args) {
  using cuda_sim::record;
  const int c = cuda_sim::cluster_of(*cfg);
  const cuda_sim::KernelAttrs& a = cuda_sim::g.attrs[reinterpret_cast<const void*>(kernel)];
  if (cfg->gridDim.x == 0 || cfg->gridDim.x > unsigned(cuda_sim::device.max_grid) || cfg->blockDim.x == 0 ||
      cfg->blockDim.x > 1024)
    return record(cudaErrorInvalidConfiguration);
  if (const char* why = cuda_sim::cluster_refusal(c, a)) {
    std::fprintf(stderr, "cuda_sim: launch refused: %s\n", why);
    return record(cudaErrorInvalidConfiguration);
  }
  if (cfg->gridDim.x % c != 0) return record(cudaErrorInvalidConfiguration);
  if (cfg->dynamicSmemBytes > size_t(a.max_dynamic_smem)) return record(cudaErrorInvalidValue);
  cuda_sim::log_launch(reinterpret_cast<const void*>(kernel), *cfg, c);
  std::tuple<std::decay_t<Exp>...> params(std::forward<Act>(args)...);  // coerced as the runtime does
  cuda_sim::run(cfg->gridDim, cfg->blockDim, c, cfg->dynamicSmemBytes, [&] { std::apply(kernel, params); });
  return cudaSuccess;
}
