"""Benchmark of kdext.top_p_sample against sort-based top-p sampling (and FlashInfer on GPU).

Methods, each drawing one token per row of [rows, vocab] logits with top_p:
  kdext             kdext.top_p_sample (sort-free threshold search + inverse-CDF draw)
  sorted            what Hugging Face's TopPLogitsWarper + multinomial do: sort, softmax, cumsum,
                    mask, scatter back, softmax, multinomial
  flashinfer        (GPU, when importable) softmax, then flashinfer.sampling.top_p_sampling_from_probs
With --alpha > 0 the distribution is the teacher mix (1 - alpha) q + alpha p; the sorted
reference then mixes the two softmaxes first (FlashInfer is skipped: it takes one distribution).

Timings are medians over --repeats runs, the methods interleaved run by run so that load on a
shared machine hits them alike. Usage:
  python bench/bench_top_p_sample.py --device cpu [--csv bench/results/top_p_sample_cpu.csv]
  python bench/bench_top_p_sample.py --device cuda --rows 256
"""

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kdext.sampling import top_p_sample  # noqa: E402


def sorted_reference(logits, top_p, teacher=None, alpha=0.0, generator=None):
    """Hugging Face's top-p warper followed by multinomial sampling."""
    if alpha > 0.0:
        probs = (1 - alpha) * torch.softmax(logits.float(), -1) + alpha * torch.softmax(teacher.float(), -1)
        scores = probs.log()
    else:
        scores = logits.float()
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -1:] = False  # keep at least one token
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    scores = scores.masked_fill(indices_to_remove, -float("inf"))
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)


def flashinfer_sampler():
    try:
        import flashinfer.sampling as fs  # noqa: F401
    except Exception:  # not installed, or built for another torch / GPU
        return None

    def run(logits, top_p):
        return fs.top_p_sampling_from_probs(torch.softmax(logits.float(), -1), top_p)

    return run


def timer(device):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def machine_description(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rows", type=int, default=None, help="default: 64 on cpu, 256 on cuda")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--alpha", type=float, nargs="*", default=[0.0, 0.2],
                    help="teacher mix weights to measure (0: student only)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=None, help="default: 7 on cpu, 50 on cuda")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--csv", default=None, help="write the table here")
    args = ap.parse_args()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    rows = args.rows or (256 if device == "cuda" else 64)
    repeats = args.repeats or (50 if device == "cuda" else 7)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    # Logits shaped like a language model's: a heavy head and a long tail.
    student = (torch.randn(rows, args.vocab, generator=g) * 2.5).to(device=device, dtype=dtype)
    teacher = (torch.randn(rows, args.vocab, generator=g) * 2.5).to(device=device, dtype=dtype)
    fi = flashinfer_sampler() if device == "cuda" else None
    if device == "cuda" and fi is None:
        print("flashinfer is not importable: skipping it")
    measure = timer(device)

    results = []
    for alpha in args.alpha:
        t = teacher if alpha > 0 else None
        methods = {
            "kdext": lambda i: top_p_sample(student, top_p=args.top_p, teacher_logits=t, alpha=alpha, seed=i),
            "sorted": lambda i: sorted_reference(student, args.top_p, t, alpha),
        }
        if fi is not None and alpha == 0.0:
            methods["flashinfer"] = lambda i: fi(student, args.top_p)
        times = {name: [] for name in methods}
        for i in range(args.warmup):
            for fn in methods.values():
                fn(i)
        for i in range(repeats):
            for name, fn in methods.items():
                times[name].append(measure(lambda: fn(i)))
        ref = statistics.median(times["sorted"])
        for name, ts in times.items():
            med = statistics.median(ts)
            results.append(dict(device=device, rows=rows, vocab=args.vocab, dtype=args.dtype, top_p=args.top_p,
                                alpha=alpha, method=name, median_ms=round(med * 1e3, 3),
                                min_ms=round(min(ts) * 1e3, 3), speedup_vs_sorted=round(ref / med, 2)))

    header = ["device", "rows", "vocab", "dtype", "top_p", "alpha", "method", "median_ms", "min_ms",
              "speedup_vs_sorted"]
    widths = [max(len(h), *(len(str(r[h])) for r in results)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in results:
        print("  ".join(str(r[h]).rjust(w) for h, w in zip(header, widths)))
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            f.write(f"# command: python {' '.join(sys.argv)}\n")
            f.write(f"# machine: {machine_description(device)}\n")
            try:
                f.write(f"# load average at the end of the run: {os.getloadavg()}\n")
            except OSError:
                pass
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(results)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
