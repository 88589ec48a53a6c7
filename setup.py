"""Builds kdext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment knobs:
  KDEXT_CUDA=0/1          force the CUDA sources off / on (default: auto-detect; no GPU needed)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0" when no GPU is visible)
  KDEXT_CPU_ISA=avx512|avx2|default   vector ISA of the CPU kernels (default: the build CPU's widest)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import platform
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_cuda_runtime(home):
    if not home:
        return False
    include_ok = os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    lib_ok = any(glob.glob(os.path.join(home, d, "libcudart.so*")) for d in ("lib64", "lib", "lib/x64"))
    return include_ok and lib_ok


def _nvcc_candidates():
    """Folders that may hold the toolkit, from nvcc's real location first."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        # nvcc may be a wrapper script: ask the compiler itself where it lives.
        try:
            out = subprocess.run([nvcc, "-v", "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    yield os.path.realpath(line.split("TOP=", 1)[1].strip())
        except (OSError, subprocess.SubprocessError):
            pass
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def find_cuda_home():
    """CUDA_HOME if it is usable, else the toolkit that nvcc belongs to (None if there is none)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _has_cuda_runtime(env):
        return env
    for home in _nvcc_candidates():
        if _has_cuda_runtime(home) and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def want_cuda(torch, cuda_home):
    flag = os.environ.get("KDEXT_CUDA")
    if flag == "0":
        return False
    available = torch.version.cuda is not None and cuda_home is not None
    if flag == "1":
        if not available:
            raise RuntimeError(
                "KDEXT_CUDA=1 but CUDA cannot be built: "
                + ("this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found")
            )
        return True
    return available


def _build_cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


def default_cpu_isa():
    """The widest vector ISA of the build machine that the kernels support (kdext refuses to
    import on a CPU without it; KDEXT_CPU_ISA overrides, e.g. avx2 for a portable build)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    if _build_cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        return "avx512"
    return "avx2"


def cpu_isa_flags():
    isa = os.environ.get("KDEXT_CPU_ISA") or default_cpu_isa()
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa == "default":
        return ["-DCPU_CAPABILITY=DEFAULT"]
    raise ValueError(f"KDEXT_CPU_ISA must be 'avx512', 'avx2' or 'default', got {isa!r}")


def build_extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = want_cuda(torch, cuda_home)
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # Headers the sources include: editing one must trigger a rebuild.
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    # -ffp-contract=off: GCC would otherwise fuse x * (1/T) - max into one FMA in some
    # places and not others, so the same quantity would round two ways (softmax of a
    # one-token row would not be exactly 1).
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off"] + cpu_isa_flags()
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DKDEXT_WITH_CUDA"]
        ext = CUDAExtension(
            "kdext._C",
            sources,
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={"cxx": cxx + ["-DKDEXT_WITH_CUDA"], "nvcc": nvcc},
        )
    else:
        ext = CppExtension("kdext._C", sources, include_dirs=include_dirs, depends=depends,
                           extra_compile_args={"cxx": cxx})
    print(f"kdext: building CPU kernels ({' '.join(cpu_isa_flags())}); CUDA kernels: "
          + (f"yes (CUDA_HOME={cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST')})" if with_cuda else "no"))
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
