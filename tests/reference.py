"""Float64 reference implementations of every kdext op (plain PyTorch), and the cases and
helpers the tests (and the benchmarks, bench/ and tools/) share.

They follow docs/DESIGN.md's contract: entries with zero probability contribute
exactly 0 (torch.where on the log-ratio, never 0 * inf), JSD's beta = 0 / 1
are forward / reverse KL (the TRL convention).
"""

import math

import torch

# dtype -> (atol, rtol) for values computed by kdext against the float64
# reference evaluated on the *same* (already rounded) inputs: what is left is
# float32 accumulation error, the same for every input dtype.
VALUE_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5),
             torch.float64: (1e-10, 1e-10)}
# Gradients come back in the input's dtype, so their rounding adds half an ulp
# of that dtype: 2^-11 (fp16), 2^-8 (bf16) relative.
GRAD_TOL = {torch.float32: (1e-6, 1e-4), torch.float16: (1e-6, 1e-3), torch.bfloat16: (1e-6, 8e-3),
            torch.float64: (1e-12, 1e-10)}


# ---------------------------------------------------------------------------
# The divergence family's cases (tests, bench/bench_divergence.py, bench_gpu.py,
# tools/sanitize_cuda.py)
# ---------------------------------------------------------------------------

# Each kind with the parameter the benchmarks use (jsd: beta; the skew KLs: alpha; the others take none).
DIVERGENCES = {"reverse_kl": 0.0, "forward_kl": 0.0, "jsd": 0.5, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.1,
               "tvd": 0.0}
# The (kind, parameter) cases of the tests: every kind, and JSD and the skew reverse KL at a
# second, asymmetric parameter.
DIVERGENCE_CASES = list(DIVERGENCES.items()) + [("jsd", 0.1), ("skew_reverse_kl", 0.3)]
# JSD's endpoints, forward KL (beta = 0) and reverse KL (beta = 1), which the kernels special-case.
JSD_ENDPOINTS = [("jsd", 0.0), ("jsd", 1.0)]


def divergence_kwargs(kind, param):
    """The keyword argument that carries a kind's parameter in the public API (none for the others)."""
    if kind == "jsd":
        return {"beta": param}
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        return {"alpha": param}
    return {}


def call_divergence(module, kind, param, s, t, temperature=1.0, **kw):
    """The public per-row op ``kind`` of ``module`` (kdext or kdext.parallel) at ``param``."""
    return getattr(module, kind)(s, t, temperature=temperature, **divergence_kwargs(kind, param), **kw)


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def log_probs(x, temperature=1.0):
    return torch.log_softmax(x.double() / temperature, dim=-1)


def kl_from_logs(la, lb):
    """KL(a || b) from log-probabilities, 0 * log(0 / x) = 0."""
    a = la.exp()
    ratio = torch.where(a > 0, la - lb, torch.zeros_like(la))
    return (a * ratio).sum(-1)


def log_mix(la, lb, w):
    """log(w a + (1 - w) b)."""
    lw = math.log(w) if w > 0 else -math.inf
    l1w = math.log1p(-w) if w < 1 else -math.inf
    # Where both are -inf the mixture is -inf; keep those entries out of
    # logaddexp, whose gradient there is NaN (exp(-inf - -inf)).
    both = (la == -math.inf) & (lb == -math.inf)
    la, lb = torch.where(both, 0.0, la), torch.where(both, 0.0, lb)
    return torch.where(both, -math.inf, torch.logaddexp(la + lw, lb + l1w))


def divergence(s, t, kind, param=0.0, temperature=1.0):
    """Per-row divergence in float64 (differentiable in s and t)."""
    return divergence_from_logs(log_probs(s, temperature), log_probs(t, temperature), kind, param)


def divergence_from_logs(ls, lt, kind, param=0.0):
    """D(q, p) over the last dim from the student's (ls) and the teacher's (lt) log-probabilities."""
    if kind == "jsd" and param == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and param == 1.0:
        kind = "reverse_kl"
    if kind == "reverse_kl":
        return kl_from_logs(ls, lt)
    if kind == "forward_kl":
        return kl_from_logs(lt, ls)
    if kind == "jsd":
        lm = log_mix(lt, ls, param)
        return param * kl_from_logs(lt, lm) + (1 - param) * kl_from_logs(ls, lm)
    if kind == "skew_forward_kl":
        return kl_from_logs(lt, log_mix(lt, ls, param))
    if kind == "skew_reverse_kl":
        return kl_from_logs(ls, log_mix(ls, lt, param))
    if kind == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    raise ValueError(kind)


def sparse_outcomes(x, ids, lp, tail):
    """(log Q, log P) of one row's outcomes for the sparse loss (docs/DESIGN.md, "the sparse
    family"), in float64: x the row's scaled student logits, ids / lp its stored slots (-1:
    empty). None for a row without a valid id (padding)."""
    valid = ids >= 0
    vid, lpv = ids[valid].long(), lp[valid].double()
    if vid.numel() == 0:
        return None
    S = lpv.exp().sum()
    if tail == "renormalize":
        return torch.log_softmax(x[vid], -1), lpv - S.log()
    lq_all = torch.log_softmax(x, -1)
    complement = torch.ones(x.shape[-1], dtype=torch.bool)
    complement[vid] = False
    lq = lq_all[vid]
    if not complement.any():  # every id stored: no tail outcome, P renormalised
        return lq, lpv - S.log()
    rest = lq_all[complement]
    # log of the complement's mass, summed over the complement itself
    lq_tail = torch.logsumexp(rest, 0) if torch.isfinite(rest).any() else torch.tensor(-math.inf, dtype=x.dtype)
    if S <= 1:
        lp_n, lp_tail = lpv, torch.log1p(-S)
    else:
        lp_n, lp_tail = lpv - S.log(), torch.tensor(-math.inf, dtype=torch.float64)
    return torch.cat([lq, lq_tail.reshape(1)]), torch.cat([lp_n, lp_tail.reshape(1)])


