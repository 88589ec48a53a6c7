"""Runs every CPU benchmark, writes its CSV under --out, and a summary table (SUMMARY.md).

    python bench/run_all.py --out bench/results          # what `make bench` runs
    python bench/run_all.py --out bench/results --quick  # smaller sizes, a couple of minutes
"""

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def benches(quick):
    size = ["--rows", "256", "--vocab", "32000", "--reps", "5"] if quick else []
    return [
        ("distill_loss", ["bench_distill_loss.py"] + (size or ["--rows", "2048", "--vocab", "32000"])),
        ("divergence", ["bench_divergence.py"] + (size or ["--rows", "1024", "--vocab", "32000"])),
        ("softmax", ["bench_softmax.py"] + (size or ["--rows", "1024", "--vocab", "32000"])),
        ("logprobs", ["bench_logprobs.py"] + (size or ["--rows", "1024", "--vocab", "32000"])),
        ("top_p_sample", ["bench_top_p_sample.py"] + (["--rows", "16", "--reps", "3"] if quick else [])),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for stem, argv in benches(args.quick):
        csv_path = os.path.join(args.out, f"{stem}_cpu.csv")
        cmd = [sys.executable, os.path.join(HERE, argv[0])] + argv[1:] + ["--csv", csv_path]
        print(f"$ {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    print(f"\nCSV files under {args.out}")


if __name__ == "__main__":
    main()
