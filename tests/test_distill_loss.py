"""kdext.distill_loss: the fused loss + gradient, against float64 references."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdext
from reference import DIVERGENCE_CASES, GRAD_TOL, divergence, divergence_atol, divergence_kwargs, random_logits


def reference_loss(s, t, kind, param, temperature, keep, reduction):
    rows = divergence(s, t, kind, param, temperature)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if keep is None else keep.sum()
    return rows.sum() / count


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    vocab=st.sampled_from([1, 5, 64, 513, 1271]),
    sdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    tdtype=st.sampled_from([torch.float32, torch.bfloat16]),
    temperature=st.sampled_from([0.8, 1.0, 2.0]),
    reduction=st.sampled_from(["mean", "sum"]),
    use_labels=st.booleans(),
)
def test_fused_loss_matches_reference(kind, param, seed, rows, vocab, sdtype, tdtype, temperature, reduction,
                                      use_labels):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(rows) + (vocab,)
    s = random_logits(gen, shape, sdtype, 2.0, 0.0).requires_grad_()
    t = random_logits(gen, shape, tdtype, 2.0, 0.0)
    labels = None
    keep = None
    if use_labels:
        labels = torch.randint(0, vocab, shape[:-1], generator=gen)
        labels[torch.rand(shape[:-1], generator=gen) < 0.4] = -100
        labels.view(-1)[0] = 0  # at least one row counts
        keep = labels != -100
    loss = kdext.distill_loss(s, t, kind, labels=labels, temperature=temperature, reduction=reduction,
                              **divergence_kwargs(kind, param))
    assert loss.shape == () and loss.dtype == torch.float32
    sr = s.detach().double().requires_grad_()
    ref = reference_loss(sr, t, kind, param, temperature, keep, reduction)
    torch.testing.assert_close(loss.double(), ref, atol=divergence_atol(s, t, temperature), rtol=1e-5)
    loss.backward()
    ref.backward()
    assert s.grad.dtype == s.dtype
    atol, rtol = GRAD_TOL[s.dtype]
    atol += divergence_atol(s, t, temperature) / temperature / (1 if reduction == "sum" else max(1, shape[0]))
    torch.testing.assert_close(s.grad.double(), sr.grad, atol=atol + rtol * sr.grad.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
def test_fused_equals_unfused(kind, param):
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(3, 7, 300, generator=gen, requires_grad=True)
    t = torch.randn(3, 7, 300, generator=gen)
    labels = torch.randint(0, 300, (3, 7), generator=gen)
    labels[0, :3] = -100
    grads = []
    losses = []
    for fused in (True, False):
        s.grad = None
        loss = kdext.distill_loss(s, t, kind, labels=labels, fused=fused, **divergence_kwargs(kind, param))
        loss.backward()
        losses.append(loss)
        grads.append(s.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    assert (grads[0][0, :3] == 0).all()


def test_reduction_none_and_mask():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(6, 50, generator=gen, requires_grad=True)
    t = torch.randn(6, 50, generator=gen)
    mask = torch.tensor([True, False, True, True, False, True])
    rows = kdext.distill_loss(s, t, "forward_kl", mask=mask, reduction="none")
    assert rows.shape == (6,)
    torch.testing.assert_close(rows[mask], kdext.forward_kl(s, t)[mask])
    assert (rows[~mask] == 0).all()
    mean = kdext.distill_loss(s, t, "forward_kl", mask=mask)
    torch.testing.assert_close(mean, rows.sum() / 4)


@pytest.mark.parametrize("kind,param", DIVERGENCE_CASES)
def test_row_weights(kind, param):
    """weights multiply each row's value; mean still divides by the rows that count; weight 0 is
    an ignored row (no NaN leaks in); fused and unfused agree; weights that require grad get it."""
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(3, 5, 257, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, 257, generator=gen)
    w = torch.rand(3, 5, generator=gen) * 2 - 0.5  # negative weights too (advantages)
    w[0, 1] = 0.0
    w[1, 2] = 0.0  # a finite row of weight 0: dropped, yet d loss / d w is its value
    with torch.no_grad():
        s[0, 1] = math.nan  # weight 0: must not leak
    labels = torch.randint(0, 257, (3, 5), generator=gen)
    labels[2, :2] = -100
    keep = labels != -100
    kw = divergence_kwargs(kind, param)
    sr = s.detach().double()
    sr[0, 1] = 0.0  # its weight is 0: any finite row gives the reference
    sr.requires_grad_()
    per_row = divergence(sr, t, kind, param, 1.0)
    weighted = torch.where(keep & (w != 0), w.double() * per_row, torch.zeros((), dtype=torch.float64))
    for reduction in ("sum", "mean", "none"):
        ref = {"sum": weighted.sum(), "mean": weighted.sum() / keep.sum(), "none": weighted}[reduction]
        grads = []
        for fused in (True, False):
            s.grad = None
            got = kdext.distill_loss(s, t, kind, labels=labels, weights=w, reduction=reduction, fused=fused, **kw)
            torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
            got.sum().backward()
            assert torch.isfinite(s.grad).all() and (s.grad[0, 1] == 0).all() and (s.grad[2, :2] == 0).all()
            grads.append(s.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    sr.grad = None
    weighted.sum().backward()
    torch.testing.assert_close(grads[0].double(), sr.grad, atol=1e-6, rtol=1e-4)
    # Weights that require grad get d loss / d w_i = the row's value on the rows that count (0 for
    # the NaN row of weight 0).
    wg = w.clone().requires_grad_()
    kdext.distill_loss(s, t, kind, labels=labels, weights=wg, reduction="sum", **kw).backward()
    expect = torch.where(keep, per_row.detach(), torch.zeros((), dtype=torch.float64))
    expect[0, 1] = 0.0
    torch.testing.assert_close(wg.grad.double(), expect, atol=1e-5, rtol=1e-5)


def test_bad_weights():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    cases = [
        (dict(weights=torch.ones(2, 3, dtype=torch.int64)), TypeError, "weights must be a floating-point tensor"),
        (dict(weights=torch.ones(3, 2)), ValueError, r"weights must have shape \[2, 3\]"),
        (dict(weights=torch.ones(6)), ValueError, "weights must have shape"),
        (dict(weights=[1.0, 2.0]), TypeError, "weights must be a torch.Tensor"),
        (dict(weights=torch.ones(2, 3, device="meta")), RuntimeError, "weights is on meta"),
    ]
    for kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            kdext.distill_loss(s, t, **kw)


def test_teacher_gradient_falls_back_to_the_per_row_ops():
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(4, 40, generator=gen, requires_grad=True)
    t = torch.randn(4, 40, generator=gen, requires_grad=True)
    kdext.distill_loss(s, t, "jsd", beta=0.3).backward()
    sr, tr = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    divergence(sr, tr, "jsd", 0.3).mean().backward()
    torch.testing.assert_close(s.grad.double(), sr.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(t.grad.double(), tr.grad, atol=1e-7, rtol=1e-5)


def test_ignored_rows_never_leak_nan():
    s = torch.randn(4, 30, requires_grad=True)
    t = torch.randn(4, 30)
    with torch.no_grad():
        s[1] = math.nan
        s[2] = -math.inf
    labels = torch.tensor([3, -100, -100, 5])
    for fused in (True, False):
        s.grad = None
        loss = kdext.distill_loss(s, t, labels=labels, fused=fused)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(s.grad).all() and (s.grad[1:3] == 0).all()
    # A NaN row that is *not* ignored makes the loss NaN: never a silent finite number.
    assert torch.isnan(kdext.distill_loss(s, t))


def test_upstream_gradient_scales_the_fused_gradient():
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(5, 64, generator=gen, requires_grad=True)
    t = torch.randn(5, 64, generator=gen)
    kdext.distill_loss(s, t).backward()
    g1 = s.grad.clone()
    s.grad = None
    (3.5 * kdext.distill_loss(s, t)).backward()
    torch.testing.assert_close(s.grad, 3.5 * g1)


def test_backward_twice_through_the_fused_buffer_is_refused():
    s = torch.randn(2, 10, requires_grad=True)
    loss = kdext.distill_loss(s, torch.randn(2, 10))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        loss.backward()
    s.grad = None
    loss = kdext.distill_loss(s, torch.randn(2, 10), fused=False)
    loss.backward(retain_graph=True)
    loss.backward()


def test_backward_twice_through_a_scaled_fused_loss_is_refused():
    # A loss scaled by anything but 1 scales the buffer in place, which bumps its version:
    # the second backward must still raise kdext's message, not autograd's in-place error.
    s = torch.randn(2, 10, requires_grad=True)
    loss = 2.5 * kdext.distill_loss(s, torch.randn(2, 10))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        loss.backward()


def test_no_counted_rows():
    s = torch.randn(3, 10, requires_grad=True)
    labels = torch.full((3,), -100)
    for fused in (True, False):
        s.grad = None
        loss = kdext.distill_loss(s, torch.randn(3, 10), labels=labels, fused=fused)
        assert torch.isnan(loss)  # the mean of nothing, like F.cross_entropy
        loss.backward()
        assert (s.grad == 0).all(), "ignored rows get a zero gradient"
    loss = kdext.distill_loss(s, torch.randn(3, 10), labels=labels, reduction="sum")
    assert loss == 0
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("reduction, expected", [("mean", math.nan), ("sum", 0.0)])
def test_no_rows_has_one_answer_whether_or_not_the_student_needs_a_gradient(requires_grad, reduction, expected):
    # The fused path (student needs a gradient) and the per-row path agree on 0 rows: the mean
    # over no row is NaN (as F.cross_entropy's), the sum 0; the gradient is empty.
    s = torch.randn(0, 9, requires_grad=requires_grad)
    t = torch.randn(0, 9)
    loss = kdext.distill_loss(s, t, reduction=reduction)
    assert (math.isnan(float(loss)) if math.isnan(expected) else float(loss) == expected), float(loss)
    if requires_grad:
        loss.backward()
        assert s.grad.shape == (0, 9)
