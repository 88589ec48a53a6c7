"""Float64 reference implementations of every kdext op (plain PyTorch).

They follow DESIGN.md's contract: entries with zero probability contribute
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
    ls, lt = log_probs(s, temperature), log_probs(t, temperature)
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


def entropy(x, temperature=1.0):
    lq = log_probs(x, temperature)
    q = lq.exp()
    return -(q * torch.where(q > 0, lq, torch.zeros_like(lq))).sum(-1)


def logprobs(x, tokens, temperature=1.0):
    return log_probs(x, temperature).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
