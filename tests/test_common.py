"""scale_ (stem: common): self *= factor in place, skipped when the factor is 1.

The product of a float by 2, 0.5 or -3 is exact in every dtype here (no
overflow), so results are compared exactly with torch's own product.
"""

import pytest
import torch

import kdext  # noqa: F401  (registers the fake kernels)

ops = torch.ops.kdext
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _x(device, dtype, shape=(5, 37)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [2.0, 0.5, -3.0, 0.0])
def test_scales_in_place(device, dtype, factor):
    x = _x(device, dtype)
    want = x * factor
    ptr = x.data_ptr()
    ops.scale_(x, torch.tensor(factor, device=device))
    assert x.data_ptr() == ptr and x.dtype == dtype
    torch.testing.assert_close(x, want, rtol=0, atol=0)


@pytest.mark.parametrize("factor_dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32])
def test_factor_dtypes_and_one_element_shapes(device, factor_dtype):
    for shape in ((), (1,), (1, 1)):
        x = _x(device, torch.float32)
        want = x * 2
        ops.scale_(x, torch.full(shape, 2, dtype=factor_dtype, device=device))
        torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_factor_one_leaves_self_as_it_is(device):
    x = _x(device, torch.float32)
    x[1, 3] = float("nan")
    x[2, 0] = float("-inf")
    before = x.clone()
    ops.scale_(x, torch.ones((), device=device))
    assert torch.equal(x.isnan(), before.isnan())
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)


def test_non_contiguous_and_empty_self(device):
    base = _x(device, torch.float32, (6, 40))
    view = base[1::2, 3:]
    outside = base.clone()
    want = view * 0.5
    ops.scale_(view, torch.tensor(0.5, device=device))
    torch.testing.assert_close(view, want, rtol=0, atol=0)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[1::2, 3:] = False
    assert torch.equal(base[untouched], outside[untouched])  # only the view was written
    empty = torch.empty(0, 7, device=device)
    ops.scale_(empty, torch.tensor(3.0, device=device))
    assert empty.shape == (0, 7)
