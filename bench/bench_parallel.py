"""Vocab-parallel ops (kdext.parallel) versus all-gathering the logits, on Gloo CPU ranks.

    python bench/bench_parallel.py                         # 2, 3 and 4 ranks, 256 rows, V = 32000
    python bench/bench_parallel.py --worlds 2 4 --rows 512 --vocab 50257 --csv out.csv

For each world size W the script spawns W Gloo ranks on this machine; each rank
holds an unequal shard of a [rows, V] student (and teacher) logits and runs,
forward + backward (top_p_sample: forward only, top_p=0.9, top_k=50; its "max |grad diff|"
column is the fraction of rows whose token differs from the single-device op's, and its bytes
depend on the search's rounds, so "in" is measured and "recv" = (W-1) in, all-gathers only):

* kdext:      the kdext.parallel op on its shard (collectives over O(rows) numbers);
* all-gather: all-gather the shards into the full logits on every rank, run the
              single-device kdext op on them, and keep the local slice of the
              gradient (for softmax / log_softmax, whose outputs are slices, the
              upstream gradient slices are all-gathered in backward as well).

Bytes are per rank and per row: "in" is what the rank puts into collectives
(kdext's count_collectives(), the same accounting the tests check), "recv" what
it receives with the usual algorithms (an all-gather of n bytes per rank
receives (W-1) n; a ring all-reduce of n bytes receives 2 (W-1)/W n). Time is
the median over --reps of the slowest rank's forward + backward. The ranks share
this machine's cores, so the all-gather approach, which repeats the full-vocab
work on every rank, also pays in compute here; on GPUs its cost is the traffic.

The script ends with the bytes per row for NCCL at 8 ranks and V = 128K (bf16
logits), from the same formulas.
"""

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

OPS = ["reverse_kl", "jsd", "tvd", "distill_loss", "softmax", "log_softmax", "entropy", "logprobs", "top_p_sample"]
SAMPLE_ARGS = dict(top_p=0.9, top_k=50, seed=0)  # top_p_sample: forward only (nothing to differentiate)
PAIR_OPS = {"reverse_kl", "jsd", "tvd", "distill_loss"}  # take student and teacher logits
SLICED_OPS = {"softmax", "log_softmax"}  # return the local slice

# kdext's collective schedule for float32 / bf16 / fp16 logits, forward and backward together:
# op -> [(collective, bytes per row this rank puts in)]. The divergences exchange float32
# statistics; the softmax family and logprobs their lse's in float64 (kdext/parallel/).
# logprobs also gathers the W shard sizes once per call (8 bytes per rank, not per row).
DIVERGENCE_SCHEDULE = [("all_gather", 2 * 4), ("all_reduce", 3 * 4)]
SCHEDULE = {
    "reverse_kl": DIVERGENCE_SCHEDULE,
    "jsd": DIVERGENCE_SCHEDULE,
    "tvd": DIVERGENCE_SCHEDULE,
    "distill_loss": DIVERGENCE_SCHEDULE,
    "softmax": [("all_gather", 8), ("all_reduce", 4)],
    "log_softmax": [("all_gather", 8), ("all_reduce", 4)],
    "entropy": [("all_gather", 8), ("all_reduce", 4)],
    "logprobs": [("all_gather", 2 * 8)],
}


def received(collective, nbytes, world):
    """Bytes a rank receives in one collective whose per-rank input is nbytes."""
    if collective == "all_gather":
        return (world - 1) * nbytes
    return 2 * (world - 1) / world * nbytes  # ring all-reduce


def kdext_bytes_per_row(op, world):
    """(in, recv) bytes per row for kdext's schedule (float32 / bf16 / fp16 logits)."""
    sched = SCHEDULE[op]
    return sum(n for _, n in sched), sum(received(c, n, world) for c, n in sched)


def allgather_tensors(op):
    """How many [rows, V] tensors the all-gather approach gathers."""
    if op in PAIR_OPS:
        return 2  # student and teacher logits
    if op in SLICED_OPS:
        return 2  # the logits, and in backward the upstream gradient slices
    return 1


