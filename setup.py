"""Builds kdext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment knobs:
  KDEXT_CUDA=0/1          force the CUDA sources off / on (default: auto-detect; no GPU needed)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0" when no GPU is visible)
  KDEXT_CPU_ISA=avx512|avx2|default   vector ISA of the CPU kernels (default: the build CPU's widest)
  KDEXT_DEBUG=1           a debug build: -O0 -g, and -G (device debug, with line info) for the CUDA kernels
  MAX_JOBS                parallel compile jobs (ninja)

The compiler flags themselves are in build_flags.txt, the one list that
CMakeLists.txt reads too.
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


def read_build_flags(path=os.path.join(ROOT, "build_flags.txt")):
    """{set: [flags]} from build_flags.txt ("<set>: <flags>" lines; '#' comments)."""
    sets = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, flags = line.partition(":")
                sets[name.strip()] = flags.split()
    return sets


BUILD_FLAGS = read_build_flags()


def debug_build():
    flag = os.environ.get("KDEXT_DEBUG", "0")
    if flag not in ("0", "1"):
        raise ValueError(f"KDEXT_DEBUG must be 0 or 1, got {flag!r}")
    return flag == "1"


def cpu_isa_flags():
    isa = os.environ.get("KDEXT_CPU_ISA") or default_cpu_isa()
    if f"isa_{isa}" not in BUILD_FLAGS:
        raise ValueError(f"KDEXT_CPU_ISA must be 'avx512', 'avx2' or 'default', got {isa!r}")
    return BUILD_FLAGS[f"isa_{isa}"]


def build_extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = want_cuda(torch, cuda_home)
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/fused_linear.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # Headers the sources include: editing one must trigger a rebuild.
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    debug = debug_build()
    cxx = BUILD_FLAGS["cxx_debug" if debug else "cxx"] + cpu_isa_flags()
    depends.append("build_flags.txt")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = BUILD_FLAGS["nvcc_debug" if debug else "nvcc"] + BUILD_FLAGS["with_cuda"]
        ext = CUDAExtension(
            "kdext._C",
            sources,
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={"cxx": cxx + BUILD_FLAGS["with_cuda"], "nvcc": nvcc},
        )
    else:
        ext = CppExtension("kdext._C", sources, include_dirs=include_dirs, depends=depends,
                           extra_compile_args={"cxx": cxx})
    print(f"kdext: building{' (debug)' if debug else ''} CPU kernels ({' '.join(cpu_isa_flags())}); CUDA kernels: "
          + (f"yes (CUDA_HOME={cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST')})" if with_cuda else "no"))
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
