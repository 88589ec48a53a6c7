"""torch.compile(fullgraph=True) over the public API: the fake kernels and
autograd registrations let Dynamo/AOTAutograd/Inductor trace forward and
backward without a graph break, and the compiled function returns what eager
returns.

The compiled graph calls the same kdext kernels as eager; only the glue around
them (the row weights of the mean, the reductions of the per-row values) is
generated code, so results agree to a few float32 roundings: rtol 1e-5 and an
atol of a few float32 ulps of the gradient entries' size.

Each distinct function is a fresh compile (10-20 s on 2 cores): keep them few.
"""

import pytest
import torch

import kdext

IGNORE = -100


def _inputs(seed, shape=(2, 5, 33)):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen) * 2
    t = torch.randn(shape, generator=gen) * 2
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels[0, 1] = labels[1, 4] = labels[1, 0] = IGNORE
    return s, t, labels


def _run(fn, *args, grads_of):
    """Calls fn, backpropagates its (scalar) output, returns output and the gradients."""
    leaves = [a.detach().clone().requires_grad_(i in grads_of) if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for i, a in enumerate(args)]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [leaves[i].grad for i in grads_of]


def _assert_same(compiled, eager):
    (c_out, c_grads), (e_out, e_grads) = compiled, eager
    torch.testing.assert_close(c_out, e_out, rtol=1e-5, atol=1e-6)
    for c, e in zip(c_grads, e_grads):
        assert c is not None and c.dtype == e.dtype and c.shape == e.shape
        torch.testing.assert_close(c, e, rtol=1e-5, atol=4 * 2**-24 * e.abs().max().item())


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_distill_loss_forward_backward(kind):
    def loss_fn(s, t, labels):
        return kdext.distill_loss(s, t, kind, labels=labels, ignore_index=IGNORE, temperature=1.5, beta=0.3)

    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    s, t, labels = _inputs(0)
    eager = _run(loss_fn, s, t, labels, grads_of=[0])
    compiled = _run(compiled_fn, s, t, labels, grads_of=[0])
    _assert_same(compiled, eager)
    grad = compiled[1][0]
    assert (grad[labels == IGNORE] == 0).all() and grad[labels != IGNORE].abs().sum(-1).min() > 0
    # The same compiled function on new data (and another batch of ignored rows)
    # reuses the graph and still matches eager: nothing was baked in.
    s2, t2, labels2 = _inputs(1)
    _assert_same(_run(compiled_fn, s2, t2, labels2, grads_of=[0]), _run(loss_fn, s2, t2, labels2, grads_of=[0]))


def test_distill_loss_with_row_weights():
    def loss_fn(s, t, labels, w):
        return kdext.distill_loss(s, t, labels=labels, ignore_index=IGNORE, reduction="sum", weights=w)

    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    s, t, labels = _inputs(3)
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    _assert_same(_run(compiled_fn, s, t, labels, w, grads_of=[0]), _run(loss_fn, s, t, labels, w, grads_of=[0]))


def test_reverse_kl_mean_both_gradients():
    def loss_fn(s, t):
        return kdext.reverse_kl(s, t, temperature=0.8).mean()

    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    s, t, _ = _inputs(2)
    _assert_same(_run(compiled_fn, s, t, grads_of=[0, 1]), _run(loss_fn, s, t, grads_of=[0, 1]))


def test_logprobs():
    def loss_fn(x, tokens):
        return -kdext.logprobs(x, tokens, temperature=0.7).sum()

    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    x, _, tokens = _inputs(3)
    tokens = tokens.clamp(min=0)
    _assert_same(_run(compiled_fn, x, tokens, grads_of=[0]), _run(loss_fn, x, tokens, grads_of=[0]))
