"""Vocab-parallel distillation with kdext.parallel: each rank holds a shard of the vocabulary.

    torchrun --nproc_per_node=2 examples/parallel_torchrun.py              # Gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node=4 examples/parallel_torchrun.py --vocab 128000 --dtype bfloat16

Every rank builds the same student / teacher logits (one seed), keeps its own
slice of the last dimension (unequal shards, as with a padded vocabulary), and
calls the kdext.parallel ops on it. Each result is checked against the
single-device kdext op on the full logits: per-row values on every rank, and
gradients as the rank's slice of the full gradient. Rank 0 prints one line per
op with the largest difference over all ranks and the bytes that rank put into
collectives (forward and backward), next to what it would put in to all-gather
the logits instead.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

import kdext
import kdext.parallel as P


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="rows (tokens) per rank")
    p.add_argument("--vocab", type=int, default=32000, help="full vocabulary size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args()


def shard_sizes(vocab, world):
    """Unequal shards in rank order: rank r's share grows with r."""
    weights = [r + 2 for r in range(world)]
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[-1] += vocab - sum(sizes)
    return sizes


def main():
    args = parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    T = args.temperature

    sizes = shard_sizes(args.vocab, world)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    assert P.shard_range(hi - lo, device=device) == (lo, hi, args.vocab)

    g = torch.Generator().manual_seed(0)
    student = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(device, dtype)
    teacher = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(device, dtype)
    tokens = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    labels = tokens.clone()
    labels[::4] = -100  # ignored rows
    # upstream gradients: per row, and per entry for softmax / log_softmax (whose outputs
    # are the local slice: the full upstream is the concatenation of the ranks' slices)
    up_rows = torch.randn(args.rows, generator=g).to(device)
    up_full = torch.randn(args.rows, args.vocab, generator=g).to(device)

    # name -> (vocab-parallel call on the shard, single-device call on the full logits)
    ops = {
        "reverse_kl": (lambda s, t: P.reverse_kl(s, t, T), lambda s, t: kdext.reverse_kl(s, t, T)),
        "forward_kl": (lambda s, t: P.forward_kl(s, t, T), lambda s, t: kdext.forward_kl(s, t, T)),
        "jsd(0.5)": (lambda s, t: P.jsd(s, t, 0.5, T), lambda s, t: kdext.jsd(s, t, 0.5, T)),
        "skew_forward_kl(0.1)": (
            lambda s, t: P.skew_forward_kl(s, t, 0.1, T),
            lambda s, t: kdext.skew_forward_kl(s, t, 0.1, T),
        ),
        "skew_reverse_kl(0.1)": (
            lambda s, t: P.skew_reverse_kl(s, t, 0.1, T),
            lambda s, t: kdext.skew_reverse_kl(s, t, 0.1, T),
        ),
        "tvd": (lambda s, t: P.tvd(s, t, T), lambda s, t: kdext.tvd(s, t, T)),
        "distill_loss": (
            lambda s, t: P.distill_loss(s, t, kind="reverse_kl", labels=labels, temperature=T),
            lambda s, t: kdext.distill_loss(s, t, kind="reverse_kl", labels=labels, temperature=T),
        ),
        "softmax": (lambda s, t: P.softmax(s, T), lambda s, t: kdext.softmax(s, T)),
        "log_softmax": (lambda s, t: P.log_softmax(s, T), lambda s, t: kdext.log_softmax(s, T)),
        "entropy": (lambda s, t: P.entropy(s, T), lambda s, t: kdext.entropy(s, T)),
        "logprobs": (lambda s, t: P.logprobs(s, tokens, T), lambda s, t: kdext.logprobs(s, tokens, T)),
    }
    # value tolerance (float32 per-row results) and gradient tolerance (input dtype)
    grad_tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    value_tol = 1e-5 if dtype == torch.float32 else grad_tol

    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), rows={args.rows}, vocab={args.vocab} split {sizes}, {args.dtype}")
        print(f"{'op':<22}{'max |value diff|':>18}{'max |grad diff|':>18}{'kdext B':>10}{'all-gather B':>14}")
        print("(B: bytes this rank puts into collectives, forward + backward)")
    all_ok = True
    for name, (parallel_op, full_op) in ops.items():
        s_loc = student[:, lo:hi].clone().requires_grad_()
        s_full = student.clone().requires_grad_()
        t_loc = teacher[:, lo:hi].contiguous()
        with P.count_collectives() as log:
            out = parallel_op(s_loc, t_loc)
            sliced = out.dim() == 2
            (out.float() * (up_full[:, lo:hi] if sliced else up_rows[: out.numel()].view(out.shape))).sum().backward()
        ref = full_op(s_full, teacher)
        (ref.float() * (up_full if sliced else up_rows[: ref.numel()].view(ref.shape))).sum().backward()
        ref = ref[:, lo:hi] if sliced else ref
        value_diff = (out.float() - ref.float()).abs().max()
        grad_diff = (s_loc.grad.float() - s_full.grad[:, lo:hi].float()).abs().max()
        scale = 1 + ref.detach().float().abs().max()
        ok = torch.tensor(
            float(value_diff <= value_tol * scale and grad_diff <= grad_tol * (1 + s_full.grad.abs().max().float())),
            device=device,
        )
        diffs = torch.stack((value_diff, grad_diff)).to(device)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        all_ok &= bool(ok.item())
        # the all-gather approach puts this rank's whole shard of the student (and, for the
        # divergences, of the teacher) logits into the collective
        n_tensors = 1 if name in ("softmax", "log_softmax", "entropy", "logprobs") else 2
        gather_bytes = n_tensors * args.rows * (hi - lo) * student.element_size()
        if rank == 0:
            flag = "" if ok.item() else "   MISMATCH"
            print(f"{name:<22}{diffs[0].item():>18.3e}{diffs[1].item():>18.3e}{log.bytes:>10}{gather_bytes:>14}{flag}")
    if rank == 0:
        print("all ops agree with the single-device result" if all_ok else "some ops DISAGREE with the single-device result")
    dist.destroy_process_group()
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
