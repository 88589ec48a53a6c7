"""kdext.top_p_sample against a float64, sort-based reference of the sampling contract (docs/DESIGN.md).

Statistical tests draw many rows of the same logits in one call (one draw per row) with fixed
seeds, so they are deterministic; the chi-square p-value is computed here (no scipy). Hypothesis
settings come from the profile of tests/conftest.py (HYPOTHESIS_PROFILE), the devices from its
``device`` fixture.
"""

import math
import re
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdext  # noqa: F401
from kdext.top_p_sample import SampleResult, top_p_sample
from reference import PHILOX_KNOWN_ANSWERS, philox4x32_10

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA device")

# Relative slack on top_p for the float32 kernel vs the float64 reference: a token whose
# mass-above lies within this of the cut may go either way.
P_SLACK = 1e-4
# Relative difference below which two probabilities may be ordered either way in float32.
R_SLACK = 1e-5


# ---------------------------------------------------------------------------------------------
# float64 reference (sorts, unlike the kernel)
# ---------------------------------------------------------------------------------------------
FLT_MIN = torch.finfo(torch.float32).tiny


def ref_mixture(logits, teacher, temperature, alpha):
    """r in float64; probabilities below float32's normal range count as 0 (the contract's
    float32 r, see csrc/include/kdext/top_p.h mixture_prob)."""
    q = torch.softmax(logits.double() / temperature, -1)
    if alpha == 0.0:
        r = q
    else:
        p = torch.softmax(teacher.double() / temperature, -1)
        r = p if alpha == 1.0 else (1 - alpha) * q + alpha * p
    return torch.where(r >= FLT_MIN, r, torch.zeros_like(r))


def _above(r, keep, rel=0.0):
    """Per entry i: (mass, count) of the kept entries of its row greater than r_i.

    rel = 0: strictly greater (the contract). rel > 0: greater than r_i (1 + rel), i.e. near-ties
    count as ties. rel < 0: greater than r_i (1 + rel) but not equal, i.e. near-ties count as
    greater. A float32 kernel may order values within ~1e-6 of each other either way.
    """
    vals = torch.where(keep, r, torch.zeros_like(r))
    a, _ = torch.sort(vals, dim=-1)  # ascending
    suffix = torch.cat([a.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(a[..., :1])], -1)
    n = a.shape[-1]
    idx = torch.searchsorted(a, (r * (1 + rel)).contiguous(), right=True)
    mass, count = suffix.gather(-1, idx), (n - idx).to(r.dtype)
    if rel < 0:
        hi = torch.searchsorted(a, r.contiguous(), right=True)
        lo = torch.searchsorted(a, r.contiguous(), right=False)
        eq = (hi - lo).to(r.dtype)
        mass, count = mass - eq * r, count - eq
    return mass, count


def ref_allowed(r, top_p, top_k, rel=0.0):
    """The contract's kept set for rows of r (float64): (mask, threshold, kept mass)."""
    pos = r > 0
    keep = pos.clone()
    if top_k > 0:
        _, count_gt = _above(r, pos, rel)
        keep &= count_gt < top_k
    mass_k = torch.where(keep, r, torch.zeros_like(r)).sum(-1, keepdim=True)
    if top_p < 1.0:
        mass_gt, _ = _above(r, keep, rel)
        keep &= mass_gt < top_p * mass_k
    thr = torch.where(keep, r, torch.full_like(r, math.inf)).min(-1).values
    mass = torch.where(keep, r, torch.zeros_like(r)).sum(-1)
    return keep, thr, mass


def ref_bounds(r, top_p, top_k):
    """(narrow, wide) kept sets, each (mask, threshold, mass), between which a float32 kernel's
    must lie: top_p * (1 -/+ P_SLACK) and near-ties (within R_SLACK) counted as greater / as ties."""
    if top_p == 1.0:
        return ref_allowed(r, 1.0, top_k, -R_SLACK), ref_allowed(r, 1.0, top_k, R_SLACK)
    return (ref_allowed(r, top_p * (1 - P_SLACK), top_k, -R_SLACK),
            ref_allowed(r, min(1.0, top_p * (1 + P_SLACK)), top_k, R_SLACK))


