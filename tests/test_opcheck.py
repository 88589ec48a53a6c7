"""torch.library.opcheck on every op of csrc/ops.cpp (top_p_sample is checked
with the sampler's tests): schema (no undeclared aliasing or mutation), the
fake kernel (shapes, dtypes, strides and devices of the real outputs), the
autograd registration, and AOT dispatch with dynamic shapes (forward and
backward traced by torch.compile's machinery, compared with eager).

Inputs have leading dims and an odd vocabulary, in float32 and bfloat16, and
require grad wherever the op is differentiable.
"""

import pytest
import torch
from torch.library import opcheck

import kdext  # noqa: F401  (registers fake kernels and autograd)
from reference import DIVERGENCE_CASES, JSD_ENDPOINTS

ops = torch.ops.kdext
ROWS, V, T = (2, 3), 37, 1.3


def logits(device, dtype, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(ROWS + (V,), generator=gen) * 2).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


def row_vector(device, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, generator=gen).to(device=device, dtype=dtype)


def tokens(device, dtype=torch.int64):
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, V, ROWS, generator=gen).to(device=device, dtype=dtype)


def case_args(name, device, dtype):
    """(op, args) for a case id."""
    s = lambda grad=False: logits(device, dtype, grad, seed=0)  # noqa: E731
    t = lambda grad=False: logits(device, dtype, grad, seed=1)  # noqa: E731
    if name.startswith("divergence_forward:"):
        kind, param = name.split(":")[1], float(name.split(":")[2])
        return ops.divergence_forward, (s(True), t(True), kind, param, T)
    if name.startswith("divergence_backward:"):
        kind, param = "jsd", 0.3
        need_s, need_t = {"both": (True, True), "student": (True, False), "teacher": (False, True)}[name.split(":")[1]]
        _, stats = ops.divergence_forward(s(), t(), kind, param, T)
        return ops.divergence_backward, (row_vector(device), s(), t(), stats, kind, param, T, need_s, need_t)
    if name.startswith("divergence_loss:"):
        kind, param = name.split(":")[1], float(name.split(":")[2])
        weights = row_vector(device).abs() / 6
        return ops.divergence_loss, (s(True), t(), weights, kind, param, T)
    if name == "divergence_partial":
        return ops.divergence_partial, (s(), t(), ops.logsumexp(s(), T), ops.logsumexp(t(), T), "skew_reverse_kl", 0.2, T)
    if name.startswith("scale_:"):
        factor = torch.tensor(float(name.split(":")[1]), device=device, dtype=dtype)
        return ops.scale_, (s(), factor)
    if name in ("reverse_kl", "forward_kl", "tvd"):
        return getattr(ops, name), (s(True), t(True), T)
    if name in ("jsd", "skew_forward_kl", "skew_reverse_kl"):
        return getattr(ops, name), (s(True), t(True), 0.3, T)
    if name in ("softmax", "log_softmax", "logsumexp", "entropy"):
        return getattr(ops, name), (s(True), T)
    if name == "lse_float64":  # not differentiable: its output must not require grad
        return ops.lse_float64, (s(True), T)
    if name.startswith("softmax_backward:"):
        log = name.endswith("log")
        out = (ops.log_softmax if log else ops.softmax)(s(), T)
        return ops.softmax_backward, (logits(device, dtype, seed=3), out, T, log)
    if name == "entropy_forward":
        return ops.entropy_forward, (s(True), T)
    if name == "entropy_forward:lse":
        return ops.entropy_forward, (s(), T, ops.logsumexp(s(), T))
    if name == "entropy_backward":
        ent, lse = ops.entropy_forward(s(), T)
        return ops.entropy_backward, (row_vector(device), s(), ent, lse, T)
    if name.startswith("logprobs_forward:"):
        tok_dtype = torch.int32 if name.endswith("int32") else torch.int64
        return ops.logprobs_forward, (s(True), tokens(device, tok_dtype), T)
    if name == "logprobs_backward":
        tok = tokens(device)
        _, lse = ops.logprobs_forward(s(), tok, T)
        return ops.logprobs_backward, (row_vector(device), s(), tok, lse, T)
    if name == "logprobs":
        return ops.logprobs, (s(True), tokens(device), T)
    if name.startswith("divergence_loss_out:"):
        kind, param = name.split(":")[1], float(name.split(":")[2])
        return ops.divergence_loss_out, (s(), t(), row_vector(device).abs() / 6, kind, param, T,
                                         torch.empty(ROWS + (V,), device=device, dtype=dtype))
    if name.startswith("fused_linear_"):
        return fused_linear_case(name, device, dtype)
    raise KeyError(name)