def allgather_bytes_per_row(op, world, vocab, elem_bytes):
    """(in, recv) bytes per row of the all-gather approach, equal shards V/W."""
    bytes_in = allgather_tensors(op) * vocab / world * elem_bytes
    return bytes_in, (world - 1) * bytes_in


def shard_sizes(vocab, world):
    """Unequal shards in rank order (rank r's share grows with r)."""
    weights = [r + 2 for r in range(world)]
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[-1] += vocab - sum(sizes)
    return sizes


# ---------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------


def _gather_full(x, sizes, group=None):
    """The all-gather approach's collective: shards of unequal size -> full last dim."""
    import torch.distributed as dist

    # unequal shards are padded to the largest (Gloo's all-gather wants equal sizes)
    width = max(sizes)
    padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1), padded.numel() * padded.element_size()


def _run(module, op, s, t, tokens, labels):
    """One call of ``op`` from ``module``: kdext.parallel (on the shards) or kdext (on the full rows)."""
    if op == "distill_loss":
        return module.distill_loss(s, t, kind="reverse_kl", labels=labels)
    if op == "jsd":
        return module.jsd(s, t, beta=0.5)
    if op in PAIR_OPS:
        return getattr(module, op)(s, t)
    if op == "logprobs":
        return module.logprobs(s, tokens)
    if op == "top_p_sample":
        return module.top_p_sample(s, **SAMPLE_ARGS).tokens
    return getattr(module, op)(s)


def _run_kdext(op, s, t, tokens, labels):
    import kdext.parallel

    return _run(kdext.parallel, op, s, t, tokens, labels)


def _run_single(op, s, t, tokens, labels):
    import kdext

    return _run(kdext, op, s, t, tokens, labels)


