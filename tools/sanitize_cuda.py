"""A small case of every kdext CUDA kernel, for compute-sanitizer.

Run under the sanitizer with the caching allocator off, so that every
allocation has exact bounds and an out-of-bounds access is caught:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 9 python tools/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python tools/sanitize_cuda.py --only onchip

Each case forces one launcher path (row kernels, split vocabulary, on-chip
clusters of each size, the unfused loss) through the launchers' environment
knobs, on odd sizes and misaligned rows. Prints one line per case.
"""

import argparse
import os
import sys

import torch

import kdext  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from reference import DIVERGENCES  # noqa: E402  (the kinds and parameters the tests use)

ops = torch.ops.kdext
DEV = "cuda"
KINDS = list(DIVERGENCES.items())
PATHS = {
    "rows": {"KDEXT_CUDA_ONCHIP": "0"},
    "split": {"KDEXT_CUDA_ONCHIP": "0", "KDEXT_CUDA_CHUNKS": "3"},
    "onchip1": {"KDEXT_CUDA_CLUSTER": "1"},
    "onchip2": {"KDEXT_CUDA_CLUSTER": "2"},
    "onchip4": {"KDEXT_CUDA_CLUSTER": "4"},
}
KNOBS = ("KDEXT_CUDA_ONCHIP", "KDEXT_CUDA_CHUNKS", "KDEXT_CUDA_CLUSTER")


def set_path(name):
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(PATHS.get(name, {}))


