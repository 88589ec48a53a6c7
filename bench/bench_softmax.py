"""Benchmark: softmax / log_softmax / entropy with temperature (and log-probs, see bench_logprobs.py).

Providers: kdext and the eager PyTorch formula (and torch.compile of it).

    python bench/bench_softmax.py --rows 1024 --vocab 32000 --csv bench/results/softmax_cpu.csv
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import kdext  # noqa: E402

T = 0.7


def ops(tokens):
    return {
        "softmax": (lambda x: kdext.softmax(x, T), lambda x: torch.softmax(x / T, -1)),
        "log_softmax": (lambda x: kdext.log_softmax(x, T), lambda x: torch.log_softmax(x / T, -1)),
        "entropy": (lambda x: kdext.entropy(x, T),
                    lambda x: -(torch.softmax(x / T, -1) * torch.log_softmax(x / T, -1)).sum(-1)),
        "logprobs": (lambda x: kdext.logprobs(x, tokens, T),
                     lambda x: torch.log_softmax(x / T, -1).gather(-1, tokens[:, None])[:, 0]),
    }


def main(default_ops="softmax,log_softmax,entropy", doc=__doc__):
    def extra(p):
        p.add_argument("--rows", type=int, default=1024)
        p.add_argument("--vocab", type=int, default=32000)
        p.add_argument("--ops", default=default_ops)

    args = common.parse_args(doc.splitlines()[0], extra)
    gen = torch.Generator(device=args.device).manual_seed(0)
    x = torch.randn(args.rows, args.vocab, generator=gen, device=args.device).requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.rows,), generator=gen, device=args.device)
    rows = []
    for op, (mine, eager) in ops(tokens).items():
        if op not in args.ops.split(","):
            continue
        providers = {"kdext": mine, "eager": eager}
        if not args.no_compile:
            providers["compile"] = torch.compile(eager)
        results = {}
        for name, fn in providers.items():
            fwd, bwd, both = common.time_forward_backward(fn, [x], args.device, args.reps, args.warmup)
            results[name] = {"op": op, "provider": name, "forward_s": fwd, "backward_s": bwd, "fwd_bwd_s": both}
        for r in results.values():
            r["kdext_speedup"] = r["fwd_bwd_s"] / results["kdext"]["fwd_bwd_s"]
            rows.append(r)
    columns = ["op", "provider", "forward_s", "backward_s", "fwd_bwd_s", "kdext_speedup"]
    common.report(f"{args.ops} [{args.rows}, {args.vocab}] fp32, T={T}, on "
                       f"{common.machine_description(args.device)}", rows, columns, args)


if __name__ == "__main__":
    main()
