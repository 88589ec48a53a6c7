"""Runs every CPU benchmark, writes its CSV under --out, and a summary of the ratios (SUMMARY.md).

    python bench/run_all.py --out bench/results                 # what `make bench` runs
    python bench/run_all.py --out /tmp/bench --quick            # small sizes, a few minutes
    python bench/run_all.py --out bench/results --summary-only  # SUMMARY.md from the CSVs there

bench_parallel.py spawns its own Gloo ranks (2, 3 and 4; 2 with --quick), so it runs
here like the others, as one process. SUMMARY.md has, per CSV, its comment lines (the
command, the machine, the date) and a table of its ratio column, one column per provider
(the baseline, whose ratio is 1 in every row, left out), for every benchmark whose CSV is in
--out, each with its own command and date.
"""

import argparse
import csv
import os
import subprocess
import sys
from typing import NamedTuple, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


class Bench(NamedTuple):
    stem: str
    script: str
    args: Tuple[str, ...]  # the full run
    quick: Tuple[str, ...]  # --quick
    rows: Tuple[str, ...]  # the CSV columns that name a row of the summary table
    columns: str  # the CSV column whose values are the summary table's columns
    ratio: str  # the ratio column
    meaning: str  # what the ratio is


QUICK = ("--rows", "256", "--vocab", "32000", "--reps", "5")
KDEXT_SPEEDUP = "forward+backward, the provider's time / kdext's (> 1: kdext is faster)"
BENCHES = [
    Bench("distill_loss", "bench_distill_loss.py", ("--rows", "2048", "--vocab", "32000"), QUICK,
          (), "provider", "kdext_speedup", KDEXT_SPEEDUP),
    Bench("divergence", "bench_divergence.py", ("--rows", "1024", "--vocab", "32000"), QUICK,
          ("kind",), "provider", "kdext_speedup", KDEXT_SPEEDUP),
    Bench("softmax", "bench_softmax.py", ("--rows", "1024", "--vocab", "32000"), QUICK,
          ("op",), "provider", "kdext_speedup", KDEXT_SPEEDUP),
    Bench("logprobs", "bench_logprobs.py", ("--rows", "1024", "--vocab", "32000"), QUICK,
          ("op",), "provider", "kdext_speedup", KDEXT_SPEEDUP),
    Bench("top_p_sample", "bench_top_p_sample.py", ("--device", "cpu"),
          ("--device", "cpu", "--rows", "16", "--reps", "3"),
          ("alpha",), "provider", "speedup_vs_sorted", "the sorted reference's time / the provider's"),
    Bench("sparse", "bench_sparse.py", ("--rows", "4096", "--vocab", "128256", "--reps", "5", "--warmup", "1"),
          ("--rows", "256", "--vocab", "32000", "--reps", "3", "--warmup", "1"), ("bench", "dtype", "k"), "provider",
          "kdext_speedup", "topk: the torch provider's time / kdext.topk_logprobs'; loss: the dense distill_loss's "
          "forward+backward time / the sparse loss's (> 1: kdext's top-k, or the sparse loss, is faster)"),
    Bench("fused_linear", "bench_fused_linear.py", (), ("--rows", "256", "--vocab", "8000", "--reps", "3",
                                                         "--memory-rows", "256"),
          ("kind",), "provider", "time_vs_kdext_fused", "forward+backward, the provider's time / kdext's fused "
          "LM-head loss' (> 1: kdext fused is faster; `gemms` is the floor of the four GEMMs)"),
    Bench("parallel", "bench_parallel.py", (), ("--worlds", "2", "--rows", "64", "--reps", "3"),
          ("op",), "world", "speedup", "forward+backward (top_p_sample: forward), all-gather + the single-device "
          "op's time / kdext.parallel's, on W Gloo ranks"),
]


def csv_path(out, bench):
    return os.path.join(out, f"{bench.stem}_cpu.csv")


def run(bench, out, quick):
    cmd = [sys.executable, os.path.join(HERE, bench.script), *(bench.quick if quick else bench.args),
           "--csv", csv_path(out, bench)]
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def read_csv(path):
    """(comment lines without '# ', rows as dicts) of a benchmark CSV."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    comments = [line[2:] if line.startswith("# ") else line[1:] for line in lines if line.startswith("#")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return comments, rows


def ratio_table(bench, rows):
    """Markdown lines: one row per value of ``bench.rows``, one column per value of
    ``bench.columns`` (a baseline, whose ratio is 1 in every row, left out)."""
    columns, table = [], {}
    for r in rows:
        column = r[bench.columns]
        if column not in columns:
            columns.append(column)
        table.setdefault(tuple(r[k] for k in bench.rows), {})[column] = r[bench.ratio]
    columns = [c for c in columns if not all(float(cells.get(c, "1")) == 1.0 for cells in table.values())]
    head = list(bench.rows) + [c if bench.columns == "provider" else f"{bench.columns} {c}" for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(bench.rows) + "---:|" * len(columns)]
    for label, cells in table.items():
        lines.append("| " + " | ".join(list(label) + [cells.get(c, "") for c in columns]) + " |")
    return lines


def write_summary(out, benches):
    """SUMMARY.md under ``out`` from the CSVs of ``benches`` found there; returns its path."""
    lines = ["# Benchmark summary", "",
             f"Written by `python bench/run_all.py` from the CSVs in this folder; each section gives the "
             "CSV's own header lines (command, machine, date) and its ratios.", ""]
    for bench in benches:
        path = csv_path(out, bench)
        if not os.path.exists(path):
            continue
        comments, rows = read_csv(path)
        lines += [f"## {bench.stem} (`{os.path.basename(path)}`)", ""]
        lines += [f"- {c}" for c in comments]
        lines += [f"- `{bench.ratio}`: {bench.meaning}", ""]
        lines += ratio_table(bench, rows) + [""]
    summary = os.path.join(out, "SUMMARY.md")
    with open(summary, "w") as f:
        f.write("\n".join(lines))
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--only", nargs="+", choices=[b.stem for b in BENCHES], help="run only these benchmarks")
    p.add_argument("--summary-only", action="store_true", help="run nothing: SUMMARY.md from the CSVs in --out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    benches = [b for b in BENCHES if not args.only or b.stem in args.only]
    if not args.summary_only:
        for bench in benches:
            run(bench, args.out, args.quick)
    print(f"\nCSV files and {write_summary(args.out, BENCHES)} under {args.out}")


if __name__ == "__main__":
    main()