def check_against_reference(res, logits, teacher, top_p, top_k, temperature, alpha, atol=2e-5):
    """Every invariant of one call's result that the float64 reference pins down."""
    V = logits.shape[-1]
    x = logits.detach().cpu().reshape(-1, V)
    t = None if teacher is None else teacher.detach().cpu().reshape(-1, V)
    r = ref_mixture(x, t, temperature, alpha)
    (keep_n, thr_n, mass_n), (keep_w, thr_w, mass_w) = ref_bounds(r, top_p, top_k)
    tok = res.tokens.cpu().reshape(-1)
    rows = torch.arange(tok.numel())
    assert (tok >= 0).all() and (tok < V).all()
    assert keep_w[rows, tok].all(), "a token outside the allowed set was drawn"
    assert (r[rows, tok] > 0).all()
    thr = res.threshold.cpu().reshape(-1).double()
    assert (thr >= thr_w * (1 - 1e-5)).all() and (thr <= thr_n * (1 + 1e-5)).all(), (thr, thr_w, thr_n)
    # The threshold is a value of the row: some kept token has r == threshold.
    close = (r - thr[:, None]).abs() <= 1e-5 * thr[:, None]
    assert close.any(-1).all()
    ls = torch.log_softmax(x.double() / temperature, -1)[rows, tok]
    torch.testing.assert_close(res.student_logprob.cpu().reshape(-1).double(), ls, atol=atol, rtol=1e-5)
    if t is not None:
        lt = torch.log_softmax(t.double() / temperature, -1)[rows, tok]
        torch.testing.assert_close(res.teacher_logprob.cpu().reshape(-1).double(), lt, atol=atol, rtol=1e-5)
    else:
        assert torch.isnan(res.teacher_logprob).all()
    # Sample log-prob: log(r_tok / M), M the mass of {r >= threshold}. Values within 1e-5 of the
    # threshold may sit on either side of it in float32: M must lie between the two masses.
    got = res.sample_logprob.cpu().reshape(-1).double()
    lr = torch.log(r[rows, tok])
    m_ours = torch.exp(lr - got)
    m_lo = torch.where(r >= thr[:, None] * (1 + 1e-5), r, torch.zeros_like(r)).sum(-1)
    m_hi = torch.where(r >= thr[:, None] * (1 - 1e-5), r, torch.zeros_like(r)).sum(-1)
    assert ((m_ours >= m_lo * (1 - 2e-5)) & (m_ours <= m_hi * (1 + 2e-5))).all(), (m_ours, m_lo, m_hi)
    assert (got <= 1e-6).all()


# ---------------------------------------------------------------------------------------------
# chi-square goodness of fit (regularized incomplete gamma, Numerical Recipes 6.2)
# ---------------------------------------------------------------------------------------------
def gamma_q(a, x):
    """Upper regularized incomplete gamma Q(a, x) = P(chi2_{2a} > 2x)."""
    if x <= 0:
        return 1.0
    gln = math.lgamma(a)
    if x < a + 1:  # series for P
        ap, s, d = a, 1.0 / a, 1.0 / a
        for _ in range(10000):
            ap += 1
            d *= x / ap
            s += d
            if abs(d) < abs(s) * 1e-15:
                break
        return 1.0 - s * math.exp(-x + a * math.log(x) - gln)
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)  # Lentz continued fraction for Q
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - gln) * h


def chi2_pvalue(observed, probs):
    """p-value of observed counts against probs; cells with expected count < 5 are pooled."""
    n = observed.sum().item()
    expected = probs * n
    big = expected >= 5
    obs = observed[big].tolist() + [observed[~big].sum().item()]
    exp = expected[big].tolist() + [expected[~big].sum().item()]
    if exp[-1] < 5:  # fold a small pooled cell into the smallest big one
        j = min(range(len(exp) - 1), key=lambda i: exp[i])
        obs[j] += obs.pop()
        exp[j] += exp.pop()
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return gamma_q((len(exp) - 1) / 2.0, stat / 2.0)


def test_chi2_pvalue_helper():
    assert gamma_q(0.5, 3.841459 / 2) == pytest.approx(0.05, rel=1e-4)
    assert gamma_q(5.0, 18.307038 / 2) == pytest.approx(0.05, rel=1e-4)
    assert gamma_q(50.0, 124.342 / 2) == pytest.approx(0.05, rel=1e-3)
    assert gamma_q(2.0, 0.0) == 1.0


def filtered_probs(r, top_p, top_k):
    keep, _, mass = ref_allowed(r[None], top_p, top_k)
    return torch.where(keep[0], r, torch.zeros_like(r)) / mass[0]


CHI2_SETTINGS = [
    # alpha, temperature, top_k, top_p
    (0.0, 1.0, 0, 1.0),
    (0.0, 1.0, 0, 0.8),
    (0.2, 0.7, 0, 0.9),
    (0.5, 1.5, 12, 0.95),
    (1.0, 1.0, 6, 1.0),
    (0.3, 1.0, 20, 0.6),
]


