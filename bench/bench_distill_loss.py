"""Benchmark: the distillation loss forward, backward and forward+backward.

Providers, side by side in one run:
  kdext          kdext.distill_loss (fused: the gradient is written in the forward pass)
  kdext_rowwise  kdext.<kind>(s, t).mean() (per-row op + its one-pass backward)
  eager          the plain-PyTorch formula users write (log_softmax, exp, sum)
  compile        torch.compile of that formula (timed after compiling)
  liger          Liger-Kernel's LigerJSD on log-softmaxes (GPU, when installed; beta=1 is reverse KL)

    python bench/bench_distill_loss.py --rows 2048 --vocab 32000 --csv bench/results/distill_loss_cpu.csv
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import kdext  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_loss(s, t, kind="reverse_kl", temperature=1.0):
    """What a user writes without kdext."""
    ls = torch.log_softmax(s.float() / temperature, dim=-1)
    lt = torch.log_softmax(t.float() / temperature, dim=-1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1).mean()
    if kind == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1).mean()
    raise ValueError(f"the eager reference covers reverse_kl and forward_kl, not {kind}")


def make_providers(args):
    kind = args.kind
    providers = {
        "kdext": lambda s, t: kdext.distill_loss(s, t, kind),
        "kdext_rowwise": lambda s, t: getattr(kdext, kind)(s, t).mean(),
        "eager": lambda s, t: reference_loss(s, t, kind),
    }
    if not args.no_compile:
        providers["compile"] = torch.compile(lambda s, t: reference_loss(s, t, kind))
    if args.device == "cuda":
        try:
            from liger_kernel.transformers import LigerJSD

            jsd = LigerJSD(beta=1.0 if kind == "reverse_kl" else 0.0)
            # LigerJSD(beta) follows the same convention: beta=1 is KL(student || teacher).
            providers["liger"] = lambda s, t: jsd(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
        except ImportError:
            pass
    return providers


def make_inputs(args):
    gen = torch.Generator(device=args.device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    s = torch.randn(args.rows, args.vocab, generator=gen, device=args.device).to(dtype).requires_grad_()
    t = torch.randn(args.rows, args.vocab, generator=gen, device=args.device).to(dtype)
    return s, t


def time_modes(fn, s, t, args):
    """Median seconds of forward, backward and forward+backward."""

    def forward():
        with torch.no_grad():
            fn(s, t)

    def fwd_bwd():
        s.grad = None
        fn(s, t).backward()

    fwd = common.median_time(forward, args.device, args.reps, args.warmup)
    both = common.median_time(fwd_bwd, args.device, args.reps, args.warmup)
    return fwd, max(both - fwd, 0.0), both


def isolated_peak(args, name):
    """Peak memory of one forward+backward of a provider, measured in a fresh process."""
    line = common.run_isolated(
        "bench.bench_distill_loss",
        ["--device", args.device, "--rows", str(args.rows), "--vocab", str(args.vocab), "--dtype", args.dtype,
         "--kind", args.kind, "--memory-only", name],
    )
    return json.loads(line)["peak_bytes"]


def memory_only(args):
    s, t = make_inputs(args)
    fn = make_providers(args)[args.memory_only]
    if args.memory_only == "compile":  # compile first: the graph, not its compilation, is measured
        fn(s, t).backward()
        s.grad = None

    def run():
        fn(s, t).backward()

    print(json.dumps({"peak_bytes": common.peak_memory_bytes(run, args.device)}))


def main():
    def extra(p):
        p.add_argument("--rows", type=int, default=2048)
        p.add_argument("--vocab", type=int, default=32000)
        p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
        p.add_argument("--kind", default="reverse_kl", choices=["reverse_kl", "forward_kl"])
        p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)

    args = common.parse_args(__doc__.splitlines()[0], extra)
    if args.memory_only:
        return memory_only(args)
    s, t = make_inputs(args)
    elem = s.element_size()
    grad_buffer = args.rows * args.vocab * 4  # one [N, V] fp32 buffer, the unit of the memory target
    io_bytes = 3 * args.rows * args.vocab * elem  # read both logits, write the gradient
    rows = []
    for name, fn in make_providers(args).items():
        fwd, bwd, both = time_modes(fn, s, t, args)
        row = {"provider": name, "forward_s": fwd, "backward_s": bwd, "fwd_bwd_s": both,
               "fwd_bwd_GBps": io_bytes / both / 1e9}
        if not args.no_memory:
            row["peak_mem_x_grad_buffer"] = isolated_peak(args, name) / grad_buffer
        rows.append(row)
    base = {r["provider"]: r for r in rows}["kdext"]
    for r in rows:
        r["kdext_speedup"] = r["fwd_bwd_s"] / base["fwd_bwd_s"]
    columns = ["provider", "forward_s", "backward_s", "fwd_bwd_s", "fwd_bwd_GBps", "peak_mem_x_grad_buffer",
               "kdext_speedup"]
    title = (f"distill_loss {args.kind} [{args.rows}, {args.vocab}] {args.dtype} on {common.machine_description(args.device)}"
             " (kdext_speedup = provider time / kdext time, fwd+bwd)")
    common.report(title, rows, columns, args)


if __name__ == "__main__":
    main()
