"""The sparse family (stem: sparse): topk_logprobs and sparse_distill_loss against float64
references (tests/reference.py; the contract: docs/DESIGN.md, "the sparse family"), their edge
cases, torch.compile, and the CUDA kernels against the CPU where a device is visible. Their
error cases are in tests/test_errors.py, opcheck in tests/test_opcheck.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdext
from reference import DIVERGENCE_CASES, GRAD_TOL, JSD_ENDPOINTS, divergence_kwargs, log_domain_atol, sparse_divergence

ops = torch.ops.kdext
KINDS = DIVERGENCE_CASES + JSD_ENDPOINTS
TAILS = ("bucket", "renormalize")


# ---------------------------------------------------------------------------
# Stored teachers and tolerances
# ---------------------------------------------------------------------------


def make_teacher(gen, shape, k, temperature, store_dtype=torch.float32, pad_frac=0.0, top=True):
    """(ids, logprobs) of k stored tokens per row of a random teacher: its top k (top=True) or
    k random distinct ids; a fraction pad_frac of the slots set to -1."""
    V = shape[-1]
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    lt = torch.log_softmax(t / temperature, -1)
    if top:
        ids = lt.topk(k, -1).indices
    else:
        ids = torch.rand(shape, generator=gen).argsort(-1)[..., :k]
    logprobs = lt.gather(-1, ids)
    if pad_frac > 0:
        pad = torch.rand(ids.shape, generator=gen) < pad_frac
        ids = ids.masked_fill(pad, -1)
        logprobs = logprobs.masked_fill(pad, 0.0)  # ignored: any value
    return ids, logprobs.to(store_dtype)


def value_atol(s, temperature, lp):
    """Float32 accumulation error of a row value: the student's log-probabilities are off by
    log_domain_atol (lse, log Q_tail), and each term weighs them by at most (1 + |log-ratio|)."""
    finite = lp.double()[torch.isfinite(lp.double())]
    span = finite.abs().max().item() if finite.numel() else 0.0
    return log_domain_atol(s, temperature) * (2 + span)


# ---------------------------------------------------------------------------
# sparse_distill_loss against the reference
# ---------------------------------------------------------------------------


def reference_grad(s, ids, lp, kind, param, temperature, tail, weights, rows):
    """d sum_r w_r D_r / ds in float64 over the flat rows selected by `rows` (zeros elsewhere)."""
    V, k = s.shape[-1], ids.shape[-1]
    s2 = s.detach().double().reshape(-1, V)
    sub = s2[rows].clone().requires_grad_()
    out = torch.zeros_like(s2)
    if sub.shape[0] == 0:
        return out.reshape(s.shape)
    ref = sparse_divergence(sub, ids.reshape(-1, k)[rows], lp.reshape(-1, k)[rows], kind, param, temperature, tail)
    if ref.requires_grad:  # (not when every selected row is padding)
        (ref * weights.reshape(-1)[rows]).sum().backward()
        out[rows] = sub.grad
    return out.reshape(s.shape)


def check_values_and_grads(s, ids, lp, kind, param, temperature, tail, grad_weights=None):
    """sparse_forward values, their backward and the fused loss against the float64 reference.
    Rows whose reference is not finite (an outcome the teacher holds without student mass, a
    student without mass at the ids) must match it (inf / NaN) and get a zero gradient at weight 0."""
    ref = sparse_divergence(s.detach().double(), ids, lp, kind, param, temperature, tail)
    values, _ = ops.sparse_forward(s.detach(), ids, lp, kind, param, temperature, tail)
    f64 = s.dtype == torch.float64
    assert values.shape == s.shape[:-1] and values.dtype == (torch.float64 if f64 else torch.float32)
    atol = 1e-10 if f64 else value_atol(s, temperature, lp)
    torch.testing.assert_close(values.double(), ref, atol=atol, rtol=1e-9 if f64 else 1e-5, equal_nan=True)
    ok = torch.isfinite(ref)
    w = grad_weights if grad_weights is not None else torch.ones(ref.shape, dtype=torch.float64)
    w = torch.where(ok, w, 0.0)
    want = reference_grad(s, ids, lp, kind, param, temperature, tail, w, ok.reshape(-1))
    gatol, grtol = GRAD_TOL[s.dtype]
    gatol += atol / temperature
    for fused in (False, True):
        x = s.detach().clone().requires_grad_()
        if fused:
            loss, _ = ops.sparse_loss(x, ids, lp, w.to(values.dtype), kind, param, temperature, tail)
            torch.testing.assert_close(loss.double(), (torch.where(ok, ref, 0.0) * w).sum(),
                                       atol=atol * w.abs().sum().item() + 1e-12, rtol=1e-5)
        else:
            v, _ = ops.sparse_forward(x, ids, lp, kind, param, temperature, tail)
            loss = (torch.where(ok, v, 0.0) * w.to(v.dtype)).sum()
        loss.backward()
        assert x.grad.dtype == s.dtype
        torch.testing.assert_close(x.grad.double(), want, atol=gatol + grtol * want.abs().max().item(), rtol=grtol,
                                   msg=lambda m: f"fused={fused}: {m}")
    if tail == "renormalize":  # only the stored ids get a gradient
        stored = torch.zeros(s.shape, dtype=torch.long).scatter_add_(-1, ids.clamp_min(0).long(), (ids >= 0).long()) > 0
        assert (want[~stored] == 0).all() and (x.grad[~stored] == 0).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind,param", KINDS)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    vocab=st.sampled_from([1, 5, 64, 513, 1271]),
    k=st.sampled_from([1, 2, 7, 40]),
    sdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    store=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([0.7, 1.0, 2.0]),
    pad_frac=st.sampled_from([0.0, 0.3]),
    mask_frac=st.sampled_from([0.0, 0.2]),
    top=st.booleans(),
)
def test_matches_reference(kind, param, tail, seed, rows, vocab, k, sdtype, store, temperature, pad_frac, mask_frac,
                           top):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(rows) + (vocab,)
    ids, lp = make_teacher(gen, shape, min(k, vocab), temperature, store, pad_frac, top)
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if mask_frac > 0:  # -inf student logits, at stored ids too
        s = s.masked_fill(torch.rand(shape, generator=gen) < mask_frac, -math.inf)
        s[..., 0] = 0.5
    check_values_and_grads(s.to(sdtype), ids, lp, kind, param, temperature, tail)


@pytest.mark.parametrize("kind,param", KINDS)
def test_k_equal_to_vocab_is_the_dense_loss(kind, param):
    """With every id stored, tail="bucket" (and renormalize) is the dense distill_loss."""
    gen = torch.Generator().manual_seed(3)
    for V, T in ((1, 1.0), (37, 0.8), (600, 2.0)):
        s = (torch.randn(3, 2, V, generator=gen) * 2).requires_grad_()
        t = torch.randn(3, 2, V, generator=gen) * 2
        ids, lp, _ = kdext.topk_logprobs(t, V, T)
        labels = torch.tensor([[1, -100], [2, 3], [-100, 4]])
        dense = kdext.distill_loss(s, t, kind, labels=labels, temperature=T, **divergence_kwargs(kind, param))
        dense.backward()
        g_dense = s.grad.clone()
        for tail in TAILS:
            s.grad = None
            loss = kdext.sparse_distill_loss(s, ids, lp, kind, tail, labels=labels, temperature=T,
                                             **divergence_kwargs(kind, param))
            loss.backward()
            torch.testing.assert_close(loss, dense, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(s.grad, g_dense, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind,param", KINDS)
def test_k1_padding_and_shuffled_slots(kind, param, tail):
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 3, 90, generator=gen, dtype=torch.float64)
    ids, lp = make_teacher(gen, s.shape, 1, 1.3)
    check_values_and_grads(s, ids, lp, kind, param, 1.3, tail)
    # Slot order does not matter; -1 slots anywhere are ignored.
    ids, lp = make_teacher(gen, s.shape, 6, 1.3, torch.float64, pad_frac=0.4)
    perm = torch.randperm(6, generator=gen)
    v1, _ = ops.sparse_forward(s, ids, lp, kind, param, 1.3, tail)
    v2, _ = ops.sparse_forward(s, ids[..., perm], lp[..., perm], kind, param, 1.3, tail)
    torch.testing.assert_close(v1, v2, atol=1e-12, rtol=1e-12)
    check_values_and_grads(s, ids, lp, kind, param, 1.3, tail, grad_weights=torch.rand(4, 3, generator=gen,
                                                                                          dtype=torch.float64))


def test_tail_mass_without_cancellation():
    """The ids hold all but ~1e-10 of the student's mass: Q_tail is summed over the complement
    (1 - sum q would be 0 or rounding noise in float32), so forward KL's tail term is exact."""
    V, k = 5000, 8
    s = torch.zeros(2, V)
    s[:, :k] = 30.0  # the rest holds (V - k) e^-30 / (k + ...) ~ 6e-11 of the mass
    ids = torch.arange(k).expand(2, k).contiguous()
    lp = torch.full((2, k), math.log(0.99 / k))  # P_tail = 0.01
    for tail_kind in ("forward_kl", "jsd", "tvd", "skew_forward_kl"):
        got, stats = ops.sparse_forward(s, ids, lp, tail_kind, 0.5 if tail_kind == "jsd" else 0.1, 1.0, "bucket")
        want = sparse_divergence(s, ids, lp, tail_kind, 0.5 if tail_kind == "jsd" else 0.1, 1.0, "bucket")
        torch.testing.assert_close(got.double(), want, atol=0, rtol=2e-6)
    q_tail = (V - k) * math.exp(-30) / (k + (V - k) * math.exp(-30))
    assert stats[:, 2].double().exp().sub(q_tail).abs().max() < 1e-6 * q_tail