@pytest.mark.parametrize("alpha,temperature,top_k,top_p", CHI2_SETTINGS)
def test_frequencies_follow_filtered_distribution(device, alpha, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(1000 + int(100 * top_p) + top_k)
    V, N = 48, 40000
    s = torch.randn(V, generator=gen) * 2
    t = torch.randn(V, generator=gen) * 2
    r = ref_mixture(s[None], t[None], temperature, alpha)[0]
    probs = filtered_probs(r, top_p, top_k)
    res = top_p_sample(s.expand(N, V).contiguous().to(device), top_p=top_p, top_k=top_k,
                       temperature=temperature, teacher_logits=t.expand(N, V).contiguous().to(device),
                       alpha=alpha, seed=4242)
    counts = torch.bincount(res.tokens.cpu(), minlength=V).double()
    assert counts[probs == 0].sum() == 0, "drew a filtered-out token"
    assert chi2_pvalue(counts, probs) > 1e-4


def test_chi2_detects_a_wrong_distribution():
    # The same test must reject draws from another distribution (here: the unfiltered one).
    gen = torch.Generator().manual_seed(7)
    V, N = 48, 40000
    s = torch.randn(V, generator=gen) * 2
    r = ref_mixture(s[None], None, 1.0, 0.0)[0]
    res = top_p_sample(s.expand(N, V).contiguous(), top_p=1.0, seed=1)
    counts = torch.bincount(res.tokens, minlength=V).double()
    assert chi2_pvalue(counts, filtered_probs(r, 0.7, 0)) < 1e-6
    tempered = torch.softmax(s.double() / 1.1, -1)
    assert chi2_pvalue(counts, tempered) < 1e-6


# ---------------------------------------------------------------------------------------------
# Properties against the reference
# ---------------------------------------------------------------------------------------------
@st.composite
def sampling_case(draw):
    rows = draw(st.integers(1, 6))
    V = draw(st.integers(1, 700))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # Logits on a grid (many ties, clear gaps elsewhere), some rows with masked entries.
    scale = draw(st.sampled_from([1, 4, 16]))
    s = torch.randint(-6 * scale, 6 * scale + 1, (rows, V), generator=g).float() / scale
    t = torch.randint(-6 * scale, 6 * scale + 1, (rows, V), generator=g).float() / scale
    if draw(st.booleans()):
        s[torch.rand(rows, V, generator=g) < 0.3] = -math.inf
        s[:, 0] = 0.0  # keep every row alive
    alpha = draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0]))
    if alpha > 0 and draw(st.booleans()):
        t[torch.rand(rows, V, generator=g) < 0.3] = -math.inf
        t[:, -1] = 0.0
    top_p = draw(st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.123, 1e-6]))
    top_k = draw(st.sampled_from([0, 0, 1, 2, 7, 50, 1000]))
    temperature = draw(st.sampled_from([1.0, 0.5, 2.0]))
    with_teacher = alpha > 0 or draw(st.booleans())
    return s, (t if with_teacher else None), top_p, top_k, temperature, alpha, seed


@given(case=sampling_case())
def test_matches_reference(device, case):
    s, t, top_p, top_k, temperature, alpha, seed = case
    res = top_p_sample(s.to(device), top_p=top_p, top_k=top_k, temperature=temperature,
                       teacher_logits=None if t is None else t.to(device), alpha=alpha, seed=seed)
    assert isinstance(res, SampleResult)
    assert res.tokens.dtype == torch.int64 and res.tokens.shape == s.shape[:-1]
    for f in res[1:]:
        assert f.dtype == torch.float32 and f.shape == s.shape[:-1] and f.device == s.to(device).device
    check_against_reference(res, s, t, top_p, top_k, temperature, alpha)


@given(V=st.integers(2, 3000), top_p=st.floats(0.01, 1.0), logit_scale=st.floats(0.1, 8.0),
       seed=st.integers(0, 2**31 - 1))
def test_continuous_logits(V, top_p, logit_scale, seed):
    # Random real-valued logits (no grid): the float32 search against the float64 cut.
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, V, generator=g) * logit_scale
    res = top_p_sample(s, top_p=top_p, seed=seed)
    check_against_reference(res, s, None, top_p, 0, 1.0, 0.0)


def test_large_vocab_all_rules():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 128256, generator=g) * 2
    t = torch.randn(4, 128256, generator=g) * 2
    for top_p, top_k, alpha in [(0.9, 0, 0.0), (0.95, 50, 0.2), (1.0, 40, 0.0), (0.5, 0, 1.0)]:
        res = top_p_sample(s, top_p=top_p, top_k=top_k, teacher_logits=t, alpha=alpha, seed=5)
        check_against_reference(res, s, t, top_p, top_k, 1.0, alpha)


# ---------------------------------------------------------------------------------------------
# Limits, ties, masks
# ---------------------------------------------------------------------------------------------
def test_tiny_top_p_is_greedy(device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 300, generator=g)
    for top_p in (1e-9, 1e-30, 5e-324):
        res = top_p_sample(s.to(device), top_p=top_p, seed=3)
        assert torch.equal(res.tokens.cpu(), s.argmax(-1))
        torch.testing.assert_close(res.sample_logprob.cpu(), torch.zeros(64))
        torch.testing.assert_close(res.threshold.cpu(), torch.softmax(s, -1).max(-1).values)
    res = top_p_sample(s.to(device), top_k=1, seed=3)
    assert torch.equal(res.tokens.cpu(), s.argmax(-1))


def test_greedy_keeps_tied_maxima(device):
    s = torch.zeros(4000, 10)
    s[:, [2, 5, 7]] = 3.0
    res = top_p_sample(s.to(device), top_p=1e-6, seed=11)
    tok = res.tokens.cpu()
    assert set(tok.tolist()) == {2, 5, 7}
    torch.testing.assert_close(res.sample_logprob.cpu(), torch.full((4000,), -math.log(3)))
    res = top_p_sample(s.to(device), top_k=2, seed=11)  # the 3-way tie at the top is kept whole
    assert set(res.tokens.cpu().tolist()) == {2, 5, 7}


