"""Argument checks shared by the Python wrappers and the fake kernels.

They mirror the C++ checks (csrc/checks.h and csrc/<stem>_args.h) word for
word, so that an error looks the same in eager mode (raised by the C++ kernel)
and under torch.compile (raised here, while tracing with fake tensors).
"""

import math

import torch

from ._ops import BUILD_INFO

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The divergences and the names of their parameters come from the one list in
# C++ (kDivergenceNames, csrc/include/kdext/divergence.h), through the library.
DIVERGENCES = tuple(name for name, _ in BUILD_INFO["divergences"])
PARAM_NAME = {name: param for name, param in BUILD_INFO["divergences"] if param is not None}


def check_logits(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (last dimension of size 0)")


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_same_device(a, a_name, b, b_name):
    if a.device != b.device:
        raise RuntimeError(f"{a_name} is on {a.device} but {b_name} is on {b.device}; they must be on the same device")


def check_row_integers(x, name, logits):
    """An int64/int32 tensor with one entry per row of ``logits`` (token ids, row ids)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {x.dtype}")
    check_same_device(x, name, logits, "logits")
    rows = rows_shape(logits)
    if tuple(x.shape) != rows:
        raise ValueError(f"{name} must have shape {list(rows)} (the logits' leading dims), got {list(x.shape)}")


def check_logit_pair(s, t):
    check_logits(s, "student_logits")
    check_logits(t, "teacher_logits")
    check_same_device(s, "student_logits", t, "teacher_logits")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"vocabulary size mismatch: student_logits has {s.shape[-1]} entries in its last dimension, "
            f"teacher_logits has {t.shape[-1]}"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"row shape mismatch: student_logits has shape {list(s.shape)} but teacher_logits has shape {list(t.shape)}"
        )
    if (s.dtype == torch.float64) != (t.dtype == torch.float64):
        raise TypeError(
            f"student_logits is {s.dtype} and teacher_logits is {t.dtype}; "
            "float64 cannot be mixed with lower precisions"
        )


def check_divergence(name, param):
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}'; expected one of {', '.join(DIVERGENCES)}")
    if name in PARAM_NAME:
        if isinstance(param, bool) or not isinstance(param, (int, float)):
            raise TypeError(f"{PARAM_NAME[name]} must be a float, got {type(param).__name__}")
        if not 0.0 <= param <= 1.0:
            raise ValueError(f"{PARAM_NAME[name]} must be in [0, 1], got {param}")


def acc_dtype(x):
    """The accumulation / per-row output dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rows_shape(x):
    return tuple(x.shape[:-1])