def test_stored_mass_over_one_is_renormalised():
    """Rounded log-probs whose mass sums past 1: P = p / S and no tail mass. Reverse KL is then
    infinite wherever the student has tail mass (as for any P_a = 0 < Q_a); the others are finite."""
    s = torch.randn(3, 50, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2], [5, 6, -1], [7, 8, 9]])
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.21], [0.6, 0.5, 0.0], [0.2, 0.2, 0.2]], dtype=torch.float64))
    for kind, param in KINDS:
        got, _ = ops.sparse_forward(s, ids, lp, kind, param, 1.0, "bucket")
        want = sparse_divergence(s, ids, lp, kind, param, 1.0, "bucket")
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        reverse = kind == "reverse_kl" or (kind == "jsd" and param == 1.0)
        assert torch.equal(torch.isfinite(got), torch.tensor([not reverse, not reverse, True]))
    # Exactly the renormalised distributions over the ids plus an empty tail.
    got = ops.sparse_forward(s[:1], ids[:1], lp[:1], "forward_kl", 0.0, 1.0, "bucket")[0]
    p = torch.tensor([0.5, 0.3, 0.21], dtype=torch.float64) / 1.01
    q = torch.softmax(s[0], -1)
    want = (p * (p.log() - q[:3].log())).sum()
    torch.testing.assert_close(got[0], want, atol=1e-12, rtol=1e-12)


