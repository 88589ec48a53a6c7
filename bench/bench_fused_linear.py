"""Benchmark: fused LM-head distillation losses, forward+backward time and peak memory.

Providers, side by side in one run (student [N, H_s] -> V, teacher [N, H_t] -> V):
  kdext_fused    kdext.fused_linear_distill_loss (no [N, V] logits; gradients in the forward)
  kdext_unfused  kdext.distill_loss(h_s @ W_s.T, h_t @ W_t.T)
  gemms          the four GEMMs any fused LM-head loss must do (both projections, grad_hidden,
                 grad_weight) at full size, nothing else: the floor
  trl_chunked    TRL's ChunkedDivergenceFunction (trl.kernels.chunked_divergence; its torch tile
                 path on the CPU, Triton on CUDA); skipped with a line when trl is not installed
                 (bench/requirements.txt, `make bench` installs it)
  liger_jsd      Liger's LigerFusedLinearJSDLoss (chunked_loss; GPU, when installed)
  liger_fused    Liger's LigerFusedLinearJSD (the Triton one; GPU, when installed)
  eager          the plain formula: logits = h @ W.T, log_softmax, the divergence, mean
  compile        torch.compile of that formula (timed after compiling)

Time: the median (and min) of --reps forward+backward calls, each after a warmup. Memory
(`peak_MB`): one forward+backward in a fresh process per provider and size, after a warmup
call: the peak beyond the inputs and the gradients. CPU: the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) minus its resident set before the call, minus
the gradients' bytes, with kdext's CPU buffer pool off (KDEXT_CPU_POOL_MB=0) and glibc told
to return every block of >= 128 KiB to the OS when freed (MALLOC_MMAP_THRESHOLD_), so that
the resident set follows what the call allocates; GPU: torch.cuda.max_memory_allocated
minus the allocated bytes before the call, minus the gradients. `check`: the loss's relative
difference from kdext_fused's.

    python bench/bench_fused_linear.py --csv bench/results/fused_linear_cpu.csv
    python bench/bench_fused_linear.py --device cuda --dtype bf16 --rows 8192 --hidden 4096 \\
        --teacher-hidden 4096 --vocab 128256 --memory-rows 8192
"""

import argparse
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import kdext  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KIND_BETA = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": 0.5}  # TRL's / Liger's beta of each kind


# ---------------------------------------------------------------------------
# providers: fn(hs, ws, ht, wt) -> scalar loss (backpropagated into hs, ws)
# ---------------------------------------------------------------------------


def eager_loss(hs, ws, ht, wt, kind):
    ls = torch.log_softmax((hs @ ws.T).float(), -1)
    lt = torch.log_softmax((ht @ wt.T).float(), -1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1).mean()
    if kind == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1).mean()
    lm = torch.logsumexp(torch.stack([ls + math.log(0.5), lt + math.log(0.5)]), 0)
    return (0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)).mean()


def gemms(hs, ws, ht, wt):
    """The four GEMMs alone, at full size, in the dtypes kdext_fused runs them in (fp32 on the
    CPU; the inputs' on CUDA); the student's logits stand in for the [N, V] gradient."""
    cast = (lambda x: x) if hs.is_cuda else (lambda x: x.float())  # noqa: E731
    with torch.no_grad():
        zs = cast(hs) @ cast(ws).T
        cast(ht) @ cast(wt).T
        g = zs.to(ws.dtype) if hs.is_cuda else zs
        g @ cast(ws)
        g.T @ cast(hs)


def trl_provider(kind, device):
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except Exception as err:  # noqa: BLE001  (absent, or its imports fail)
        print(f"trl_chunked skipped: trl.kernels.chunked_divergence cannot be imported ({err!r}); "
              "pip install -r bench/requirements.txt", file=sys.stderr)
        return None
    beta = KIND_BETA[kind]

    def fn(hs, ws, ht, wt):
        div, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, 1.0)
        return div.mean()

    return fn


