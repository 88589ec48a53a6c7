// ctest: the CUDA launchers' tuning knobs (csrc/include/kdext/cuda/tuning.h,
// docs/CUDA.md): parsed from the environment once per process, a bad value
// ignored as if unset, set_tuning replacing them. Plain C++: no CUDA needed.
#include <cstdio>
#include <cstdlib>

#include "kdext/cuda/tuning.h"

namespace {

int failures = 0;

void expect(bool cond, const char* what) {
  if (!cond) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  using kdext::cuda::Tuning;
  setenv("KDEXT_CUDA_ONCHIP", "off", 1);
  setenv("KDEXT_CUDA_CLUSTER", "3", 1);  // not a power of two: ignored
  setenv("KDEXT_CUDA_CHUNKS", "7", 1);
  const Tuning t = kdext::cuda::detail::tuning_from_env();
  expect(!t.onchip, "KDEXT_CUDA_ONCHIP=off disables the on-chip path");
  expect(t.cluster == 0, "KDEXT_CUDA_CLUSTER=3 is ignored");
  expect(t.chunks == 7, "KDEXT_CUDA_CHUNKS=7 forces 7 chunks");

  setenv("KDEXT_CUDA_ONCHIP", "maybe", 1);
  setenv("KDEXT_CUDA_CLUSTER", "16", 1);
  setenv("KDEXT_CUDA_CHUNKS", "4097", 1);
  const Tuning u = kdext::cuda::detail::tuning_from_env();
  expect(u.onchip, "an unknown KDEXT_CUDA_ONCHIP keeps the default");
  expect(u.cluster == 16, "KDEXT_CUDA_CLUSTER=16");
  expect(u.chunks == 0, "KDEXT_CUDA_CHUNKS above 4096 is ignored");
  setenv("KDEXT_CUDA_CHUNKS", "2x", 1);
  expect(kdext::cuda::detail::tuning_from_env().chunks == 0, "KDEXT_CUDA_CHUNKS=2x is ignored");

  // tuning() reads the environment once: a later change has no effect.
  const Tuning first = kdext::cuda::tuning();
  setenv("KDEXT_CUDA_CLUSTER", "2", 1);
  expect(kdext::cuda::tuning().cluster == first.cluster, "the environment is read once");
  Tuning forced;
  forced.onchip = false;
  forced.chunks = 3;
  kdext::cuda::set_tuning(forced);
  expect(!kdext::cuda::tuning().onchip && kdext::cuda::tuning().chunks == 3 && kdext::cuda::tuning().cluster == 0,
         "set_tuning replaces the knobs");
  expect(kdext::cuda::valid_cluster(0) && kdext::cuda::valid_cluster(8) && !kdext::cuda::valid_cluster(6) &&
             !kdext::cuda::valid_cluster(32),
         "valid cluster sizes");
  expect(kdext::cuda::valid_chunks(0) && kdext::cuda::valid_chunks(4096) && !kdext::cuda::valid_chunks(-1),
         "valid chunk counts");

  if (failures == 0) std::printf("tuning: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