def _worker(rank, world, init_file, args, out_path):
    import torch.distributed as dist

    import kdext.parallel as P

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    dtype = getattr(torch, args.dtype)
    sizes = shard_sizes(args.vocab, world)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(dtype)
    teacher = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, args.vocab, (args.rows,), generator=g)
    labels = tokens.clone()
    labels[::5] = -100
    up_rows = torch.randn(args.rows, generator=g)
    up_full = torch.randn(args.rows, args.vocab, generator=g).to(dtype)
    s_loc, t_loc = student[:, lo:hi].contiguous(), teacher[:, lo:hi].contiguous()

    def upstream(out, full):
        if out.dim() == 2:
            return up_full if full else up_full[:, lo:hi]
        return up_rows[: out.numel()].view(out.shape).to(out.dtype)

    def step_kdext(op):
        s = s_loc.clone().requires_grad_(op != "top_p_sample")
        with P.count_collectives() as log:
            out = _run_kdext(op, s, t_loc, tokens, labels)
            if op == "top_p_sample":
                return out, log.bytes  # the tokens stand in for the gradient
            out.backward(upstream(out, False))
        return s.grad, log.bytes

    def step_allgather(op):
        moved = 0
        s_full, n = _gather_full(s_loc, sizes)
        moved += n
        t_full = None
        if op in PAIR_OPS:
            t_full, n = _gather_full(t_loc, sizes)
            moved += n
        if op == "top_p_sample":
            return _run_single(op, s_full, t_full, tokens, labels), moved
        s_full.requires_grad_()
        out = _run_single(op, s_full, t_full, tokens, labels)
        if op in SLICED_OPS:
            # each rank holds only its output slice and its upstream slice
            up, n = _gather_full(upstream(out, True)[:, lo:hi].contiguous(), sizes)
            moved += n
        else:
            up = upstream(out, True)
        out.backward(up)
        return s_full.grad[:, lo:hi], moved

    rows = []
    for op in args.ops:
        result = {}
        for name, step in (("kdext", step_kdext), ("allgather", step_allgather)):
            times = []
            for rep in range(args.reps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                grad, moved = step(op)
                elapsed = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                if rep > 0:  # the first run is a warm-up
                    times.append(elapsed.item())
            result[name] = (statistics.median(times), moved, grad)
        # (top_p_sample: the fraction of rows whose token differs from the single-device op's)
        diff = (result["kdext"][2].float() - result["allgather"][2].float()).abs().max()
        if op == "top_p_sample":
            diff = (result["kdext"][2] != result["allgather"][2]).double().mean()
        diff_t = torch.tensor([diff.item()])
        dist.all_reduce(diff_t, op=dist.ReduceOp.MAX)
        rows.append(
            {
                "world": world,
                "op": op,
                "rows": args.rows,
                "vocab": args.vocab,
                "dtype": args.dtype,
                "kdext_in_B_per_row": result["kdext"][1] / args.rows,
                "kdext_recv_B_per_row": (
                    (world - 1) * result["kdext"][1] / args.rows if op == "top_p_sample"
                    else kdext_bytes_per_row(op, world)[1] if dtype != torch.float64 else float("nan")),
                "allgather_in_B_per_row": result["allgather"][1] / args.rows,
                "allgather_recv_B_per_row": (world - 1) * result["allgather"][1] / args.rows,
                "kdext_ms": 1e3 * result["kdext"][0],
                "allgather_ms": 1e3 * result["allgather"][0],
                "max_grad_diff": diff_t.item(),
            }
        )
    if rank == 0:
        import json

        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_world(world, args):
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(
            _worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world, start_method="spawn"
        )
        with open(out) as f:
            return json.load(f)


COLUMNS = [
    ("world", "W", "{:d}"),
    ("op", "op", "{}"),
    ("kdext_in_B_per_row", "kdext in B/row", "{:.1f}"),
    ("kdext_recv_B_per_row", "kdext recv B/row", "{:.1f}"),
    ("allgather_in_B_per_row", "all-gather in B/row", "{:.0f}"),
    ("allgather_recv_B_per_row", "all-gather recv B/row", "{:.0f}"),
    ("kdext_ms", "kdext ms", "{:.2f}"),
    ("allgather_ms", "all-gather ms", "{:.2f}"),
    ("speedup", "speedup", "{:.1f}x"),
    ("max_grad_diff", "max |grad diff|", "{:.1e}"),  # top_p_sample: fraction of tokens that differ
]


def print_table(rows):
    for r in rows:
        r["speedup"] = r["allgather_ms"] / r["kdext_ms"]
    cells = [[fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(COLUMNS)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(COLUMNS, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def print_nccl_formula(world=8, vocab=128 * 1024, elem_bytes=2):
    print(
        f"\nNCCL, W = {world}, V = {vocab} ({vocab // world} per rank), bf16 logits: bytes each "
        "rank receives per row (all-gather of n bytes: (W-1) n; ring all-reduce: 2 (W-1)/W n)"
    )
    for op in ("reverse_kl", "distill_loss", "softmax", "entropy", "logprobs"):
        _, k_recv = kdext_bytes_per_row(op, world)
        _, a_recv = allgather_bytes_per_row(op, world, vocab, elem_bytes)
        terms = " + ".join(f"{'(W-1)' if c == 'all_gather' else '2(W-1)/W'}*{n}" for c, n in SCHEDULE[op])
        print(
            f"  {op:<13} kdext {terms} = {k_recv:.1f} B;  all-gather {allgather_tensors(op)}*(W-1)/W*V*2 "
            f"= {a_recv:,.0f} B  ({a_recv / k_recv:,.0f}x)"
        )


def write_csv(path, rows, args):
    """The table as CSV, with bench/common.py's header comment (command, machine, date)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(f"# command: {common.command_line()}\n")
        cpu = common.machine_description("cpu").rsplit(",", 1)[0]  # the ranks' threads are below
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        f.write(f"# machine: {cpu}, {gpu}; torch {torch.__version__}; Gloo, {args.threads} torch thread(s) per rank\n")
        f.write(f"# date: {datetime.date.today().isoformat()}\n")
        f.write("# bytes per rank per row (in: put into collectives; recv: received); ms: median of the slowest rank\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--csv", help="also write the table to this CSV file")
    args = p.parse_args()

    rows = []
    for world in args.worlds:
        rows += run_world(world, args)
    print(f"rows={args.rows}, V={args.vocab}, {args.dtype}, Gloo on CPU, {args.threads} thread(s) per rank")
    print_table(rows)
    print_nccl_formula()
    if args.csv:
        write_csv(args.csv, rows, args)

if __name__ == "__main__":
    main()
