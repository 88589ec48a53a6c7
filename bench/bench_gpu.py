"""GPU benchmark of kdext's CUDA kernels against torch eager, torch.compile and Liger-Kernel.

Prints ONE table (and writes it as Markdown, CSV and JSON under --out):
op, provider, median time, effective GB/s (bytes that must move: every input
[rows, V] tensor read once, every [rows, V] output written once), that as a
fraction of the measured device-to-device copy bandwidth (read + write), and
the speedup of kdext over the provider. The headline shape is bf16
[8192, 128256]; the headline targets (issue 3):
  distill_loss reverse KL fwd+bwd >= 85% of copy bandwidth, >= 1.3x Liger's
  fused JSD(beta=1) (= reverse KL), >= 3x eager; reverse_kl forward >= 90%.

Liger's JSD takes log-probabilities, so its provider is what a user with
logits runs: log_softmax of both, LigerJSDFunction(beta=1), and the backward
through the student's log_softmax. Every provider computes the same loss; the
"check" column gives its relative difference from kdext's.

Usage: python bench/bench_gpu.py --out OUT [--rows 8192 --vocab 128256 --budget-s 240 --no-compile]
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

import torch

import kdext

ops = torch.ops.kdext


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

_FLUSH = None


def flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    _FLUSH.zero_()


def bench(fn, warmup=2, iters=10, max_s=20.0):
    """Median milliseconds of fn() over iters runs (each after an L2 flush), CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.time()
    for _ in range(iters):
        flush_l2()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if time.time() - t_start > max_s and len(times) >= 3:
            break
    return statistics.median(times)


def copy_bandwidth():
    """Device-to-device copy GB/s, counting bytes read plus written (as the targets do)."""
    n = 2 * 2**30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.fill_(1)
    ms = bench(lambda: y.copy_(x), warmup=3, iters=20)
    del x, y
    return 2 * n / (ms * 1e-3) / 1e9, ms


# ---------------------------------------------------------------------------
# references: the plain-PyTorch formulas of bench/bench_divergence.py (float32 math)
# ---------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_divergence import eager_op  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from reference import DIVERGENCES  # noqa: E402  (the kinds and parameters the tests use)


def rows_eager(kind, s, t, param=0.0):
    """Per-row divergence values, plain PyTorch (T = 1)."""
    return eager_op(kind, param)(s, t)


def loss_eager(kind, s, t, param=0.0):
    return rows_eager(kind, s, t, param).mean()


def liger_rkl_loss():
    """Liger's fused JSD with beta = 1 (reverse KL) on log_softmax outputs, or None if not installed."""
    try:
        from liger_kernel.ops.jsd import LigerJSDFunction
    except Exception as err:  # noqa: BLE001
        print(f"liger-kernel unavailable: {err!r}", file=sys.stderr)
        return None

    def fn(s, t):
        V = s.shape[-1]
        lq = torch.log_softmax(s, -1).view(-1, V)
        lp = torch.log_softmax(t, -1).view(-1, V)
        return LigerJSDFunction.apply(lq, lp, None, 1.0)

    return fn


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------


class Table:
    def __init__(self, copy_gbs):
        self.copy_gbs = copy_gbs
        self.rows = []

    def add(self, op, provider, ms, nbytes, check=""):
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else float("nan")
        self.rows.append({"op": op, "provider": provider, "ms": ms, "GB/s": gbs,
                          "frac_copy": gbs / self.copy_gbs, "check": check})
        print(f"  {op:<42} {provider:<28} {ms:9.3f} ms {gbs:8.0f} GB/s {100 * gbs / self.copy_gbs:6.1f}% {check}",
              flush=True)

    def finish(self):
        kd = {r["op"]: r["ms"] for r in self.rows if r["provider"].startswith("kdext")}
        for r in self.rows:
            base = kd.get(r["op"])
            r["kdext_speedup"] = (r["ms"] / base) if base and not r["provider"].startswith("kdext") else float("nan")

    def markdown(self):
        head = "| op | provider | time (ms) | GB/s | % of copy BW | kdext speedup | check |\n|---|---|---:|---:|---:|---:|---|\n"
        lines = []
        for r in self.rows:
            sp = "" if math.isnan(r["kdext_speedup"]) else f"{r['kdext_speedup']:.2f}x"
            lines.append(f"| {r['op']} | {r['provider']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
                         f"{100 * r['frac_copy']:.1f}% | {sp} | {r['check']} |")
        return head + "\n".join(lines) + "\n"


