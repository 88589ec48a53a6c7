"""Loads the op library alone and checks the public per-row ops and their gradients.

    python tests/check_library_alone.py LIBRARY

LIBRARY is the compiled op library: build-cmake/libkdext_ops.so (what C++ users
load; run by ctest) or kdext/_C*.so (run by tests/test_library_alone.py). The
kdext Python package is not imported: everything here comes from the library's
own registrations, so the per-row ops' autograd must be C++ (csrc/autograd.cpp).
Values and gradients are compared with torch's float64 autograd on the same
inputs; gradcheck runs on each op. Exits non-zero on the first failure.
"""

import math
import sys

import torch

from reference import divergence


def reference(name, s, t, param, temperature):
    """The float64 per-row value, differentiable by torch itself (tests/reference.py: plain torch,
    no kdext)."""
    return divergence(s, t, name, 0.0 if param is None else param, temperature)


def main(library):
    torch.ops.load_library(library)
    assert "kdext" not in sys.modules, "the kdext package must not be imported"
    ops = torch.ops.kdext
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64) * 2
    temperature = 1.3

    for name, param in (("reverse_kl", None), ("forward_kl", None), ("jsd", 0.3), ("skew_forward_kl", 0.1),
                        ("skew_reverse_kl", 0.2), ("tvd", None)):
        op = getattr(ops, name)
        args = (temperature,) if param is None else (param, temperature)
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = op(a, b, *args)
        assert out.requires_grad, f"{name}: no autograd from the library alone"
        out.sum().backward()
        ra, rb = s.clone().requires_grad_(), t.clone().requires_grad_()
        reference(name, ra, rb, param, temperature).sum().backward()
        torch.testing.assert_close(out.detach(), reference(name, s, t, param, temperature), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, ra.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.grad, rb.grad, rtol=1e-9, atol=1e-12)
        assert torch.autograd.gradcheck(lambda x, y: op(x, y, *args), (s.clone().requires_grad_(),
                                                                        t.clone().requires_grad_()))

    x = s.clone().requires_grad_()
    h = ops.entropy(x, temperature)
    lq = torch.log_softmax(s / temperature, -1)
    torch.testing.assert_close(h.detach(), -(lq.exp() * lq).sum(-1), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda y: ops.entropy(y, temperature), (s.clone().requires_grad_(),))

    tokens = torch.randint(0, 11, (2, 3), generator=gen)
    lp = ops.logprobs(x, tokens, temperature)
    torch.testing.assert_close(lp.detach(), lq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda y: ops.logprobs(y, tokens, temperature), (s.clone().requires_grad_(),))

    # lse_float64 is not differentiable: its output never requires grad.
    lse = ops.lse_float64(x.float(), temperature)
    assert lse.dtype == torch.float64 and not lse.requires_grad
    assert math.isclose(lse[0, 0].item(), torch.logsumexp(s[0, 0].float().double() / temperature, -1).item(),
                        abs_tol=1e-5)
    print(f"{library}: the per-row ops and their gradients work from the library alone")


if __name__ == "__main__":
    main(sys.argv[1])