def fused_linear_case(name, device, dtype):
    """Heads [2, 3, H] -> V = 37: the student with a bias, a scale and a softcap, the teacher
    narrower (V = 31) and wider in H; uneven chunks of 4 rows."""
    gen = torch.Generator().manual_seed(5)
    make = lambda *shape, grad=False: (torch.randn(shape, generator=gen) * 0.5).to(device=device, dtype=dtype) \
        .requires_grad_(grad)  # noqa: E731
    sh, sw, sb = make(*ROWS, 6, grad=True), make(V, 6, grad=True), make(V, grad=True)
    th, tw = make(*ROWS, 9), make(31, 9)
    pair = (sh, sw, sb, th, tw, None, "jsd", 0.3, T, 0.8, 1.0, 4.0, None, 4)
    kind = name.split(":")[0]
    if kind == "fused_linear_divergence_loss":
        return ops.fused_linear_divergence_loss, pair + (row_vector(device).abs() / 6, True, True, True)
    if kind == "fused_linear_divergence_forward":
        return ops.fused_linear_divergence_forward, pair
    if kind == "fused_linear_divergence_backward":
        plain = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in pair)
        _, stats = ops.fused_linear_divergence_forward(*plain)
        return ops.fused_linear_divergence_backward, (row_vector(device), stats) + plain + (True, True, True)
    tok = tokens(device)
    entropy = name.endswith("entropy")
    if kind == "fused_linear_logprobs_forward":
        return ops.fused_linear_logprobs_forward, (sh, sw, sb, tok, T, 0.8, 4.0, 4, entropy)
    if kind == "fused_linear_logprobs_backward":
        plain = (sh.detach(), sw.detach(), sb.detach(), tok, T, 0.8, 4.0, 4)
        _, ent, lse = ops.fused_linear_logprobs_forward(*plain, True)
        return ops.fused_linear_logprobs_backward, (row_vector(device), row_vector(device, 3), ent, lse) + plain \
            + (True, True, True)
    raise KeyError(name)


CASES = (
    [f"divergence_forward:{k}:{p}" for k, p in DIVERGENCE_CASES + JSD_ENDPOINTS]
    + ["divergence_backward:both", "divergence_backward:student", "divergence_backward:teacher"]
    + ["divergence_loss:reverse_kl:0.0", "divergence_loss:jsd:0.5", "divergence_loss:tvd:0.0"]
    + ["divergence_partial", "scale_:2.0", "scale_:1.0"]
    + ["reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
    + ["softmax", "log_softmax", "softmax_backward:prob", "softmax_backward:log", "logsumexp", "lse_float64"]
    + ["entropy_forward", "entropy_forward:lse", "entropy_backward", "entropy"]
    + ["logprobs_forward:int64", "logprobs_forward:int32", "logprobs_backward", "logprobs"]
    + ["divergence_loss_out:reverse_kl:0.0", "divergence_loss_out:jsd:0.5"]
    + ["fused_linear_divergence_loss", "fused_linear_divergence_forward", "fused_linear_divergence_backward",
       "fused_linear_logprobs_forward:plain", "fused_linear_logprobs_forward:entropy", "fused_linear_logprobs_backward"]
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CASES)
def test_opcheck(name, dtype, device):
    op, args = case_args(name, device, dtype)
    opcheck(op, args)


def test_every_op_is_checked():
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("kdext::")}
    checked = {c.split(":")[0] for c in CASES}
    assert not names - checked - {"top_p_sample"}, sorted(names - checked)