def sparse_divergence(s, ids, lp, kind, param, temperature, tail):
    """Per-row float64 sparse divergence, differentiable in s; 0 for rows without a valid id."""
    V, k = s.shape[-1], ids.shape[-1]
    xs, ids2, lp2 = (s.double() / temperature).reshape(-1, V), ids.reshape(-1, k), lp.reshape(-1, k)
    out = []
    for r in range(xs.shape[0]):
        o = sparse_outcomes(xs[r], ids2[r], lp2[r], tail)
        out.append(xs.new_zeros(()) if o is None else divergence_from_logs(o[0], o[1], kind, param))
    return torch.stack(out).reshape(s.shape[:-1])


def entropy(x, temperature=1.0):
    lq = log_probs(x, temperature)
    q = lq.exp()
    return -(q * torch.where(q > 0, lq, torch.zeros_like(lq))).sum(-1)


def logprobs(x, tokens, temperature=1.0):
    return log_probs(x, temperature).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def logsumexp(x, temperature=1.0):
    return torch.logsumexp(x.double() / temperature, dim=-1)


# ---------------------------------------------------------------------------
# Error bounds shared by test_softmax.py, test_logprobs.py, test_divergence.py and
# test_distill_loss.py
# ---------------------------------------------------------------------------


def unit_roundoff(dtype):
    """Half an ulp at 1: the relative error of rounding a result to `dtype`."""
    return torch.finfo(dtype).eps / 2


def acc_unit(dtype):
    """Unit roundoff of the accumulation dtype (float64 for float64 inputs, else float32)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def underflow_atol(dtype):
    """Absolute error allowed near zero for a result rounded to `dtype`.

    The spacing of `dtype`'s subnormals, and for float32 accumulation also
    twice the smallest normal float32: the CPU's vectorized exp flushes results
    below about 2^-125.5 to zero.
    """
    fi = torch.finfo(dtype)
    sub = fi.tiny * fi.eps
    acc_tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    return max(sub, 2 * acc_tiny)


def log_domain_atol(x, temperature):
    """Absolute error bound of a log-domain quantity (lse, log q_i, a row value)
    accumulated in float32 (float64 for float64 inputs).

    Each is a difference of numbers of size about max|x/T| + log V (x/T itself
    is rounded to the accumulation dtype), and a long sum accumulates a few
    dozen roundings (two-level summation): 64 roundings of that size.
    """
    finite = x.double()[torch.isfinite(x.double())]
    scale = finite.abs().max().item() / temperature if finite.numel() else 0.0
    return 64 * acc_unit(x.dtype) * (1 + scale + math.log(x.shape[-1] + 1))


def divergence_atol(s, t, temperature):
    """Float32 accumulation error bound for a divergence's row value.

    The per-row value is a difference of O(1) sums and log-normalisers whose
    size is about max|x/T| + log V; float32 rounds each to ~6e-8 relative and
    a long sum accumulates a few dozen such roundings.
    """
    scale = max(s.double().abs().max().item(), t.double().abs().max().item()) / temperature
    scale = 0.0 if math.isinf(scale) or math.isnan(scale) else scale
    return 64 * 2**-24 * (1 + scale + math.log(s.shape[-1] + 1))


def assert_within(got, want, bound, what=""):
    """|got - want| <= bound elementwise, with infinities and NaNs matched exactly.

    `bound` is a tensor (broadcastable) or a number. Reports the worst entry.
    """
    got, want = got.double(), want.double()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), f"{what}: NaN at {nan_got.nonzero().tolist()[:5]}, expected at {nan_want.nonzero().tolist()[:5]}"
    inf_want = torch.isinf(want)
    assert torch.equal(got[inf_want], want[inf_want]), f"{what}: infinities differ"
    finite = ~(nan_want | inf_want)
    err = (got - want).abs().where(finite, 0.0)
    excess = (err - bound).where(finite, -math.inf)
    if excess.numel() and excess.max() > 0:
        i = int(torch.argmax(excess))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), want.shape))
        raise AssertionError(
            f"{what}: |got - want| exceeds the bound at {idx}: got {got[idx].item()!r}, want {want[idx].item()!r}, "
            f"error {err[idx].item():.3e} > bound {bound[idx].item():.3e} "
            f"({int((err > bound).sum())} of {finite.sum().item()} entries over)"
        )


def random_logits(gen, shape, dtype, scale=1.0, mask_frac=0.0, device="cpu"):
    """Normal logits times `scale` in `dtype`; a fraction `mask_frac` set to -inf,
    keeping entry 0 of every row finite (every row has a distribution)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if mask_frac > 0:
        x = x.masked_fill(torch.rand(shape, generator=gen, dtype=torch.float64) < mask_frac, -math.inf)
        x[..., 0] = torch.randn(shape[:-1], generator=gen, dtype=torch.float64) * scale
    return x.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# Philox4x32-10 (Random123), in plain Python integers
# ---------------------------------------------------------------------------

# Random123's published known answers: (counter words, key words) -> output words.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(counter, key):
    """The four output words of Philox4x32-10 for four 32-bit counter words and two key words."""
    M = 0xFFFFFFFF
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M, p1 & M, ((p0 >> 32) ^ c[3] ^ k1) & M, p0 & M]
        k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
    return tuple(c)