def test_infinite_divergences():
    """P_a > 0 where the student has no mass: forward KL is +inf; reverse KL with P_tail = 0
    and Q_tail > 0 is +inf; both rows stay rows (not NaN)."""
    s = torch.randn(2, 20)
    s[0, 3] = -math.inf
    ids = torch.tensor([[3, 4], [1, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    fkl, _ = ops.sparse_forward(s, ids, lp, "forward_kl", 0.0, 1.0, "bucket")
    assert fkl[0] == math.inf and torch.isfinite(fkl[1])
    over = torch.log(torch.tensor([[0.6, 0.6], [0.6, 0.6]]))  # stored mass > 1: no tail mass
    rkl, _ = ops.sparse_forward(s, ids, over, "reverse_kl", 0.0, 1.0, "bucket")
    assert (rkl == math.inf).all()  # no tail mass in the teacher, some in the student
    assert torch.isfinite(ops.sparse_forward(s, ids, over, "reverse_kl", 0.0, 1.0, "renormalize")[0][1])


@pytest.mark.parametrize("tail", TAILS)
def test_row_classes(tail):
    """Padding rows (no valid id): value 0, gradient 0; empty rows (no student mass): NaN, 0;
    poisoned rows (NaN logit): NaN, NaN; any of them ignored by labels: gradient 0."""
    s = torch.randn(5, 30)
    s[1] = -math.inf
    s[2, 7] = math.nan
    s[3, 4] = math.nan  # padding row with a NaN
    ids = torch.tensor([[1, 2], [1, 2], [7, 9], [-1, -1], [5, -1]])
    lp = torch.log(torch.full((5, 2), 0.3))
    v, _ = ops.sparse_forward(s, ids, lp, "forward_kl", 0.0, 1.0, tail)
    assert torch.isfinite(v[0]) and v[3] == 0 and torch.isfinite(v[4])
    assert torch.isnan(v[1]) and torch.isnan(v[2])
    g = ops.sparse_backward(torch.ones(5), s, ids, lp, ops.sparse_forward(s, ids, lp, "forward_kl", 0.0, 1.0, tail)[1],
                            "forward_kl", 0.0, 1.0, tail)
    assert (g[1] == 0).all() and torch.isnan(g[2]).all() and (g[3] == 0).all() and torch.isfinite(g[0]).all()
    x = s.clone().requires_grad_()
    labels = torch.tensor([0, -100, -100, 0, 0])
    for fused in (True, False):
        x.grad = None
        loss = kdext.sparse_distill_loss(x, ids, lp, tail=tail, labels=labels, fused=fused)
        loss.backward()
        torch.testing.assert_close(loss, v[[0, 4]].mean())  # row 3 (padding) is not counted
        assert torch.isfinite(x.grad).all() and (x.grad[1:4] == 0).all()
    rows = kdext.sparse_distill_loss(x, ids, lp, tail=tail, labels=labels, reduction="none")
    assert rows[3] == 0 and rows[1] == 0 and rows[2] == 0
    assert torch.isnan(kdext.sparse_distill_loss(x, ids, lp, tail=tail))


def test_renormalize_reads_only_the_ids():
    s = torch.randn(2, 40)
    ids = torch.tensor([[3, 9, 1], [0, 2, -1]])
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.1], [0.5, 0.1, 0.0]]))
    v, _ = ops.sparse_forward(s, ids, lp, "jsd", 0.5, 1.0, "renormalize")
    s2 = s.clone()
    s2[:, 20:] = math.nan  # not read
    s2[:, 5] = 100.0
    torch.testing.assert_close(ops.sparse_forward(s2, ids, lp, "jsd", 0.5, 1.0, "renormalize")[0], v)