def test_top_p_one_keeps_everything(device):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 1000, generator=g) * 3
    res = top_p_sample(s.to(device), top_p=1.0, seed=2)
    q = torch.softmax(s.double(), -1)
    torch.testing.assert_close(res.threshold.cpu().double(), q.min(-1).values, rtol=1e-5, atol=0)
    torch.testing.assert_close(res.sample_logprob.cpu(), res.student_logprob.cpu(), atol=1e-5, rtol=1e-5)
    # top_k >= V is off too
    res2 = top_p_sample(s.to(device), top_k=1000, seed=2)
    assert torch.equal(res.tokens, res2.tokens)
    res3 = top_p_sample(s.to(device), top_k=5000, seed=2)
    assert torch.equal(res.tokens, res3.tokens)


def test_uniform_row_ties(device):
    # Every token tied: any top_p keeps all of them.
    s = torch.zeros(3, 50000)
    for top_p in (0.3, 0.999, 1.0):
        res = top_p_sample(s.to(device), top_p=top_p, seed=9)
        torch.testing.assert_close(res.threshold.cpu(), torch.full((3,), 1 / 50000))
        torch.testing.assert_close(res.sample_logprob.cpu(), torch.full((3,), -math.log(50000)))
    # Two tie groups: 0.5 of the mass is in the top group, so top_p = 0.5 keeps the top group only
    # and anything above keeps both.
    s = torch.zeros(2000, 8)
    s[:, :2] = math.log(3.0)  # top group: 2 tokens of weight 3, bottom: 6 of weight 1 -> 0.5 / 0.5
    res = top_p_sample(s.to(device), top_p=0.49, seed=1)
    assert set(res.tokens.cpu().tolist()) == {0, 1}
    res = top_p_sample(s.to(device), top_p=0.51, seed=1)
    assert set(res.tokens.cpu().tolist()) == set(range(8))


def test_masked_tokens_never_drawn(device):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3000, 40, generator=g)
    banned = torch.rand(3000, 40, generator=g) < 0.8
    banned[:, 0] = False
    s[banned] = -math.inf
    res = top_p_sample(s.to(device), top_p=1.0, seed=4)
    assert not banned[torch.arange(3000), res.tokens.cpu()].any()
    # Teacher-masked tokens are drawable while the student gives them mass, and vice versa.
    t = torch.randn(3000, 40, generator=g)
    t[:, 1] = -math.inf
    s2 = torch.randn(3000, 40, generator=g)
    s2[:, 2] = -math.inf
    res = top_p_sample(s2.to(device), teacher_logits=t.to(device), alpha=0.5, seed=4)
    tok = res.tokens.cpu()
    assert (tok == 1).any() and (tok == 2).any()
    assert (res.teacher_logprob.cpu()[tok == 1] == -math.inf).all()
    assert (res.student_logprob.cpu()[tok == 2] == -math.inf).all()
    # alpha = 1: student-masked tokens are drawable, teacher-masked ones are not.
    res = top_p_sample(s2.to(device), teacher_logits=t.to(device), alpha=1.0, seed=4)
    assert not (res.tokens.cpu() == 1).any()


def test_probabilities_below_float32_range_are_zero(device):
    # q = e^-200 / Z is below FLT_MIN: such tokens are never drawn, on every device alike.
    s = torch.tensor([[0.0, -200.0, 0.0, -80.0]]).expand(2000, 4).contiguous()
    res = top_p_sample(s.to(device), top_p=1.0, seed=3)
    tok = res.tokens.cpu()
    assert not (tok == 1).any() and (tok == 3).sum() <= 5
    torch.testing.assert_close(res.threshold.cpu(), torch.softmax(s, -1)[:, 3])


