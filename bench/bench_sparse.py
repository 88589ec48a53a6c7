"""Benchmark: the sparse family (the offline teacher).

  topk   kdext.topk_logprobs(x, k, T) against what users run without it:
           torch_topk_lse   torch.topk(x / T, k) plus torch.logsumexp(x / T) (log-probs = values - lse)
           torch_lsm_topk   torch.log_softmax(x / T).topk(k)
         over k and dtypes; kdext_speedup = the provider's time / kdext's (1 for kdext itself; the
         issue's target is >= 4 against the faster of the two torch providers).
  loss   kdext.sparse_distill_loss (tail="bucket" and "renormalize", k stored ids per row) against
         the dense kdext.distill_loss on the full teacher logits: forward+backward time, the
         teacher's bytes each needs, and the peak memory of one step (fresh process).

Providers run round-robin, one call each per round, so that drift on a shared machine hits all
of them alike; the table gives the median, min and max over the rounds.

    python bench/bench_sparse.py --rows 4096 --vocab 128256 --csv bench/results/sparse_cpu.csv
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import kdext  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
T = 1.0


def topk_providers(k):
    # The torch providers run in the input's dtype (T = 1: no division), their fastest form.
    return {
        "kdext": lambda x: kdext.topk_logprobs(x, k, T),
        "torch_topk_lse": lambda x: (torch.topk(x, k), torch.logsumexp(x, -1)),
        "torch_lsm_topk": lambda x: torch.log_softmax(x, -1).topk(k),
    }


def round_robin(fns, device, reps, warmup):
    """{name: [seconds per round]} with the providers interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    common.sync(device)
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def stats(ts):
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}


def bench_topk(args, rows_out):
    gen = torch.Generator(device=args.device).manual_seed(0)
    base = torch.randn(args.rows, args.vocab, generator=gen, device=args.device) * 3
    for dname in args.dtypes.split(","):
        x = base.to(DTYPES[dname])
        for k in (int(v) for v in args.ks.split(",")):
            fns = {n: (lambda f=f: f(x)) for n, f in topk_providers(k).items()}
            times = round_robin(fns, args.device, args.reps, args.warmup)
            kdext_median = statistics.median(times["kdext"])
            for n, ts in times.items():
                rows_out.append({"bench": "topk", "provider": n, "dtype": dname, "k": k, **stats(ts),
                                 "GBps": x.numel() * x.element_size() / statistics.median(ts) / 1e9,
                                 "kdext_speedup": statistics.median(ts) / kdext_median})
        del x


def loss_inputs(args):
    gen = torch.Generator(device=args.device).manual_seed(1)
    dtype = DTYPES[args.loss_dtype]
    s = (torch.randn(args.rows, args.vocab, generator=gen, device=args.device) * 2).to(dtype).requires_grad_()
    t = (torch.randn(args.rows, args.vocab, generator=gen, device=args.device) * 2).to(dtype)
    ids, lp, _ = kdext.topk_logprobs(t, args.loss_k, T)
    return s, t, ids, lp


def loss_providers(args, t, ids, lp):
    return {
        "sparse_bucket": lambda s: kdext.sparse_distill_loss(s, ids, lp, args.kind, "bucket", temperature=T),
        "sparse_renormalize": lambda s: kdext.sparse_distill_loss(s, ids, lp, args.kind, "renormalize", temperature=T),
        "dense": lambda s: kdext.distill_loss(s, t, args.kind, temperature=T),
    }


def teacher_bytes(name, t, ids, lp):
    if name == "dense":
        return t.numel() * t.element_size()
    return ids.numel() * ids.element_size() + lp.numel() * lp.element_size()


def bench_loss(args, rows_out):
    s, t, ids, lp = loss_inputs(args)
    provs = loss_providers(args, t, ids, lp)

    def step(fn):
        s.grad = None
        fn(s).backward()

    times = round_robin({n: (lambda f=f: step(f)) for n, f in provs.items()}, args.device, args.reps, args.warmup)
    dense = statistics.median(times["dense"])
    grad_buffer = s.numel() * 4
    for n, ts in times.items():
        r = {"bench": "loss", "provider": n, "dtype": args.loss_dtype, "k": args.loss_k, **stats(ts),
             "kdext_speedup": dense / statistics.median(ts),
             "teacher_MB": teacher_bytes(n, t, ids, lp) / 2**20}
        if not args.no_memory:
            r["peak_mem_x_grad_buffer"] = isolated_peak(args, n) / grad_buffer
        rows_out.append(r)


def isolated_peak(args, name):
    line = common.run_isolated(
        "bench.bench_sparse",
        ["--device", args.device, "--rows", str(args.rows), "--vocab", str(args.vocab), "--loss-dtype", args.loss_dtype,
         "--loss-k", str(args.loss_k), "--kind", args.kind, "--memory-only", name],
    )
    return json.loads(line)["peak_bytes"]


def memory_only(args):
    s, t, ids, lp = loss_inputs(args)
    fn = loss_providers(args, t, ids, lp)[args.memory_only]

    def run():
        fn(s).backward()

    print(json.dumps({"peak_bytes": common.peak_memory_bytes(run, args.device)}))


def main():
    import argparse

    def extra(p):
        p.add_argument("--rows", type=int, default=4096)
        p.add_argument("--vocab", type=int, default=128256)
        p.add_argument("--ks", default="8,32,64", help="k values of the topk benchmark")
        p.add_argument("--dtypes", default="fp32,bf16", help="dtypes of the topk benchmark")
        p.add_argument("--loss-k", type=int, default=64)
        p.add_argument("--loss-dtype", default="fp32", choices=sorted(DTYPES))
        p.add_argument("--kind", default="forward_kl")
        p.add_argument("--only", default="topk,loss")
        p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)

    args = common.parse_args(__doc__.splitlines()[0], extra)
    if args.memory_only:
        return memory_only(args)
    rows = []
    if "topk" in args.only:
        bench_topk(args, rows)
    if "loss" in args.only:
        bench_loss(args, rows)
    columns = ["bench", "provider", "dtype", "k", "median_s", "min_s", "max_s", "GBps", "teacher_MB",
               "peak_mem_x_grad_buffer", "kdext_speedup"]
    title = (f"sparse [{args.rows}, {args.vocab}], {args.reps} rounds, on {common.machine_description(args.device)} "
             "(topk: kdext_speedup = provider / kdext; loss: dense / provider, fwd+bwd)")
    common.print_table(title, rows, columns)
    if args.csv:
        common.write_csv(args.csv, rows, columns, common.command_line(), args.device)


if __name__ == "__main__":
    main()
