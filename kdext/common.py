"""Generic ops (stem: common): ``scale_``, the in-place scale of the fused loss's backward.

``torch.ops.kdext.scale_(self, factor)`` multiplies ``self`` by ``factor`` (a one-element
tensor on self's device) in place, and skips the work when the factor is 1; on CUDA the
factor is read on the device, so no host synchronisation happens.
"""

import torch

from . import _validate


@torch.library.register_fake("kdext::scale_")
def _scale_fake(self, factor):
    if factor.numel() != 1:
        raise ValueError(f"factor must have exactly one element, got shape {list(factor.shape)}")
    _validate.check_same_device(factor, "factor", self, "self")
    return None