def test_rows_without_distribution(device):
    s = torch.randn(5, 30)
    s[1] = -math.inf
    s[2, 3] = math.nan
    s[3, 4] = math.inf
    res = top_p_sample(s.to(device), top_p=0.9, seed=0)
    tok = res.tokens.cpu()
    assert tok[[1, 2, 3]].tolist() == [-1, -1, -1]
    for f in res[1:]:
        assert torch.isnan(f.cpu()[[1, 2, 3]]).all()
    for f in (res.student_logprob, res.sample_logprob, res.threshold):
        assert torch.isfinite(f.cpu()[[0, 4]]).all()
    assert (tok[[0, 4]] >= 0).all()
    # The teacher only matters when it is mixed in.
    t = torch.randn(5, 30)
    t[0] = -math.inf
    res = top_p_sample(s.to(device), teacher_logits=t.to(device), alpha=0.0, seed=0)
    assert res.tokens[0] >= 0 and torch.isnan(res.teacher_logprob[0])
    res = top_p_sample(s.to(device), teacher_logits=t.to(device), alpha=0.5, seed=0)
    assert res.tokens[0] == -1 and res.tokens[4] >= 0
    # alpha = 1 samples from the teacher alone, even where the student has no distribution.
    res = top_p_sample(s.to(device), teacher_logits=t.to(device), alpha=1.0, seed=0)
    assert res.tokens[1] >= 0 and torch.isnan(res.student_logprob[1]) and res.tokens[0] == -1


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------
def test_reproducible_by_seed(device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(200, 500, generator=g).to(device)
    a = top_p_sample(s, top_p=0.9, seed=123)
    b = top_p_sample(s, top_p=0.9, seed=123)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    c = top_p_sample(s, top_p=0.9, seed=124)
    assert not torch.equal(a.tokens, c.tokens)
    # Seeds are taken mod 2^64: negative and huge seeds are fine.
    d = top_p_sample(s, top_p=0.9, seed=123 + 2**64)
    assert torch.equal(a.tokens, d.tokens)
    top_p_sample(s, seed=-1)
    # A row's draw depends on its index and data only, not on the rest of the batch.
    e = top_p_sample(s[:50], top_p=0.9, seed=123)
    assert torch.equal(a.tokens[:50], e.tokens)
    # Leading dims are flattened in row-major order.
    f = top_p_sample(s.reshape(4, 50, 500), top_p=0.9, seed=123)
    assert torch.equal(f.tokens.reshape(-1), a.tokens)


def test_reproducible_by_generator(device):
    g0 = torch.Generator().manual_seed(0)
    s = torch.randn(200, 500, generator=g0).to(device)
    g1 = torch.Generator(device=device).manual_seed(77)
    g2 = torch.Generator(device=device).manual_seed(77)
    before = g1.get_state().clone()
    a = top_p_sample(s, top_p=0.9, generator=g1)
    assert not torch.equal(before, g1.get_state()), "the generator must advance"
    b = top_p_sample(s, top_p=0.9, generator=g2)
    assert torch.equal(a.tokens, b.tokens)
    a2 = top_p_sample(s, top_p=0.9, generator=g1)
    b2 = top_p_sample(s, top_p=0.9, generator=g2)
    assert torch.equal(a2.tokens, b2.tokens)
    assert not torch.equal(a.tokens, a2.tokens)
    # The default generator of the device.
    torch.manual_seed(5)
    c = top_p_sample(s, top_p=0.9)
    torch.manual_seed(5)
    d = top_p_sample(s, top_p=0.9)
    assert torch.equal(c.tokens, d.tokens)
    e = top_p_sample(s, top_p=0.9)
    assert not torch.equal(c.tokens, e.tokens)


def test_row_ids_make_a_draw_independent_of_the_batch(device):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(40, 300, generator=g).to(device)
    t = torch.randn(40, 300, generator=g).to(device)
    ids = torch.randint(-(2**62), 2**62, (40,), generator=g).to(device)
    kw = dict(top_p=0.9, top_k=20, teacher_logits=t, alpha=0.4, seed=7)
    batch = top_p_sample(s, row_ids=ids, **kw)
    # One call per row with that row's id gives the same result, field for field ...
    for r in [0, 13, 39]:
        one = top_p_sample(s[r:r + 1], row_ids=ids[r:r + 1], top_p=0.9, top_k=20, teacher_logits=t[r:r + 1],
                           alpha=0.4, seed=7)
        for a, b in zip(one, batch):
            torch.testing.assert_close(a[0], b[r], rtol=0, atol=0, equal_nan=True)
    # ... and so does any reordering of the batch.
    perm = torch.randperm(40, generator=g).to(device)
    shuffled = top_p_sample(s[perm], row_ids=ids[perm], top_p=0.9, top_k=20, teacher_logits=t[perm], alpha=0.4,
                            seed=7)
    for a, b in zip(shuffled, batch):
        torch.testing.assert_close(a, b[perm], rtol=0, atol=0, equal_nan=True)
    # No ids means ids = the flat row index; int32 ids equal int64 ones; leading dims are kept.
    plain = top_p_sample(s, **kw)
    indexed = top_p_sample(s, row_ids=torch.arange(40, device=device, dtype=torch.int32), **kw)
    assert torch.equal(plain.tokens, indexed.tokens)
    shaped = top_p_sample(s.reshape(4, 10, 300), row_ids=ids.reshape(4, 10), top_p=0.9, top_k=20,
                          teacher_logits=t.reshape(4, 10, 300), alpha=0.4, seed=7)
    assert shaped.tokens.shape == (4, 10) and torch.equal(shaped.tokens.reshape(-1), batch.tokens)
    # Different ids draw differently (on a flat row, the token is the top bits of u).
    flat = torch.zeros(200, 1024, device=device)
    a = top_p_sample(flat, seed=3, row_ids=torch.arange(200, device=device))
    b = top_p_sample(flat, seed=3, row_ids=torch.arange(200, device=device) + 200)
    assert (a.tokens != b.tokens).float().mean() > 0.9


@cuda_only
def test_cuda_generator_offset_advances_by_one_block():
    g = torch.Generator(device="cuda").manual_seed(3)
    g.set_offset(8)
    s = torch.randn(10, 100, device="cuda")
    a = top_p_sample(s, generator=g)
    assert g.get_offset() == 12
    b = torch.ops.kdext.top_p_sample(s, None, 1.0, 0, 1.0, 0.0, 3, 2)
    assert torch.equal(a.tokens, b[0])


def test_philox_stream_mapping(device):
    # The op's uniforms are word 0 of philox4x32_10(counter=(offset, row), key=seed): seen
    # through a two-token row whose CDF splits at 1/2, token 1 iff u > 1/2 iff the top bit of
    # word 0 is set. Same mapping on every device.
    s = torch.zeros(4096, 2, device=device)
    for seed, offset in [(0, 0), (2**40 + 3, 5), (-1, 2**33)]:
        res = torch.ops.kdext.top_p_sample(s, None, 1.0, 0, 1.0, 0.0, seed, offset)
        expect = [int(_philox_word0(seed % 2**64, offset, row) >> 31) for row in range(4096)]
        assert res[0].tolist() == expect


def _philox_word0(seed, offset, row):
    return philox4x32_10((offset & 0xFFFFFFFF, offset >> 32, row & 0xFFFFFFFF, row >> 32),
                         (seed & 0xFFFFFFFF, seed >> 32))[0]


@pytest.mark.parametrize("counter,key,words", PHILOX_KNOWN_ANSWERS)
def test_philox_known_answer_python_model(counter, key, words):
    # The Python model above against Random123's published philox4x32_10 vectors.
    assert philox4x32_10(counter, key) == words


def test_function_and_module_share_the_stem():
    # kdext.top_p_sample is the function; the module of the same stem stays importable.
    import importlib

    module = importlib.import_module("kdext.top_p_sample")
    assert kdext.top_p_sample is top_p_sample is module.top_p_sample
    assert kdext.SampleResult is SampleResult is module.SampleResult
    res = kdext.top_p_sample(torch.zeros(3, 5), top_p=0.5, seed=1)
    assert isinstance(res, SampleResult) and res.tokens.shape == (3,)


# ---------------------------------------------------------------------------------------------
# dtypes, shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tdtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float16), (torch.float64, torch.float32)])
def test_low_precision_inputs(device, dtype, tdtype):
    g = torch.Generator().manual_seed(2)
    s = (torch.randint(-40, 41, (41, 401), generator=g) / 8).to(dtype)
    t = (torch.randint(-40, 41, (41, 401), generator=g) / 8).to(tdtype)
    for top_p, top_k, alpha in [(0.9, 0, 0.0), (0.7, 30, 0.4)]:
        res = top_p_sample(s.to(device), top_p=top_p, top_k=top_k, teacher_logits=t.to(device),
                           alpha=alpha, temperature=0.8, seed=8)
        check_against_reference(res, s, t, top_p, top_k, 0.8, alpha)


def test_shapes_and_strides(device):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 5, 7, 129, generator=g).to(device)
    res = top_p_sample(s, top_p=0.8, seed=1)
    assert res.tokens.shape == (3, 5, 7)
    check_against_reference(res, s, None, 0.8, 0, 1.0, 0.0)
    nc = s.transpose(0, 2)  # non-contiguous rows
    res2 = top_p_sample(nc, top_p=0.8, seed=1)
    assert res2.tokens.shape == (7, 5, 3)
    check_against_reference(res2, nc, None, 0.8, 0, 1.0, 0.0)
    v1 = top_p_sample(torch.randn(4, 1).to(device), top_p=0.5, seed=0)  # a one-token vocabulary
    assert v1.tokens.tolist() == [0, 0, 0, 0]
    one = top_p_sample(torch.randn(17).to(device), seed=0)  # a single row: 0-dim outputs
    assert one.tokens.shape == ()
    empty = top_p_sample(torch.randn(0, 17).to(device), seed=0)
    assert empty.tokens.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