def liger_providers(kind):
    out = {}
    beta = KIND_BETA[kind]
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=1.0)
        dummy = {}

        def chunked(hs, ws, ht, wt):
            labels = dummy.setdefault(hs.shape[0], torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device))
            return jsd(hs, ws, ht, wt, labels)

        out["liger_jsd"] = chunked
    except Exception as err:  # noqa: BLE001
        print(f"liger_jsd skipped: {err!r}", file=sys.stderr)
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        fused = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)
        out["liger_fused"] = lambda hs, ws, ht, wt: fused(hs, ws, ht, wt)
    except Exception as err:  # noqa: BLE001
        print(f"liger_fused skipped: {err!r}", file=sys.stderr)
    return out


def make_providers(args, kind):
    param = {"beta": 0.5} if kind == "jsd" else {}
    providers = {
        "kdext_fused": lambda hs, ws, ht, wt: kdext.fused_linear_distill_loss(hs, ws, ht, wt, kind,
                                                                              chunk_size=args.chunk_size, **param),
        "kdext_unfused": lambda hs, ws, ht, wt: kdext.distill_loss(hs @ ws.T, ht @ wt.T, kind, **param),
        "gemms": gemms,
    }
    if not args.no_trl:
        trl = trl_provider(kind, args.device)
        if trl is not None:
            providers["trl_chunked"] = trl
    if args.device == "cuda":
        providers.update(liger_providers(kind))
    if not args.no_eager:
        providers["eager"] = lambda hs, ws, ht, wt: eager_loss(hs, ws, ht, wt, kind)
        if not args.no_compile:
            providers["compile"] = torch.compile(lambda hs, ws, ht, wt: eager_loss(hs, ws, ht, wt, kind))
    only = set(args.providers or providers)
    return {k: v for k, v in providers.items() if k in only}


def make_inputs(args, rows):
    gen = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[args.dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=args.device, dtype=dt)

    # Weights scaled so that the logits have a standard deviation of about 2.
    hs, ws = randn(rows, args.hidden), randn(args.vocab, args.hidden, scale=2 / math.sqrt(args.hidden))
    ht, wt = randn(rows, args.teacher_hidden), randn(args.vocab, args.teacher_hidden,
                                                     scale=2 / math.sqrt(args.teacher_hidden))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def fwd_bwd(fn, inputs):
    hs, ws, ht, wt = inputs
    hs.grad = ws.grad = None
    out = fn(hs, ws, ht, wt)
    if out is not None:
        out.backward()
    return out


def times(fn, inputs, args):
    """(median, min) seconds of forward+backward over --reps calls after --warmup."""
    for _ in range(args.warmup):
        fwd_bwd(fn, inputs)
    common.sync(args.device)
    ts = [common.time_once(lambda: fwd_bwd(fn, inputs), args.device) for _ in range(args.reps)]
    return statistics.median(ts), min(ts)


# ---------------------------------------------------------------------------
# memory, one provider and size per fresh process
# ---------------------------------------------------------------------------


def grad_bytes(inputs):
    hs, ws = inputs[0], inputs[1]
    return hs.numel() * hs.element_size() + ws.numel() * ws.element_size()


def memory_only(args):
    rows = args.memory_only_rows
    inputs = make_inputs(args, rows)
    fn = make_providers(args, args.kinds[0])[args.memory_only]
    fwd_bwd(fn, inputs)  # warmup: compilation, lazy initialisation
    inputs[0].grad = inputs[1].grad = None
    peak = common.peak_memory_bytes(lambda: fwd_bwd(fn, inputs), args.device)
    has_grads = args.memory_only != "gemms"
    print(json.dumps({"peak_bytes": peak - (grad_bytes(inputs) if has_grads else 0), "total_bytes": peak}))


