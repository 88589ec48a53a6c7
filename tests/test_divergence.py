"""The divergence family against float64 references, and its mathematical properties."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdext
from reference import (
    DIVERGENCE_CASES,
    GRAD_TOL,
    call_divergence,
    divergence,
    divergence_atol,
    logit_draws,
    random_logits,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FINITE_UNDER_MASKS = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
ODD_VOCABS = [1, 2, 3, 7, 31, 100, 511, 513, 1271, 4099]


def call(kind, param, s, t, temperature):
    """The public per-row op for a kind."""
    return call_divergence(kdext, kind, param, s, t, temperature)


def check_against_reference(kind, param, s, t, temperature):
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    out = call(kind, param, s, t, temperature)
    assert out.shape == s.shape[:-1]
    assert out.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    sr = s.detach().double().requires_grad_()
    tr = t.detach().double().requires_grad_()
    ref = divergence(sr, tr, kind, param, temperature)
    torch.testing.assert_close(out.double(), ref, atol=divergence_atol(s, t, temperature), rtol=1e-5)

    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gs, gt = torch.autograd.grad(out, (s, t), upstream.to(out.dtype))
    gs_ref, gt_ref = torch.autograd.grad(ref, (sr, tr), upstream)
    assert gs.dtype == s.dtype and gt.dtype == t.dtype
    # Gradient entries carry the same float32 cancellation as the value (log
    # q_i - log p_i - c is a difference of numbers of size max|x/T|), times
    # the 1/T of the chain rule, plus the rounding to the input's dtype.
    atol_acc = divergence_atol(s, t, temperature) / temperature
    for got, want, dtype in ((gs, gs_ref, s.dtype), (gt, gt_ref, t.dtype)):
        atol, rtol = GRAD_TOL[dtype]
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=atol + atol_acc + rtol * scale, rtol=rtol)


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
@given(
    **logit_draws(ODD_VOCABS, min_dims=1, scales=(0.1, 1.0, 4.0)),
    sdtype=st.sampled_from(DTYPES),
    tdtype=st.sampled_from(DTYPES),
)
def test_matches_float64_reference(kind, param, seed, rows, vocab, sdtype, tdtype, temperature, scale, mask_frac):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(rows) + (vocab,)
    s = random_logits(gen, shape, sdtype, scale, mask_frac)
    t = random_logits(gen, shape, tdtype, scale, mask_frac if kind in FINITE_UNDER_MASKS else 0.0)
    # Tokens masked for the student are masked for the teacher too (banned or
    # padded tokens); only the kinds that stay finite also get masks of their
    # own on either side (+inf, the true value elsewhere, is tested separately).
    t = t.masked_fill(torch.isinf(s.float()), -math.inf)
    check_against_reference(kind, param, s, t, temperature)


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
@pytest.mark.parametrize("shape", [(41, 401, 1271)[1:], (2, 32000), (1, 128256)])
def test_large_and_odd_shapes(kind, param, shape):
    gen = torch.Generator().manual_seed(7)
    s = random_logits(gen, shape, torch.float32, 3.0, 0.1)
    t = random_logits(gen, shape, torch.bfloat16, 3.0, 0.0)
    t = t.masked_fill(torch.isinf(s), -math.inf)
    check_against_reference(kind, param, s, t, 1.0)


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
def test_gradcheck_float64(kind, param):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: call(kind, param, a, b, 1.7), (s, t))


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from(ODD_VOCABS), temperature=st.sampled_from([0.7, 1.0]))
def test_properties(kind, param, seed, vocab, temperature):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(5, vocab, generator=gen) * 3
    t = torch.randn(5, vocab, generator=gen) * 3
    atol = divergence_atol(s, t, temperature)
    d = call(kind, param, s, t, temperature)
    assert (d >= -atol).all(), "divergences are non-negative"
    torch.testing.assert_close(call(kind, param, s, s, temperature), torch.zeros(5), atol=atol, rtol=0)
    shift = torch.randn(5, 1, generator=gen) * 10
    torch.testing.assert_close(call(kind, param, s + shift, t - shift, temperature), d, atol=4 * atol, rtol=1e-4)
    if kind == "jsd" and param == 0.5:
        torch.testing.assert_close(call(kind, param, t, s, temperature), d, atol=atol, rtol=1e-5)
    if kind == "tvd":
        assert (d <= 1 + atol).all()
    # Gradients of a softmax-based function sum to zero over each row, up to
    # the per-entry float32 error (see check_against_reference) summed over q and p.
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    call(kind, param, sg, tg, temperature).sum().backward()
    grad_atol = 2 * atol / temperature
    torch.testing.assert_close(sg.grad.sum(-1), torch.zeros(5), atol=grad_atol, rtol=0)
    torch.testing.assert_close(tg.grad.sum(-1), torch.zeros(5), atol=grad_atol, rtol=0)


def test_jsd_endpoints_are_the_two_kls():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 33, generator=gen), torch.randn(4, 33, generator=gen)
    torch.testing.assert_close(kdext.jsd(s, t, beta=0.0), kdext.forward_kl(s, t))
    torch.testing.assert_close(kdext.jsd(s, t, beta=1.0), kdext.reverse_kl(s, t))


def test_skew_endpoints_and_underflowing_mixtures():
    """alpha = 1 mixes nothing in: exactly 0 with exactly zero gradients; alpha = 0 is the plain
    KL, +inf included where the mixed-in side masks a token the front side has. Peaked rows
    with masks put mixtures below float32's normal range next to ordinary ones in one vector,
    which the kernels form in log space."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 67, generator=gen) * 3, torch.randn(4, 67, generator=gen) * 3
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
        d = getattr(kdext, kind)(sg, tg, alpha=1.0)
        assert (d == 0).all(), kind
        d.sum().backward()
        assert (sg.grad == 0).all() and (tg.grad == 0).all(), kind
    torch.testing.assert_close(kdext.skew_forward_kl(s, t, alpha=0.0), kdext.forward_kl(s, t))
    torch.testing.assert_close(kdext.skew_reverse_kl(s, t, alpha=0.0), kdext.reverse_kl(s, t))
    ms, mt = s.clone(), t.clone()
    ms[0, 5] = -math.inf  # the teacher has this token, the student does not
    mt[1, 9] = -math.inf  # and the other way round
    assert kdext.skew_forward_kl(ms, mt, alpha=0.0)[0] == math.inf
    assert kdext.skew_reverse_kl(ms, mt, alpha=0.0)[1] == math.inf
    assert torch.isfinite(kdext.skew_forward_kl(ms, mt, alpha=0.1)).all()
    peaked = torch.Generator().manual_seed(4)
    ps = random_logits(peaked, (6, 1271), torch.float32, 60.0, 0.3)
    pt = random_logits(peaked, (6, 1271), torch.float32, 60.0, 0.3)
    for kind, param in (("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.3), ("jsd", 0.2)):
        check_against_reference(kind, param, ps, pt, 1.0)


def test_infinities_follow_the_contract():
    inf = math.inf
    s = torch.tensor([[0.0, 1.0, -inf], [0.0, 1.0, 2.0], [-inf, -inf, -inf], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 3.0], [0.0, -inf, 2.0], [0.0, 1.0, 2.0], [-inf, -inf, -inf]], requires_grad=True)
    kl = kdext.reverse_kl(s, t)
    ref = divergence(s.detach()[:2], t.detach()[:2], "reverse_kl")
    torch.testing.assert_close(kl[0].double(), ref[0])  # a masked student entry contributes 0
    assert kl[1] == inf  # q > 0 where the teacher is -inf: the true value is +inf
    assert torch.isnan(kl[2]) and torch.isnan(kl[3])  # rows without a distribution
    kl[[0, 2, 3]].sum().backward()
    assert torch.isfinite(s.grad[0]).all() and s.grad[0, 2] == 0
    assert (s.grad[2:] == 0).all() and (t.grad[2:] == 0).all()  # no distribution: zero gradient


def test_nan_poisons_only_its_row():
    s = torch.randn(3, 17, requires_grad=True)
    t = torch.randn(3, 17)
    with torch.no_grad():
        s[1, 4] = math.nan
    for kind, param in DIVERGENCE_CASES:
        s.grad = None
        d = call(kind, param, s, t, 1.0)
        assert torch.isnan(d[1]) and torch.isfinite(d[[0, 2]]).all(), kind
        d.sum().backward()
        assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2]]).all(), kind