BAD = [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=-0.1), ValueError, "top_p"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(alpha=-0.5), ValueError, "alpha"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=0.3), ValueError, "teacher_logits"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
]


def test_top_k_beyond_int64_says_the_range():
    # The op's schema takes an int64: the wrapper says the range instead of the binding's
    # "Expected a value of type 'int'".
    with pytest.raises(ValueError, match=re.escape("top_k must be in [0, 2**63 - 1]")):
        top_p_sample(torch.randn(2, 10), top_k=2**63)


@pytest.mark.parametrize("kwargs,exc,word", BAD)
def test_bad_arguments(kwargs, exc, word):
    s = torch.randn(2, 10)
    with pytest.raises(exc, match=word):
        top_p_sample(s, **kwargs)
    # The op itself checks the same things, with the same words.
    args = dict(top_p=1.0, top_k=0, temperature=1.0, alpha=0.0)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        torch.ops.kdext.top_p_sample(s, None, float(args["top_p"]), int(args["top_k"]),
                                     float(args["temperature"]), float(args["alpha"]), 0, 0)


def test_bad_tensors():
    s = torch.randn(2, 10)
    cases = [
        (lambda: top_p_sample(torch.randint(0, 5, (2, 10))), TypeError, "logits"),
        (lambda: top_p_sample(torch.randn(2, 0)), ValueError, "empty vocabulary"),
        (lambda: top_p_sample(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: top_p_sample(s, teacher_logits=torch.randn(2, 11), alpha=0.5), ValueError, "shape"),
        (lambda: top_p_sample(s, teacher_logits=torch.randn(3, 10), alpha=0.5), ValueError, "shape"),
        (lambda: top_p_sample(s, teacher_logits=torch.randint(0, 5, (2, 10)), alpha=0.5), TypeError,
         "teacher_logits"),
        (lambda: top_p_sample(s, seed=1, generator=torch.Generator()), ValueError, "seed"),
        (lambda: top_p_sample(s, seed=1.5), TypeError, "seed"),
        (lambda: top_p_sample(s, generator=5), TypeError, "generator"),
        (lambda: top_p_sample(s, top_k=2.5), TypeError, "top_k"),
        (lambda: top_p_sample([1.0, 2.0]), TypeError, "logits"),
        (lambda: top_p_sample(s, teacher_logits=torch.randn(2, 10, device="meta"), alpha=0.5), RuntimeError,
         "same device"),
        (lambda: top_p_sample(s, row_ids=torch.zeros(2)), TypeError, "row_ids must be int64 or int32"),
        (lambda: top_p_sample(s, row_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "row_ids must have shape"),
        (lambda: top_p_sample(s, row_ids=torch.zeros(1, 2, dtype=torch.int64)), ValueError, "row_ids must have shape"),
        (lambda: top_p_sample(s, row_ids=[0, 1]), TypeError, "row_ids"),
        (lambda: top_p_sample(s, row_ids=torch.zeros(2, dtype=torch.int64, device="meta")), RuntimeError,
         "row_ids is on meta"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()
    op = torch.ops.kdext.top_p_sample
    with pytest.raises(TypeError, match="logits"):
        op(torch.randint(0, 5, (2, 10)), None, 1.0, 0, 1.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="empty vocabulary"):
        op(torch.randn(2, 0), None, 1.0, 0, 1.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        op(s, torch.randn(2, 11), 1.0, 0, 1.0, 0.5, 0, 0)
    with pytest.raises(ValueError, match="teacher_logits"):
        op(s, None, 1.0, 0, 1.0, 0.5, 0, 0)
    with pytest.raises(TypeError, match="row_ids must be int64 or int32"):
        op(s, None, 1.0, 0, 1.0, 0.0, 0, 0, torch.zeros(2))
    with pytest.raises(ValueError, match="row_ids must have shape"):
        op(s, None, 1.0, 0, 1.0, 0.0, 0, 0, torch.zeros(3, dtype=torch.int64))


@cuda_only
def test_bad_devices():
    s = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="device"):
        top_p_sample(s, teacher_logits=torch.randn(2, 10, device="cuda"), alpha=0.5)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.kdext.top_p_sample(s, torch.randn(2, 10, device="cuda"), 1.0, 0, 1.0, 0.5, 0, 0)
    with pytest.raises(ValueError, match="generator"):
        top_p_sample(s, generator=torch.Generator(device="cuda"))
    with pytest.raises(RuntimeError, match="row_ids is on cpu"):
        torch.ops.kdext.top_p_sample(s.cuda(), None, 1.0, 0, 1.0, 0.0, 0, 0, torch.arange(2))


# ---------------------------------------------------------------------------------------------
# CUDA vs CPU, opcheck
# ---------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_agrees_with_cpu(dtype):
    g = torch.Generator().manual_seed(12)
    s = (torch.randint(-64, 65, (256, 32000), generator=g) / 16).to(dtype)
    t = (torch.randint(-64, 65, (256, 32000), generator=g) / 16).to(dtype)
    for top_p, top_k, alpha in [(0.9, 0, 0.0), (0.8, 100, 0.3), (1.0, 0, 1.0), (1e-6, 0, 0.5)]:
        kw = dict(top_p=top_p, top_k=top_k, teacher_logits=t, alpha=alpha, seed=99)
        a = top_p_sample(s, **kw)
        kw["teacher_logits"] = t.cuda()
        b = top_p_sample(s.cuda(), **kw)
        torch.testing.assert_close(b.threshold.cpu(), a.threshold, rtol=1e-5, atol=0)
        torch.testing.assert_close(b.student_logprob.cpu(), a.student_logprob, rtol=1e-5, atol=1e-5)
        same = (a.tokens == b.tokens.cpu()).float().mean().item()
        assert same >= 0.98, same
        check_against_reference(b, s, t, top_p, top_k, 1.0, alpha)


def test_opcheck(device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 97, generator=g).to(device)
    t = torch.randn(3, 4, 97, generator=g).to(device)
    op = torch.ops.kdext.top_p_sample.default
    torch.library.opcheck(op, (s, t, 0.9, 5, 0.7, 0.3, 123, 0))
    # (opcheck compares outputs without equal_nan, so keep teacher_logprob finite: pass a teacher)
    torch.library.opcheck(op, (s.to(torch.bfloat16), t.to(torch.float16), 1.0, 0, 1.0, 0.0, -5, 7))
    res = op(s, None, 0.5, 0, 1.0, 0.0, 1, 2)
    assert torch.isnan(res[2]).all() and (res[0] >= 0).all()
    ids = torch.arange(12, device=device).reshape(3, 4) * 1000 - 5
    torch.library.opcheck(op, (s, t, 0.9, 5, 0.7, 0.3, 123, 0, ids))


# ---------------------------------------------------------------------------------------------
# The CUDA kernel's logic without a GPU: csrc/include/kdext/cuda/top_p_sample_kernels.cuh compiled for the CPU
# simulator of tests/cpp/cuda_sim (fibers for threads; 64 threads a block and a 512-value list, so
# that these small rows go through every phase: global rounds, compaction, shared-memory rounds).
# ---------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cuda_sim(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA kernel simulator")
    exe = str(tmp_path_factory.mktemp("cuda_sim") / "sim_top_p_sample")
    subprocess.run([cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-DKDEXT_TOP_P_SAMPLE_BLOCK=64",
                    "-DKDEXT_TOP_P_SAMPLE_LIST_CAP=512", "-I" + os.path.join(ROOT, "tests", "cpp", "cuda_sim"),
                    "-I" + os.path.join(ROOT, "csrc", "include"),
                    os.path.join(ROOT, "tests", "cpp", "sim_top_p_sample.cpp"), "-o", exe],
                   check=True, capture_output=True)

    def run(s, t, top_p, top_k, temperature, alpha, seed, offset=0, row_ids=None):
        rows, V = s.shape
        code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[s.dtype]
        data = np.array([rows, V, code, t is not None, top_k, seed, offset, row_ids is not None],
                        dtype=np.int64).tobytes()
        data += np.array([top_p, temperature, alpha], dtype=np.float64).tobytes()
        for x in (s, t):
            if x is not None:
                x = x.to(s.dtype).contiguous()
                data += x.view(torch.int32 if x.dtype == torch.float32 else torch.int16).numpy().tobytes()
        if row_ids is not None:
            data += row_ids.to(torch.int64).numpy().tobytes()
        out = subprocess.run([exe, "/dev/stdin", "/dev/stdout"], input=data, check=True, capture_output=True).stdout
        tok = torch.from_numpy(np.frombuffer(out[: 8 * rows], dtype=np.int64).copy())
        f = torch.from_numpy(np.frombuffer(out[8 * rows:], dtype=np.float32).copy()).reshape(4, rows)
        return SampleResult(tok, f[0], f[1], f[2], f[3])

    return run


SIM_CASES = [
    # rows, V, dtype, logits scale, grid, top_p, top_k, temperature, alpha, with teacher
    (4, 20000, torch.float32, 2.0, False, 0.9, 0, 1.0, 0.0, False),
    (3, 9000, torch.float32, 3.0, False, 0.8, 50, 0.7, 0.3, True),
    (3, 6000, torch.bfloat16, 2.0, True, 0.5, 0, 1.0, 0.5, True),
    (3, 5000, torch.float16, 1.0, True, 1.0, 300, 1.3, 0.0, True),
    (2, 3000, torch.float32, 0.0, True, 0.3, 0, 1.0, 0.0, False),  # every token tied
    (3, 7000, torch.float32, 4.0, False, 1e-7, 0, 1.0, 1.0, True),  # greedy on the teacher
    (3, 2500, torch.float32, 2.0, False, 1.0, 0, 1.0, 0.0, False),
]


@pytest.mark.parametrize("case", SIM_CASES)
def test_kernel_logic_simulated(cuda_sim, case):
    rows, V, dtype, scale, grid, top_p, top_k, temperature, alpha, with_teacher = case
    g = torch.Generator().manual_seed(V)
    s = torch.randn(rows, V, generator=g) * scale
    t = torch.randn(rows, V, generator=g) * scale
    if grid:
        s, t = (s * 4).round() / 4, (t * 4).round() / 4
    s[0, ::3] = -math.inf  # masked tokens in one row
    s, t = s.to(dtype), t.to(dtype)
    t = t if with_teacher else None
    sim = cuda_sim(s, t, top_p, top_k, temperature, alpha, seed=11, offset=3)
    cpu = torch.ops.kdext.top_p_sample(s, t, top_p, top_k, temperature, alpha, 11, 3)
    check_against_reference(sim, s, t, top_p, top_k, temperature, alpha)
    torch.testing.assert_close(sim.threshold, cpu[4], rtol=1e-5, atol=0)
    torch.testing.assert_close(sim.student_logprob, cpu[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sim.teacher_logprob, cpu[2], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(sim.sample_logprob, cpu[3], rtol=1e-5, atol=1e-5)
    assert (sim.tokens == cpu[0]).sum() >= rows - 1  # same u; CDFs agree up to float rounding


def test_kernel_logic_simulated_rows_without_distribution(cuda_sim):
    s = torch.randn(4, 700)
    s[1] = -math.inf
    s[2, 5] = math.nan
    sim = cuda_sim(s, None, 0.9, 0, 1.0, 0.0, seed=1)
    assert sim.tokens[[1, 2]].tolist() == [-1, -1] and (sim.tokens[[0, 3]] >= 0).all()
    assert torch.isnan(sim.threshold[[1, 2]]).all() and torch.isfinite(sim.threshold[[0, 3]]).all()
    # Philox: the same stream as the CPU kernel, row by row.
    two = torch.zeros(64, 2)
    sim = cuda_sim(two, None, 1.0, 0, 1.0, 0.0, seed=2**40 + 3, offset=5)
    assert sim.tokens.tolist() == [int(_philox_word0(2**40 + 3, 5, row) >> 31) for row in range(64)]
    # ... and row by id with row_ids.
    ids = torch.arange(64) * 7919 - 200
    sim = cuda_sim(two, None, 1.0, 0, 1.0, 0.0, seed=2**40 + 3, offset=5, row_ids=ids)
    assert sim.tokens.tolist() == [int(_philox_word0(2**40 + 3, 5, i % 2**64) >> 31) for i in ids.tolist()]
