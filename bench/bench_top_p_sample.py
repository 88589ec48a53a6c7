"""Benchmark: top-p sampling (kdext.top_p_sample) vs sort-based sampling, and FlashInfer on GPU.

Providers, each drawing one token per row of [rows, vocab] logits with top_p:
  kdext       kdext.top_p_sample: sort-free threshold search + inverse-CDF draw, one op
  sorted      Hugging Face's TopPLogitsWarper + multinomial: sort, softmax, cumsum, mask,
              scatter back, softmax, multinomial
  flashinfer  (GPU, when importable) softmax, then flashinfer.sampling.top_p_sampling_from_probs
With --alpha > 0 the distribution is the teacher mix (1 - alpha) q + alpha p of MiniLLM; the
sorted reference then mixes the two softmaxes first (FlashInfer is left out: it samples one
given distribution). The providers are timed run by run in turn (medians of --reps), so that
load on a shared machine hits them alike; the ratio to `sorted` is what carries over.

    python bench/bench_top_p_sample.py --device cpu --csv bench/results/top_p_sample_cpu.csv
    python bench/bench_top_p_sample.py --device cuda --rows 256
"""

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import kdext  # noqa: E402,F401
from kdext.top_p_sample import top_p_sample  # noqa: E402


def sorted_reference(logits, top_p, teacher=None, alpha=0.0):
    """Hugging Face's top-p warper followed by multinomial sampling."""
    if alpha > 0.0:
        scores = ((1 - alpha) * torch.softmax(logits.float(), -1) + alpha * torch.softmax(teacher.float(), -1)).log()
    else:
        scores = logits.float()
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -1:] = False  # keep at least one token
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    scores = scores.masked_fill(indices_to_remove, -float("inf"))
    return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(-1)


def flashinfer_sampler():
    try:
        import flashinfer.sampling as fs
    except Exception:  # not installed, or built for another torch / GPU
        return None
    return lambda logits, top_p: fs.top_p_sampling_from_probs(torch.softmax(logits.float(), -1), top_p)


def main():
    def extra(p):
        p.add_argument("--rows", type=int, default=None, help="default: 64 on cpu, 256 on cuda")
        p.add_argument("--vocab", type=int, default=128256)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--alpha", type=float, nargs="*", default=[0.0, 0.2],
                       help="teacher mix weights to measure (0: student only)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")

    args = common.parse_args(__doc__.splitlines()[0], extra)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    rows = args.rows or (256 if device == "cuda" else 64)
    reps = args.reps if device == "cpu" else max(args.reps, 50)
    g = torch.Generator().manual_seed(0)
    # Wide logits, like a language model's: a heavy head and a long tail.
    dtype = getattr(torch, args.dtype)
    student = (torch.randn(rows, args.vocab, generator=g) * 2.5).to(device=device, dtype=dtype)
    teacher = (torch.randn(rows, args.vocab, generator=g) * 2.5).to(device=device, dtype=dtype)
    fi = flashinfer_sampler() if device == "cuda" else None
    if device == "cuda" and fi is None:
        print("flashinfer is not importable: skipping it")

    results = []
    for alpha in args.alpha:
        t = teacher if alpha > 0 else None
        providers = {
            "kdext": lambda i, t=t, a=alpha: top_p_sample(student, top_p=args.top_p, teacher_logits=t, alpha=a, seed=i),
            "sorted": lambda i, t=t, a=alpha: sorted_reference(student, args.top_p, t, a),
        }
        if fi is not None and alpha == 0.0:
            providers["flashinfer"] = lambda i: fi(student, args.top_p)
        times = {name: [] for name in providers}
        for i in range(args.warmup):
            for fn in providers.values():
                fn(i)
        common.sync(device)
        for i in range(reps):
            for name, fn in providers.items():
                times[name].append(common.time_once(lambda: fn(i), device))
        ref = statistics.median(times["sorted"])
        for name, ts in times.items():
            med = statistics.median(ts)
            results.append(dict(device=device, rows=rows, vocab=args.vocab, dtype=args.dtype, top_p=args.top_p,
                                alpha=alpha, provider=name, median_ms=med * 1e3, min_ms=min(ts) * 1e3,
                                speedup_vs_sorted=ref / med))

    columns = ["device", "rows", "vocab", "dtype", "top_p", "alpha", "provider", "median_ms", "min_ms",
               "speedup_vs_sorted"]
    common.print_table(f"top-p sampling, {common.machine_description(device)}", results, columns)
    if args.csv:
        common.write_csv(args.csv, results, columns, common.command_line(), device)
        with open(args.csv) as f:
            body = f.read()
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
        note = (f"# gpu: {gpu}; load average at the end of the run: {os.getloadavg()[0]:.2f} "
                "(a shared machine: the ratios carry over, the absolute times do not)\n")
        head, _, rest = body.partition("device,")
        with open(args.csv, "w") as f:
            f.write(head + note + "device," + rest)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