def isolated_peak(args, name, kind, rows):
    argv = ["--device", args.device, "--dtype", args.dtype, "--hidden", str(args.hidden), "--teacher-hidden",
            str(args.teacher_hidden), "--vocab", str(args.vocab), "--kinds", kind, "--memory-only", name,
            "--memory-only-rows", str(rows)]
    if args.chunk_size:
        argv += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ, KDEXT_CPU_POOL_MB="0", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        return json.loads(common.run_isolated("bench.bench_fused_linear", argv, env=env))
    except Exception as err:  # noqa: BLE001  (one provider failing must not sink the table)
        print(f"memory of {name} at N = {rows} failed: {err!r}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main():
    def extra(p):
        p.add_argument("--rows", type=int, default=2048, help="N for the timings")
        p.add_argument("--memory-rows", type=int, nargs="*", default=[2048, 8192], help="N for the peak memory")
        p.add_argument("--hidden", type=int, default=256, help="student H")
        p.add_argument("--teacher-hidden", type=int, default=512)
        p.add_argument("--vocab", type=int, default=32000)
        p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
        p.add_argument("--kinds", nargs="+", default=["reverse_kl", "jsd"], choices=sorted(KIND_BETA))
        p.add_argument("--memory-kinds", nargs="*", default=None, help="kinds whose memory is measured (default: "
                       "the first of --kinds)")
        p.add_argument("--providers", nargs="*", default=None, help="only these providers")
        p.add_argument("--chunk-size", type=int, default=None, help="kdext_fused's chunk_size (default: budget)")
        p.add_argument("--no-trl", action="store_true")
        p.add_argument("--no-eager", action="store_true", help="skip eager and compile")
        p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
        p.add_argument("--memory-only-rows", type=int, default=None, help=argparse.SUPPRESS)

    args = common.parse_args(__doc__.splitlines()[0], extra)
    if args.memory_only:
        return memory_only(args)
    memory_kinds = args.memory_kinds if args.memory_kinds is not None else args.kinds[:1]
    inputs = make_inputs(args, args.rows)
    table = []
    for kind in args.kinds:
        providers = make_providers(args, kind)
        loss_ref = None
        for name, fn in providers.items():
            row = {"kind": kind, "provider": name, "rows": args.rows}
            try:
                med, lo = times(fn, inputs, args)
            except Exception as err:  # noqa: BLE001
                print(f"{name} {kind} failed: {err!r}", file=sys.stderr)
                continue
            row.update(fwd_bwd_s=med, min_s=lo)
            out = fwd_bwd(fn, inputs)
            if out is not None:
                loss = float(out)
                loss_ref = loss if name == "kdext_fused" else loss_ref
                row["check"] = abs(loss - loss_ref) / abs(loss_ref) if loss_ref else None
            if not args.no_memory and kind in memory_kinds:
                for n in args.memory_rows:
                    res = isolated_peak(args, name, kind, n)
                    if res is not None:
                        row[f"peak_MB@{n}"] = res["peak_bytes"] / 2**20
            table.append(row)
            print(f"  {kind:<10} {name:<14} {med:8.3f} s (min {lo:.3f})"
                  + "".join(f"  {k} {v:.4g}" for k, v in row.items() if k.startswith("peak") or k == "check"),
                  flush=True)
    base = {(r["kind"], r["provider"]): r["fwd_bwd_s"] for r in table}
    for r in table:
        fused = base.get((r["kind"], "kdext_fused"))
        floor = base.get((r["kind"], "gemms"))
        r["time_vs_kdext_fused"] = r["fwd_bwd_s"] / fused if fused else None
        r["time_vs_gemms"] = r["fwd_bwd_s"] / floor if floor else None
    peaks = [f"peak_MB@{n}" for n in args.memory_rows] if not args.no_memory else []
    columns = ["kind", "provider", "rows", "fwd_bwd_s", "min_s", "time_vs_kdext_fused", "time_vs_gemms"] + peaks \
        + ["check"]
    title = (f"fused LM-head loss fwd+bwd, N = {args.rows}, H_s = {args.hidden}, H_t = {args.teacher_hidden}, "
             f"V = {args.vocab}, {args.dtype}, on {common.machine_description(args.device)}; medians of {args.reps} "
             "(min_s: the fastest); time_vs_* = the provider's time / kdext_fused's (or the four GEMMs'); "
             "peak_MB: beyond the inputs and gradients")
    common.report(title, table, columns, args)


if __name__ == "__main__":
    main()