def rel_diff(a, b):
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return "nan"
    return f"rel diff {abs(a - b) / max(abs(b), 1e-30):.1e}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench_gpu_out"))
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    left = lambda: args.budget_s - (time.time() - t0)
    dtype = getattr(torch, args.dtype)
    N, V = args.rows, args.vocab
    el = torch.tensor([], dtype=dtype).element_size()
    one = N * V * el  # bytes of one [N, V] tensor
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; kdext build {kdext.BUILD_INFO}; shape {args.dtype} [{N}, {V}]")

    copy_gbs, copy_ms = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write; 2 GiB in {copy_ms:.3f} ms)")
    tab = Table(copy_gbs)

    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    t = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    liger = liger_rkl_loss()
    compiled = {}

    def compiled_fn(key, fn):
        if args.no_compile:
            return None
        if key not in compiled:
            compiled[key] = torch.compile(fn, dynamic=False)
        return compiled[key]

    def fwd_bwd(loss_fn, x, y):
        def run():
            xx = x.detach().requires_grad_(True)
            loss = loss_fn(xx, y)
            loss.backward()
            return loss
        return run

    def guarded(name, fn):
        if left() < 15:
            print(f"  {name}: skipped (time budget)", flush=True)
            return
        try:
            fn()
        except torch.cuda.OutOfMemoryError as err:
            print(f"  {name}: out of memory ({err})", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"  {name}: failed: {err!r}", flush=True)
        torch.cuda.empty_cache()

    # ---- headline: fused reverse-KL loss, forward + backward ------------------------
    op = "distill_loss reverse_kl fwd+bwd"
    ref_loss = {}

    def headline():
        w = torch.full((N,), 1.0 / N, device="cuda")
        ms = bench(lambda: ops.divergence_loss(s, t, w, "reverse_kl", 0.0, 1.0))
        ref_loss["kdext"] = float(ops.divergence_loss(s, t, w, "reverse_kl", 0.0, 1.0)[0])
        tab.add(op, "kdext (divergence_loss op)", ms, 3 * one)
        run = fwd_bwd(lambda x, y: kdext.distill_loss(x, y, kind="reverse_kl"), s, t)
        tab.add(op + " [autograd]", "kdext (distill_loss+backward)", bench(run), 3 * one)

    def eager_loss():
        run = fwd_bwd(lambda x, y: loss_eager("reverse_kl", x, y), s, t)
        ms = bench(run, warmup=1, iters=5)
        tab.add(op, "torch eager", ms, 3 * one, rel_diff(run(), ref_loss.get("kdext", float("nan"))))

    def compile_loss():
        fn = compiled_fn("rkl_loss", lambda x, y: loss_eager("reverse_kl", x, y))
        if fn is None or left() < 100:  # compiling takes tens of seconds
            print("  torch.compile loss: skipped", flush=True)
            return
        run = fwd_bwd(fn, s, t)
        tc = time.time()
        run()
        torch.cuda.synchronize()
        print(f"  (torch.compile of the loss took {time.time() - tc:.1f} s)")
        tab.add(op, "torch.compile", bench(run, warmup=1, iters=5), 3 * one,
                rel_diff(run(), ref_loss.get("kdext", float("nan"))))

    def liger_loss():
        if liger is None:
            return
        run = fwd_bwd(liger, s, t)
        tab.add(op, "liger (log_softmax+JSD b=1)", bench(run, warmup=2, iters=5), 3 * one,
                rel_diff(run(), ref_loss.get("kdext", float("nan"))))

    for name, fn in [("headline", headline), ("eager loss", eager_loss), ("liger loss", liger_loss),
                     ("compile loss", compile_loss)]:
        guarded(name, fn)

    # ---- reverse_kl forward and backward alone --------------------------------------------
    def rkl_forward():
        o = "reverse_kl forward (per-row)"
        ms = bench(lambda: ops.divergence_forward(s, t, "reverse_kl", 0.0, 1.0))
        v = ops.divergence_forward(s, t, "reverse_kl", 0.0, 1.0)[0]
        tab.add(o, "kdext", ms, 2 * one)
        ms = bench(lambda: rows_eager("reverse_kl", s, t), warmup=1, iters=5)
        tab.add(o, "torch eager", ms, 2 * one, rel_diff(rows_eager("reverse_kl", s, t).sum(), v.sum()))
        fn = compiled_fn("rkl_rows", lambda x, y: rows_eager("reverse_kl", x, y))
        if fn is not None and left() > 100:
            fn(s, t)
            tab.add(o, "torch.compile", bench(lambda: fn(s, t), warmup=1, iters=5), 2 * one,
                    rel_diff(fn(s, t).sum(), v.sum()))

    def rkl_backward():
        o = "reverse_kl backward (student grad)"
        v, st = ops.divergence_forward(s, t, "reverse_kl", 0.0, 1.0)
        gv = torch.ones_like(v)
        ms = bench(lambda: ops.divergence_backward(gv, s, t, st, "reverse_kl", 0.0, 1.0, True, False))
        tab.add(o, "kdext", ms, 3 * one)
        x = s.detach().requires_grad_(True)
        vals = rows_eager("reverse_kl", x, t)
        ms = bench(lambda: torch.autograd.grad(vals, x, gv, retain_graph=True), warmup=1, iters=5)
        tab.add(o, "torch eager (autograd.grad)", ms, 3 * one)
        del vals, x

    for name, fn in [("rkl forward", rkl_forward), ("rkl backward", rkl_backward)]:
        guarded(name, fn)

    # ---- the rest of the divergence family (kdext vs eager) ----------------------------------
    for kind, param in [(k, p) for k, p in DIVERGENCES.items() if k != "reverse_kl"]:  # reverse_kl: above
        def fam(kind=kind, param=param):
            w = torch.full((N,), 1.0 / N, device="cuda")
            o = f"distill_loss {kind} fwd+bwd"
            ms = bench(lambda: ops.divergence_loss(s, t, w, kind, param, 1.0), iters=5)
            ref = float(ops.divergence_loss(s, t, w, kind, param, 1.0)[0])
            tab.add(o, "kdext", ms, 3 * one)
            run = fwd_bwd(lambda x, y: loss_eager(kind, x, y, param), s, t)
            tab.add(o, "torch eager", bench(run, warmup=1, iters=3), 3 * one, rel_diff(run(), ref))
            o = f"{kind} forward (per-row)"
            tab.add(o, "kdext", bench(lambda: ops.divergence_forward(s, t, kind, param, 1.0), iters=5), 2 * one)
            tab.add(o, "torch eager", bench(lambda: rows_eager(kind, s, t, param), warmup=1, iters=3), 2 * one)
        guarded(kind, fam)

    # ---- softmax family and logprobs ---------------------------------------------------------
    def softmax_ops():
        y = ops.softmax(s, 1.0)
        tab.add("softmax", "kdext", bench(lambda: ops.softmax(s, 1.0)), 2 * one)
        diff = float((torch.softmax(s, -1).float() - y.float()).abs().max())
        tab.add("softmax", "torch eager", bench(lambda: torch.softmax(s, -1)), 2 * one, f"max abs diff {diff:.1e}")
        tab.add("log_softmax", "kdext", bench(lambda: ops.log_softmax(s, 1.0)), 2 * one)
        tab.add("log_softmax", "torch eager", bench(lambda: torch.log_softmax(s, -1)), 2 * one)
        gy = torch.randn_like(y)
        tab.add("softmax backward", "kdext", bench(lambda: ops.softmax_backward(gy, y, 1.0, False)), 3 * one)
        tab.add("softmax backward", "torch eager",
                bench(lambda: torch._softmax_backward_data(gy, y, -1, y.dtype)), 3 * one)
        del y, gy
        tab.add("logsumexp", "kdext", bench(lambda: ops.logsumexp(s, 1.0)), one)
        tab.add("logsumexp", "torch eager", bench(lambda: torch.logsumexp(s.float(), -1)), one)
        h, lse = ops.entropy_forward(s, 1.0, None)
        tab.add("entropy forward", "kdext", bench(lambda: ops.entropy_forward(s, 1.0, None)), one)
        ent_eager = lambda x: -(torch.softmax(x.float(), -1) * torch.log_softmax(x.float(), -1)).sum(-1)
        tab.add("entropy forward", "torch eager", bench(lambda: ent_eager(s), warmup=1, iters=5), one,
                rel_diff(ent_eager(s).sum(), h.sum()))
        gh = torch.ones_like(h)
        tab.add("entropy backward", "kdext", bench(lambda: ops.entropy_backward(gh, s, h, lse, 1.0)), 2 * one)
        tok = torch.randint(0, V, (N,), device="cuda")
        lp, lse2 = ops.logprobs_forward(s, tok, 1.0)
        tab.add("logprobs forward", "kdext", bench(lambda: ops.logprobs_forward(s, tok, 1.0)), one)
        lp_eager = lambda x: torch.log_softmax(x.float(), -1).gather(-1, tok[:, None])[:, 0]
        tab.add("logprobs forward", "torch eager", bench(lambda: lp_eager(s), warmup=1, iters=5), one,
                rel_diff(lp_eager(s).sum(), lp.sum()))
        tab.add("logprobs backward", "kdext",
                bench(lambda: ops.logprobs_backward(torch.ones_like(lp), s, tok, lse2, 1.0)), 2 * one)

    guarded("softmax family", softmax_ops)

    tab.finish()
    md = tab.markdown()
    meta = {"device": dev, "torch": torch.__version__, "shape": [N, V], "dtype": args.dtype,
            "copy_GBps": copy_gbs, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "kdext_build": kdext.BUILD_INFO,
            "liger": liger is not None}
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(f"# kdext GPU benchmark\n\n{dev}, torch {torch.__version__}, {args.dtype} [{N}, {V}], "
                f"copy bandwidth {copy_gbs:.0f} GB/s, {meta['date']}\n\n" + md)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": tab.rows}, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench_gpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(tab.rows[0].keys()) if tab.rows else ["op"])
        w.writeheader()
        w.writerows(tab.rows)
    print()
    print(f"{dev} | {args.dtype} [{N}, {V}] | copy {copy_gbs:.0f} GB/s")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
