"""Benchmark: the per-row divergence ops (forward, backward, forward+backward) for every kind.

Providers: kdext.<kind>, the eager PyTorch formula, and torch.compile of it.

    python bench/bench_divergence.py --rows 1024 --vocab 32000 --csv bench/results/divergence_cpu.csv
"""

import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import common  # noqa: E402
from reference import DIVERGENCES, call_divergence  # noqa: E402  (the kinds and parameters the tests use)

import kdext  # noqa: E402


def kdext_op(kind, param):
    return lambda s, t: call_divergence(kdext, kind, param, s, t)


def eager_op(kind, param):
    """The formula a user writes in plain PyTorch (float32 math)."""

    def kl(la, lb):
        return (la.exp() * (la - lb)).sum(-1)

    def op(s, t):
        ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
        if kind == "reverse_kl":
            return kl(ls, lt)
        if kind == "forward_kl":
            return kl(lt, ls)
        if kind == "tvd":
            return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
        if kind == "jsd":
            lm = torch.logaddexp(lt + math.log(param), ls + math.log1p(-param))
            return param * kl(lt, lm) + (1 - param) * kl(ls, lm)
        if kind == "skew_forward_kl":
            return kl(lt, torch.log(param * lt.exp() + (1 - param) * ls.exp()))
        return kl(ls, torch.log((1 - param) * lt.exp() + param * ls.exp()))

    return op


def main():
    def extra(p):
        p.add_argument("--rows", type=int, default=1024)
        p.add_argument("--vocab", type=int, default=32000)
        p.add_argument("--kinds", default=",".join(DIVERGENCES))

    args = common.parse_args(__doc__.splitlines()[0], extra)
    gen = torch.Generator(device=args.device).manual_seed(0)
    s = torch.randn(args.rows, args.vocab, generator=gen, device=args.device).requires_grad_()
    t = torch.randn(args.rows, args.vocab, generator=gen, device=args.device).requires_grad_()
    rows = []
    for kind in args.kinds.split(","):
        param = DIVERGENCES[kind]
        providers = {"kdext": kdext_op(kind, param), "eager": eager_op(kind, param)}
        if not args.no_compile:
            providers["compile"] = torch.compile(eager_op(kind, param))
        results = {}
        for name, fn in providers.items():
            fwd, bwd, both = common.time_forward_backward(fn, [s, t], args.device, args.reps, args.warmup)
            t.grad = None
            results[name] = {"kind": kind, "provider": name, "forward_s": fwd, "backward_s": bwd, "fwd_bwd_s": both,
                             "forward_GBps": 2 * s.numel() * s.element_size() / fwd / 1e9}
        for r in results.values():
            r["kdext_speedup"] = r["fwd_bwd_s"] / results["kdext"]["fwd_bwd_s"]
            rows.append(r)
    columns = ["kind", "provider", "forward_s", "backward_s", "fwd_bwd_s", "forward_GBps", "kdext_speedup"]
    common.report(
        f"per-row divergences [{args.rows}, {args.vocab}] fp32, gradients for both inputs, on "
        f"{common.machine_description(args.device)} (kdext_speedup = provider / kdext, fwd+bwd)", rows, columns, args)


if __name__ == "__main__":
    main()
