"""float64 hand computations shared by the trainer's loss tests.

Each example runs *unpadded* through float64 copies of the models and every quantity uses plain
``torch.log_softmax``, so a match checks at once the batch layout (left padded prompts, right
padded responses, position ids), the rows that reach the loss, the kdext ops' values and
gradients, the temperature, and the formulas.
"""

from __future__ import annotations

import copy

import torch

from kdext.train.data import Batch
from kdext.train.models import unwrap


def per_example(model64, batch, hidden=False):
    """[(R_b, V) float64 logits predicting each real response token of row b], unpadded forward
    (with ``hidden``: also [(R_b, width) of every hidden-state layer] per row)."""
    out, states = [], []
    for b in range(batch.prompt_ids.shape[0]):
        p = batch.prompt_ids[b][batch.prompt_mask[b]]
        r = batch.response_ids[b][batch.response_mask[b]]
        ids = torch.cat([p, r])[None]
        o = model64(input_ids=ids, output_hidden_states=hidden)
        sl = slice(len(p) - 1, len(p) + len(r) - 1)
        out.append(o.logits[0].double()[sl])
        if hidden:
            states.append([h[0].double()[sl] for h in o.hidden_states])
    return (out, states) if hidden else out


def tokens_of(batch):
    return [batch.response_ids[b][batch.response_mask[b]] for b in range(batch.prompt_ids.shape[0])]


def kl(a_log, b_log):
    return (a_log.exp() * (a_log - b_log)).sum(-1)


def divergence64(kind, s, t, T, beta=0.5, alpha=0.1):
    lq, lp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    q, p = lq.exp(), lp.exp()
    if kind == "forward_kl":
        return kl(lp, lq)
    if kind == "reverse_kl":
        return kl(lq, lp)
    if kind == "jsd":
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    if kind == "skew_forward_kl":
        return kl(lp, torch.log(alpha * p + (1 - alpha) * q))
    if kind == "skew_reverse_kl":
        return kl(lq, torch.log((1 - alpha) * p + alpha * q))
    raise ValueError(kind)


def nll64(s, y):
    return -torch.log_softmax(s, -1).gather(-1, y[:, None])[:, 0]


def logprob64(s, y, T):
    return torch.log_softmax(s / T, -1).gather(-1, y[:, None])[:, 0]


def cross_entropy64(s, t):
    """H(p, q) per row at T = 1: -sum_v p_v log q_v."""
    return -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1)


def copies64(setup):
    s64 = copy.deepcopy(unwrap(setup.student)).double()
    t64 = copy.deepcopy(setup.teacher).double() if setup.teacher is not None else None
    return s64, t64


def split_rows(batch, k):
    """(first k rows, the rest) of a batch, as Batches."""
    def part(sl):
        return Batch(batch.prompt_ids[sl], batch.prompt_mask[sl], batch.response_ids[sl], batch.response_mask[sl],
                     batch.index[sl])

    return part(slice(None, k)), part(slice(k, None))


def kdext_loss_and_grads(setup, prep):
    method, ctx = setup.method, setup.ctx
    unwrap(setup.student).zero_grad(set_to_none=True)
    if setup.projection is not None:
        setup.projection.zero_grad(set_to_none=True)
    terms = method.terms(ctx, prep)
    loss = method.combine(ctx.cfg, terms, prep.counts)
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in unwrap(setup.student).named_parameters()}
    if setup.projection is not None:
        grads.update({f"projection.{n}": p.grad.double().clone() for n, p in setup.projection.named_parameters()})
    return loss.detach().double(), terms, grads


def check(setup, prep, hand_loss_fn, projection64=None):
    """kdext loss == float64 hand loss (value and gradient w.r.t. every student parameter, and
    the projection's when ``projection64`` is given: a float64 copy the hand loss uses)."""
    loss, _, grads = kdext_loss_and_grads(setup, prep)
    s64, t64 = copies64(setup)
    ref = hand_loss_fn(s64, t64)
    ref.backward()
    assert torch.allclose(loss, ref.detach(), rtol=1e-5, atol=1e-6), (float(loss), float(ref))
    named = list(s64.named_parameters())
    if projection64 is not None:
        named += [(f"projection.{n}", p) for n, p in projection64.named_parameters()]
    for n, p in named:
        g, r = grads[n], p.grad
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-5 * (1 + float(r.abs().max()))), (n, float((g - r).abs().max()))
    return float(loss)
