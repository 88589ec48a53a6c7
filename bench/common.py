"""Shared benchmark harness: timing, bandwidth, peak memory, tables and CSV.

Every benchmark measures its providers side by side in one process, reports
medians, and states ratios against kdext: these machines are noisy, so the
ratios are what carry over, not the absolute times.
"""

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch._dynamo

# Each benchmark compiles one small function per op and mode; the default
# recompile limit (8) would silently drop later ones back to eager.
torch._dynamo.config.recompile_limit = 256


def parse_args(description, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--csv", default=None, help="write the table here as CSV")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    if extra:
        extra(p)
    return p.parse_args()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    """Wall time of one fn() in seconds (CUDA events on GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, device, reps=7, warmup=2):
    """Median wall time of fn() in seconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(time_once(fn, device) for _ in range(reps))


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_bytes(fn, device):
    """Peak memory allocated by one call of fn(), beyond what is live before it.

    GPU: torch.cuda.max_memory_allocated. CPU: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) minus its resident set before
    the call; run it in a fresh process (see run_isolated) so that freed memory
    cached by earlier calls does not hide the peak.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def run_isolated(module, args, env=None):
    """Runs `python -m module args` in a fresh interpreter (with `env`, default this one's) and
    returns its stdout's last line."""
    out = subprocess.run(
        [sys.executable, "-m", module] + args, capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
    )
    return out.stdout.strip().splitlines()[-1]


def machine_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def print_table(title, rows, columns):
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(widths[c]) for c in columns))


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_csv(path, rows, columns, command, device):
    """CSV with a header comment naming the command, machine and date."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(f"# command: {command}\n")
        f.write(f"# machine: {machine_description(device)}; torch {torch.__version__}\n")
        f.write(f"# date: {datetime.date.today().isoformat()}\n")
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: fmt(r.get(c)) for c in columns})


def report(title, rows, columns, args, device=None):
    """The benchmark's table on stdout, and as CSV where ``--csv`` asks for it."""
    print_table(title, rows, columns)
    if args.csv:
        write_csv(args.csv, rows, columns, command_line(), device or args.device)


def command_line():
    return "python " + " ".join(sys.argv)


def time_forward_backward(fn, inputs, device, reps, warmup, grad_input=0):
    """Median seconds (forward, backward, forward+backward) of fn(*inputs) -> tensor.

    The backward is timed as (forward+backward) - forward; the output is reduced
    with .sum() when it is not a scalar.
    """

    def loss():
        out = fn(*inputs)
        return out if out.dim() == 0 else out.float().sum()

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        inputs[grad_input].grad = None
        loss().backward()

    fwd = median_time(forward, device, reps, warmup)
    both = median_time(fwd_bwd, device, reps, warmup)
    return fwd, max(both - fwd, 0.0), both
