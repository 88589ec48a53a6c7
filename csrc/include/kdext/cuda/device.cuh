// The few device-side declarations that the CPU simulator of the kernels
// (tests/cpp/cuda_sim) replaces: shared-memory variables and whether the
// thread-block cluster code is compiled. Kernels declare shared memory only
// through these macros, so that the simulator can give every simulated block
// its own (poisoned) shared memory and map it across a cluster.
#pragma once

#include <cuda_runtime.h>

// KDEXT_SHARED(name, Type): a __shared__ variable of the block.
#ifndef KDEXT_SHARED
#define KDEXT_SHARED(name, ...) __shared__ __VA_ARGS__ name
#endif

// KDEXT_DYNAMIC_SHARED(name, Type): `Type* name`, the block's dynamic shared
// memory (the launch's dynamicSmemBytes, 16-byte aligned).
#ifndef KDEXT_DYNAMIC_SHARED
#define KDEXT_DYNAMIC_SHARED(name, ...)                                  \
  extern __shared__ __align__(16) unsigned char kdext_dynamic_shared_[]; \
  __VA_ARGS__* name = reinterpret_cast<__VA_ARGS__*>(kdext_dynamic_shared_)
#endif

// 1 where thread-block clusters and distributed shared memory exist: device
// code for sm_90 and later (and the simulator). The host planner launches
// clusters only on devices that report cluster support, so sm_80 code never
// meets a cluster.
#ifndef KDEXT_DEVICE_CLUSTERS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KDEXT_DEVICE_CLUSTERS 1
#else
#define KDEXT_DEVICE_CLUSTERS 0
#endif
#endif

#if defined(__CUDACC__) || KDEXT_DEVICE_CLUSTERS
#include <cooperative_groups.h>
#endif
