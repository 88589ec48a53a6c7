"""Loads the compiled op library and checks that this CPU can run it.

Importing this module registers every ``torch.ops.kdext.*`` op (the schemas
live in csrc/ops.cpp). Fake kernels and autograd formulas are registered by
the module of each op family (divergence.py, softmax.py, logprobs.py, ...).
"""

import torch

try:
    from . import _C
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        "kdext's compiled ops (kdext._C) are missing or were built against another torch. "
        "Rebuild with `pip install --no-build-isolation .` (or `make install`) in the source tree."
    ) from err

BUILD_INFO = _C.build_info()

_ISA_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _check_cpu_capability():
    built = BUILD_INFO["cpu_capability"]
    here = torch.backends.cpu.get_cpu_capability()
    if _ISA_RANK.get(here, 0) < _ISA_RANK.get(built, 0):
        raise ImportError(
            f"kdext's CPU kernels were compiled for {built}, but this CPU supports only {here}. "
            "Rebuild with KDEXT_CPU_ISA=default."
        )


_check_cpu_capability()

ops = torch.ops.kdext