# ---------------------------------------------------------------------------
# Loss reduction semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,param", [("forward_kl", 0.0), ("jsd", 0.3), ("skew_reverse_kl", 0.2)])
def test_labels_mask_weights_reductions(kind, param):
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(3, 5, 77, generator=gen, requires_grad=True)
    ids, lp = make_teacher(gen, s.shape, 9, 1.0, pad_frac=0.2)
    ids[0, 4] = -1  # a padding row
    labels = torch.randint(0, 77, (3, 5), generator=gen)
    labels[1, :2] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3] = False
    w = torch.rand(3, 5, generator=gen) - 0.2
    w[2, 0] = 0.0
    keep = (labels != -100) & mask & (ids >= 0).any(-1)
    kw = divergence_kwargs(kind, param)
    sr = s.detach().double().requires_grad_()
    per_row = sparse_divergence(sr, ids, lp, kind, param, 1.0, "bucket")
    weighted = torch.where(keep, w.double() * per_row, torch.zeros((), dtype=torch.float64))
    refs = {"sum": weighted.sum(), "mean": weighted.sum() / keep.sum(), "none": weighted,
            "num_items": weighted.sum() / 17}
    for name, ref in refs.items():
        red, extra = ("mean", {"num_items": 17}) if name == "num_items" else (name, {})
        grads = []
        for fused in (True, False):
            s.grad = None
            got = kdext.sparse_distill_loss(s, ids, lp, kind, labels=labels, mask=mask, weights=w, reduction=red,
                                            fused=fused, **kw, **extra)
            torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
            got.sum().backward()
            grads.append(s.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
        sr.grad = None
        ref.sum().backward(retain_graph=True)
        torch.testing.assert_close(grads[0].double(), sr.grad, atol=1e-6, rtol=1e-4)
    # num_items as a tensor; the upstream gradient scales the fused gradient.
    s.grad = None
    (2.5 * kdext.sparse_distill_loss(s, ids, lp, kind, num_items=torch.tensor(17.0), **kw)).backward()
    g = s.grad.clone()
    s.grad = None
    kdext.sparse_distill_loss(s, ids, lp, kind, num_items=17, **kw).backward()
    torch.testing.assert_close(g, 2.5 * s.grad)


def test_no_counted_rows_and_backward_twice():
    s = torch.randn(3, 10, requires_grad=True)
    ids = torch.full((3, 2), -1)
    lp = torch.zeros(3, 2)
    loss = kdext.sparse_distill_loss(s, ids, lp)
    assert torch.isnan(loss)  # the mean of nothing
    loss.backward()
    assert (s.grad == 0).all()
    ids = torch.tensor([[1, 2]] * 3)
    loss = kdext.sparse_distill_loss(s, ids, lp - 2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        loss.backward()


@pytest.mark.parametrize("fused", [True, False])
def test_zero_rows(fused):
    """No row at all: mean NaN (as distill_loss and F.cross_entropy), sum 0, none empty; empty gradients."""
    s = torch.randn(0, 7, requires_grad=True)
    ids, lp = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    assert torch.isnan(kdext.sparse_distill_loss(s, ids, lp, fused=fused))
    loss = kdext.sparse_distill_loss(s, ids, lp, reduction="sum", fused=fused)
    assert loss == 0
    loss.backward()
    assert s.grad.shape == (0, 7)
    assert kdext.sparse_distill_loss(s, ids, lp, reduction="none", fused=fused).shape == (0,)
    out = kdext.topk_logprobs(torch.randn(0, 5), 2)
    assert [tuple(o.shape) for o in out] == [(0, 2), (0, 2), (0,)]


# ---------------------------------------------------------------------------
# topk_logprobs
# ---------------------------------------------------------------------------


def check_topk(x, k, temperature):
    ids, lp, lse = kdext.topk_logprobs(x, k, temperature)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert ids.dtype == torch.int32 and lp.dtype == acc and lse.dtype == acc
    assert ids.shape == x.shape[:-1] + (k,) and lse.shape == x.shape[:-1]
    # The order: descending value, ties by lower id (a stable descending sort of the logits).
    want = torch.sort(x.to(acc), dim=-1, descending=True, stable=True)
    finite = want.values > -math.inf
    want_ids = torch.where(finite, want.indices, -1)[..., :k]
    assert torch.equal(ids.long(), want_ids)
    # Values exactly as kdext.log_softmax / kdext.logsumexp compute them.
    assert torch.equal(lse, kdext.logsumexp(x, temperature))
    gathered = kdext.log_softmax(x.to(acc), temperature).gather(-1, ids.long().clamp_min(0))
    assert torch.equal(lp, torch.where(ids >= 0, gathered, -math.inf))
    return ids, lp, lse


@given(seed=st.integers(0, 2**31 - 1), rows=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       vocab=st.sampled_from([1, 7, 512, 1271, 5000]), k=st.sampled_from([1, 3, 64, 1100]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       temperature=st.sampled_from([0.5, 1.0, 1.7]))
def test_topk_logprobs_random(seed, rows, vocab, k, dtype, temperature):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tuple(rows) + (vocab,), generator=gen) * 3).to(dtype)
    k = min(k, vocab)
    ids, lp, lse = check_topk(x, k, temperature)
    if dtype == torch.float32:  # torch.topk: the same values, and the same ids in rows without ties
        v, i = torch.topk(x, k)
        assert torch.equal(x.gather(-1, ids.long()), v)
        flat_x, flat_ids, flat_i = x.reshape(-1, vocab), ids.reshape(-1, k).long(), i.reshape(-1, k)
        for r in range(flat_x.shape[0]):
            if torch.unique(flat_x[r]).numel() == vocab:
                assert torch.equal(flat_ids[r], flat_i[r])
        want = v.double() / temperature - torch.logsumexp(x.double() / temperature, -1, keepdim=True)
        torch.testing.assert_close(lp.double(), want, atol=log_domain_atol(x, temperature), rtol=0)


def test_topk_logprobs_ties_and_orders():
    gen = torch.Generator().manual_seed(1)
    # Integer logits: many ties; ascending, descending and constant rows.
    x = torch.randint(-3, 3, (4, 3000), generator=gen).float()
    x[1] = torch.arange(3000.0)  # every entry beats the threshold: the buffer is cut again and again
    x[2] = -torch.arange(3000.0)
    x[3] = 1.0
    for k in (1, 5, 1024, 1025, 2999, 3000):
        check_topk(x, k, 1.0)
        check_topk(x.bfloat16(), k, 0.9)
    # torch.topk's values agree on tied rows too (its ids may pick either of equal entries).
    ids, lp, _ = kdext.topk_logprobs(x, 64)
    v, _ = torch.topk(x, 64)
    torch.testing.assert_close(lp, torch.log_softmax(x, -1).gather(-1, ids.long()), atol=1e-6, rtol=0)
    assert torch.equal(x.gather(-1, ids.long()), v)


def test_topk_logprobs_masked_and_poisoned_rows():
    x = torch.randn(5, 300)
    x[0, 10:] = -math.inf  # 10 finite entries
    x[1] = -math.inf  # nothing: lse -inf, all slots empty
    x[2, 5] = math.nan
    x[3, 9] = math.inf
    x[4, ::2] = -math.inf
    ids, lp, lse = kdext.topk_logprobs(x, 20)
    assert (ids[0, 10:] == -1).all() and (lp[0, 10:] == -math.inf).all() and (ids[0, :10] >= 0).all()
    assert (ids[1] == -1).all() and (lp[1] == -math.inf).all() and lse[1] == -math.inf
    assert torch.isnan(lp[2]).all() and torch.isnan(lse[2]) and (ids[2] != 5).all() and (ids[2] >= 0).all()
    assert torch.isnan(lp[3]).all() and ids[3, 0] == 9
    assert (ids[4] % 2 == 1).all()
    check_topk(x[[0, 1, 4]], 20, 1.0)
    # A NaN does not hide the entries that share its SIMD lane and block (the CPU skips blocks by
    # their lane-wise maxima): the ids stay the best entries that are not NaN.
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        y = torch.randn(2, 3000) * 0.1
        y[:, 1027] = math.nan
        y[0, 1043] = 100.0  # the same lane of the next vector: 16 float / 8 double lanes apart
        y[1, 1035] = 100.0
        y[1, 2050] = math.nan
        y[1, 2051] = 50.0
        got_ids, got_lp, _ = kdext.topk_logprobs(y.to(dtype), 2)
        want = torch.sort(torch.nan_to_num(y.to(dtype).float(), nan=-math.inf), dim=-1, descending=True, stable=True)
        assert torch.equal(got_ids.long(), want.indices[:, :2]), (dtype, got_ids)
        assert torch.isnan(got_lp).all()
    # Stored as is, the loss treats the empty slots as padding.
    assert torch.isfinite(kdext.sparse_distill_loss(torch.randn(5, 300)[[0, 4]], ids[[0, 4]], lp[[0, 4]]))


def test_topk_logprobs_gradient_large_logits():
    """log q comes from the float64 lse split into two floats: the gradient keeps float32 precision at
    |logits| ~ 1e4, where a float32 lse alone (ulp 1e-3) would be off by ~1e-3 relative."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 700, generator=gen) * 3 + 1e4).requires_grad_()
    ids, lp, lse = kdext.topk_logprobs(x, 8)
    g1, g2 = torch.randn(lp.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    ((lp * g1).sum() + (lse * g2).sum()).backward()
    xr = x.detach().double().requires_grad_()
    lpr = torch.log_softmax(xr, -1).gather(-1, ids.long())
    ((lpr * g1.double()).sum() + (torch.logsumexp(xr, -1) * g2.double()).sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6 * xr.grad.abs().max().item(), rtol=1e-5)


def test_topk_logprobs_gradient_row_contract():
    """Empty rows get zeros, Poisoned rows NaN, and a zero upstream gradient zeros even for a Poisoned row."""
    x = torch.randn(3, 40)
    x[1] = -math.inf
    x[2, 3] = math.nan
    x.requires_grad_()
    ids, lp, lse = kdext.topk_logprobs(x, 4)
    (torch.where(ids >= 0, lp, 0.0).sum() + lse[:2].sum() + 0.0 * lse[2]).backward()
    assert torch.isfinite(x.grad[0]).all() and (x.grad[1] == 0).all() and torch.isnan(x.grad[2]).all()
    x.grad = None
    ids, lp, lse = kdext.topk_logprobs(x, 4)
    (lp[2] * 0.0).sum().backward()
    assert (x.grad == 0).all()


def test_topk_logprobs_gradient():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 50, generator=gen, dtype=torch.float64)
    x[0, 0, 45:] = -math.inf
    x = x.requires_grad_()
    ids, lp, lse = kdext.topk_logprobs(x, 8, 1.4)
    g1, g2 = torch.randn(lp.shape, generator=gen, dtype=torch.float64), torch.randn(lse.shape, generator=gen,
                                                                                     dtype=torch.float64)
    ((torch.where(ids >= 0, lp, 0.0) * g1).sum() + (lse * g2).sum()).backward()
    xr = x.detach().clone().requires_grad_()
    lpr = torch.log_softmax(xr / 1.4, -1).gather(-1, ids.long())
    ((lpr * g1).sum() + (torch.logsumexp(xr / 1.4, -1) * g2).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------
# torch.compile (errors: tests/test_errors.py; opcheck: tests/test_opcheck.py)
# ---------------------------------------------------------------------------


def test_compile_fullgraph():
    def loss_fn(s, ids, lp, labels):
        return kdext.sparse_distill_loss(s, ids, lp, "jsd", labels=labels, temperature=1.5, beta=0.3)

    def topk_fn(t):
        ids, lp, lse = kdext.topk_logprobs(t, 6, 1.5)
        return ids, lp, lse, lp.sum() + lse.sum()

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 33, generator=gen) * 2
    t = torch.randn(2, 5, 33, generator=gen) * 2
    labels = torch.randint(0, 33, (2, 5), generator=gen)
    labels[0, 1] = -100
    compiled_topk = torch.compile(topk_fn, fullgraph=True)
    tc, te = t.clone().requires_grad_(), t.clone().requires_grad_()
    ids, lp, lse, total = compiled_topk(tc)
    eager = topk_fn(te)
    assert torch.equal(ids, eager[0]) and torch.equal(lp, eager[1]) and torch.equal(lse, eager[2])
    total.backward()
    eager[3].backward()
    torch.testing.assert_close(tc.grad, te.grad, rtol=1e-5, atol=1e-6)
    ids, lp = ids.detach(), lp.detach()
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (compiled, loss_fn):
        x = s.clone().requires_grad_()
        out = fn(x, ids, lp, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=4 * 2**-24 * results[1][1].abs().max().item())
    assert (results[0][1][0, 1] == 0).all()


# ---------------------------------------------------------------------------
# CUDA against the CPU (runs where a device is visible)
# ---------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,k", [((3, 5), 2), ((7, 1), 1), ((5, 1271), 64), ((2, 128256), 64), ((4, 3000), 1024),
                                     ((3, 3000), 2000), ((2, 3, 4099), 17)])
def test_cuda_topk_logprobs_matches_cpu(shape, k, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x.view(-1, shape[-1])[0, : shape[-1] // 2] = -math.inf
    if shape[0] > 2:
        x.view(-1, shape[-1])[1, 0] = math.nan
        x.view(-1, shape[-1])[2] = torch.randint(-2, 2, (shape[-1],), generator=gen).to(dtype)  # ties
    got = [y.cpu() for y in kdext.topk_logprobs(x.cuda(), k, 1.3)]
    want = kdext.topk_logprobs(x, k, 1.3)
    assert torch.equal(got[0], want[0])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol)
    torch.testing.assert_close(got[2], want[2], atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind,param", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_sparse_loss_matches_cpu(kind, param, tail, dtype):
    gen = torch.Generator().manual_seed(12)
    for shape, k in (((3, 5), 2), ((4, 1271), 40), ((2, 128256), 64), ((3, 2, 300), 300)):
        s = (torch.randn(shape, generator=gen) * 2).to(dtype)
        ids, lp = make_teacher(gen, shape, k, 1.0, pad_frac=0.2)
        rows = s.view(-1, shape[-1])
        if rows.shape[0] > 2:
            rows[1] = -math.inf
            rows[2, 3] = math.nan
        w = torch.rand(shape[:-1], generator=gen)
        args = (ids, lp, kind, param, 1.1, tail)
        v_cpu, st_cpu = ops.sparse_forward(s, *args)
        v_gpu, st_gpu = ops.sparse_forward(s.cuda(), ids.cuda(), lp.cuda(), kind, param, 1.1, tail)
        tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
        torch.testing.assert_close(v_gpu.cpu(), v_cpu, **tol, equal_nan=True)
        torch.testing.assert_close(st_gpu.cpu(), st_cpu, **tol, equal_nan=True)
        g = torch.randn(shape[:-1], generator=gen)
        g_cpu = ops.sparse_backward(g, s, ids, lp, st_cpu, kind, param, 1.1, tail)
        g_gpu = ops.sparse_backward(g.cuda(), s.cuda(), ids.cuda(), lp.cuda(), st_gpu, kind, param, 1.1, tail)
        gtol = dict(atol=1e-12, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-6, rtol=1.6e-2)
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, **gtol, equal_nan=True)
        l_cpu, gl_cpu = ops.sparse_loss(s, ids, lp, w, kind, param, 1.1, tail)
        l_gpu, gl_gpu = ops.sparse_loss(s.cuda(), ids.cuda(), lp.cuda(), w.cuda(), kind, param, 1.1, tail)
        torch.testing.assert_close(l_gpu.cpu(), l_cpu, **tol, equal_nan=True)
        torch.testing.assert_close(gl_gpu.cpu(), gl_cpu, **gtol, equal_nan=True)


@cuda
def test_cuda_bad_ids_give_nan_rows():
    s = torch.randn(3, 10, device="cuda")
    ids = torch.tensor([[0, 1, 2], [3, 3, 4], [5, 6, 10]], device="cuda")
    v, _ = ops.sparse_forward(s, ids, torch.zeros(3, 3, device="cuda") - 2, "tvd", 0.0, 1.0, "bucket")
    assert torch.isfinite(v[0]) and torch.isnan(v[1:]).all()


@pytest.mark.skipif(not kdext.BUILD_INFO["cuda"], reason="a build without the CUDA kernels")
def test_cuda_kernels_are_registered():
    """A CUDA build registers every sparse op's CUDA kernel (they compile here, without a GPU)."""
    for op in ("topk_logprobs", "sparse_forward", "sparse_backward", "sparse_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kdext::{op}", "CUDA"), op