def misaligned(x):
    """x's values with every row starting one element past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = flat[1:].view(x.shape)
    y.copy_(x)
    return y


def pair(rows, V, ds, dt):
    s = torch.randn(rows, V, device=DEV).to(ds)
    t = torch.randn(rows, V, device=DEV).to(dt)
    s[0, ::7] = float("-inf")
    t[0, ::7] = float("-inf")
    if rows > 2:
        s[1] = float("-inf")
        t[2, 3] = float("nan")
    return s, t


def divergence_cases(only):
    dtypes = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float64, torch.float64)]
    paths = ["onchip1", "onchip2", "onchip4"] if only == "onchip" else list(PATHS)
    for name in paths:
        set_path(name)
        for ds, dt in dtypes:
            for V in (3001, 37) if only != "onchip" else (3001,):
                s, t = pair(4, V, ds, dt)
                for kind, prm in KINDS:
                    if only != "onchip":
                        v, st = ops.divergence_forward(s, t, kind, prm, 1.5)
                        ops.divergence_backward(torch.ones(4, device=DEV, dtype=v.dtype), s, t, st, kind, prm, 1.5,
                                                True, True)
                        ops.divergence_partial(s[:, 5:], t[:, 5:], st[:, 0], st[:, 1], kind, prm, 1.5)
                    else:
                        ops.divergence_forward(s, t, kind, prm, 1.5)
                    w = torch.tensor([1.0, 0.0, 0.5, 2.0], device=DEV)
                    ops.divergence_loss(s, t, w, kind, prm, 1.5)
                    ops.divergence_loss(misaligned(s), misaligned(t), w, kind, prm, 1.5)
                torch.cuda.synchronize()
        print(f"divergence [{name}] ok", flush=True)
    set_path("default")


def other_cases():
    for name in ("rows", "split"):
        set_path(name)
        for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float64):
            for V in (1, 37, 3001):
                x = torch.randn(5, V, device=DEV).to(dtype)
                x[1] = float("-inf")
                xm = misaligned(x)
                for log in (False, True):
                    y = ops.log_softmax(xm, 0.8) if log else ops.softmax(xm, 0.8)
                    ops.softmax_backward(misaligned(torch.randn_like(y)), y, 0.8, log)
                ops.logsumexp(xm, 1.0)
                h, lse = ops.entropy_forward(xm, 1.0, None)
                ops.entropy_forward(xm[:, V // 2 :], 1.0, lse)
                ops.entropy_backward(torch.ones_like(h), xm, h, lse, 1.0)
                tok = torch.tensor([0, V - 1, -3, V + 5, V // 2], device=DEV)  # two out of range
                lp, l2 = ops.logprobs_forward(xm, tok, 1.0)
                ops.logprobs_backward(torch.ones_like(lp), xm, tok, l2, 1.0)
                g = torch.randn(7, V + 3, device=DEV).to(dtype)
                ops.scale_(g, torch.tensor(2.0, device=DEV))
                ops.scale_(g[:, 1:], torch.tensor(0.5, device=DEV))
                ops.scale_(g, torch.tensor(1.0, device=DEV))
                torch.cuda.synchronize()
        print(f"softmax/logprobs/scale [{name}] ok", flush=True)
    set_path("default")
    # top_p_sample: small, odd, masked and empty rows; teacher mixing; top-k; tiny top_p (greedy).
    for dtype in (torch.float32, torch.bfloat16):
        for V in (1, 37, 5003):
            x = torch.randn(6, V, device=DEV).to(dtype)
            t = torch.randn(6, V, device=DEV).to(dtype)
            x[1] = float("-inf")
            x[2, : V // 2] = float("-inf")
            for top_p, top_k, alpha in ((0.9, 0, 0.0), (1.0, 5, 0.2), (1e-6, 0, 0.5)):
                ops.top_p_sample(x, t, top_p, top_k, 0.8, alpha, 1234, 0)
            torch.cuda.synchronize()
    print("top_p_sample ok", flush=True)


def sparse_cases():
    """topk_logprobs (radix select, and the sort path for k > 1024) and the sparse loss (both
    tails, padded and bad ids, int32 ids, 16-bit log-probs, a bitmap past 48 KiB of shared memory)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for V, ks in ((1, (1,)), (37, (1, 5, 37)), (3001, (1, 64, 1024, 2000)), (5003, (17,))):
            x = torch.randn(4, V, device=DEV).to(dtype)
            x[1] = float("-inf")
            x[2, : V // 2] = float("-inf")
            if V > 1:
                x[3, 1] = float("nan")
            for k in ks:
                ops.topk_logprobs(misaligned(x), k, 0.9)
            torch.cuda.synchronize()
    print("topk_logprobs ok", flush=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for V, k in ((1, 1), (37, 5), (3001, 64), ((1 << 19) + 3, 40)):
            s = torch.randn(4, V, device=DEV).to(dtype)
            s[1] = float("-inf")
            ids, lp, _ = ops.topk_logprobs(torch.randn(4, V, device=DEV), k, 1.0)
            ids = ids.long()
            ids[2, k // 2 :] = -1  # padded slots
            if k > 1:
                ids[3, 1] = ids[3, 0]  # a repeated id: a NaN row, nothing read out of bounds
            ids[0, 0] = V + 7 if k > 1 else ids[0, 0]  # an id outside the vocabulary
            for tail in ("bucket", "renormalize"):
                for kind, prm in (("forward_kl", 0.0), ("jsd", 0.3)):
                    for idv, lpv in ((ids, lp), (ids.int(), lp.half())):
                        v, st = ops.sparse_forward(misaligned(s), idv, lpv, kind, prm, 1.1, tail)
                        ops.sparse_backward(torch.ones_like(v), misaligned(s), idv, lpv, st, kind, prm, 1.1, tail)
                        ops.sparse_loss(misaligned(s), idv, lpv, torch.rand(4, device=DEV), kind, prm, 1.1, tail)
            torch.cuda.synchronize()
    print("sparse loss ok", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["all", "onchip", "sparse"], default="all")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    if args.only == "sparse":  # e.g. under racecheck: the shared-memory bitmap, histograms and sort
        sparse_cases()
        torch.cuda.synchronize()
        print("sanitize_cuda: sparse cases ran", flush=True)
        return 0
    divergence_cases(args.only)
    if args.only == "all":
        other_cases()
        sparse_cases()
    torch.cuda.synchronize()
    print("sanitize_cuda: all cases ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