def test_non_contiguous_and_leading_dims():
    gen = torch.Generator().manual_seed(5)
    base_s = torch.randn(3, 5, 40, generator=gen)
    base_t = torch.randn(40, 5, 3, generator=gen)
    s = base_s[:, 1:4, :]  # rows not collapsible into a view
    t = base_t.permute(2, 1, 0)[:, 1:4, :]  # last dim not unit-stride
    assert not s.is_contiguous() and t.stride(-1) != 1
    for kind, param in DIVERGENCE_CASES:
        check_against_reference(kind, param, s, t, 1.3)


def test_one_dimensional_input_gives_a_scalar():
    s, t = torch.randn(10), torch.randn(10)
    out = kdext.reverse_kl(s, t)
    assert out.shape == ()
    torch.testing.assert_close(out.double(), divergence(s, t, "reverse_kl"), atol=1e-6, rtol=1e-6)


def test_empty_rows():
    s = torch.randn(0, 7, requires_grad=True)
    out = kdext.reverse_kl(s, torch.randn(0, 7))
    assert out.shape == (0,)
    out.sum().backward()
    assert s.grad.shape == (0, 7)


def test_float64_accumulates_in_float64():
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    t = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    out = kdext.reverse_kl(s, t)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, divergence(s, t, "reverse_kl"), atol=1e-12, rtol=1e-12)


@pytest.mark.bigmem
def test_indexing_beyond_2_pow_31_elements():
    """rows x V > 2^31: the last rows must be read and written at the right place."""
    vocab = 131072
    rows = (1 << 31) // vocab + 2  # 16386 rows, 2^31 + 2^18 elements per tensor
    s = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    t = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tail_s = torch.randn(2, vocab, generator=gen).to(torch.bfloat16)
    tail_t = torch.randn(2, vocab, generator=gen).to(torch.bfloat16)
    s[-2:], t[-2:] = tail_s, tail_t
    kl = kdext.reverse_kl(s, t)
    ref = divergence(tail_s, tail_t, "reverse_kl")
    torch.testing.assert_close(kl[-2:].double(), ref, atol=divergence_atol(tail_s, tail_t, 1.0), rtol=1e-5)
    assert (kl[:-2] == 0).all()
    s.requires_grad_()
    kdext.distill_loss(s, t, reduction="sum").backward()
    sr = tail_s.double().requires_grad_()
    divergence(sr, tail_t, "reverse_kl").sum().backward()
    torch.testing.assert_close(s.grad[-2:].double(), sr.grad, atol=1e-6, rtol=8e-3)
    assert not s.grad[:-2].any()
