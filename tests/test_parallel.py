"""kdext.parallel against the unsharded ops: Gloo on CPU, 2 and 3 spawned ranks, unequal shards.

Process launches are expensive (each rank imports torch), so each world size is
spawned once (a module-scoped fixture): every rank runs all the checks below in
one process group and records, per check, "ok" or the traceback; the pytest
tests then report each (world size, check) separately. Every rank builds the
same full logits from one seed, takes its own shard of the last dim, and
compares the vocab-parallel op with the single-device kdext op on the full
logits: per-row values on every rank (and bit-identical across ranks),
gradients as the local slice of the full gradient.

One more launch runs examples/parallel_torchrun.py under torchrun.
"""

import datetime
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
from reference import DIVERGENCE_CASES, JSD_ENDPOINTS, PHILOX_KNOWN_ANSWERS, call_divergence, divergence_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (atol, rtol) by dtype: per-row outputs are float32 (float64 for float64 inputs);
# gradients and softmax outputs come back in the input's dtype.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 1e-3),
}

DIVERGENCES = DIVERGENCE_CASES + JSD_ENDPOINTS


def shard_sizes(vocab, world, variant=0):
    """Unequal shard sizes in rank order (variant 1 for 3 ranks has a 1-token shard)."""
    if world == 2:
        return [vocab // 3, vocab - vocab // 3] if variant == 0 else [vocab - 5, 5]
    if world == 3:
        if variant == 0:
            return [vocab // 5, vocab // 2, vocab - vocab // 5 - vocab // 2]
        return [vocab // 2, 1, vocab - vocab // 2 - 1]
    base = [vocab // world] * world
    base[-1] += vocab - sum(base)
    return base


# ---------------------------------------------------------------------------
# Worker side: the checks, run by every rank of one spawned group
# ---------------------------------------------------------------------------


class Ctx:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def bounds(self, vocab, variant=0):
        sizes = shard_sizes(vocab, self.world, variant)
        lo = sum(sizes[: self.rank])
        return lo, lo + sizes[self.rank]

    def shard(self, x, vocab=None, variant=0):
        lo, hi = self.bounds(x.shape[-1], variant)
        return x[..., lo:hi].detach().clone()

    def gen(self, seed):
        return torch.Generator().manual_seed(seed)


# A failed comparison must not stop a rank in the middle of a check: the other ranks
# would wait in the next collective. Failures are collected and raised at the end
# of the check (run_check), after every rank has issued the same collectives.
FAILURES = []


def expect(cond, what):
    if not cond:
        FAILURES.append(what)


def assert_close(actual, expected, dtype=None, what=""):
    atol, rtol = TOL[dtype or expected.dtype]
    try:
        torch.testing.assert_close(
            actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}"
        )
    except AssertionError as err:
        FAILURES.append(str(err))


def assert_same_on_all_ranks(x, what):
    import torch.distributed as dist

    x = x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    for r, p in enumerate(parts):
        expect(
            torch.equal(p.nan_to_num(0.5, 7.0, -7.0), x.nan_to_num(0.5, 7.0, -7.0)) and torch.equal(p.isnan(), x.isnan()),
            f"{what}: rank {r} returned a different value than this rank",
        )


def run_check(check, ctx):
    FAILURES.clear()
    try:
        check(ctx)
    except Exception:  # noqa: BLE001 - reported per check by the parent
        FAILURES.append(traceback.format_exc())
    return "ok" if not FAILURES else "\n".join(FAILURES)


def logits(shape, gen, scale=3.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def compare_divergence(ctx, kind, param, s_full, t_full, temperature, variant=0, what=""):
    import kdext
    import kdext.parallel as P

    s_loc = ctx.shard(s_full, variant=variant).requires_grad_()
    t_loc = ctx.shard(t_full, variant=variant).requires_grad_()
    s_ref = s_full.detach().clone().requires_grad_()
    t_ref = t_full.detach().clone().requires_grad_()
    got = call_divergence(P, kind, param, s_loc, t_loc, temperature)
    ref = call_divergence(kdext, kind, param, s_ref, t_ref, temperature)
    tag = f"{what} {kind}({param}) T={temperature}"
    expect(got.shape == ref.shape and got.dtype == ref.dtype, tag + ": shape/dtype")
    assert_close(got, ref, what=tag + " value")
    assert_same_on_all_ranks(got, tag)
    upstream = torch.randn(ref.shape, generator=ctx.gen(99), dtype=ref.dtype)
    (got * upstream).sum().backward()
    (ref * upstream).sum().backward()
    lo, hi = ctx.bounds(s_full.shape[-1], variant)
    expect(s_loc.grad.dtype == s_full.dtype and t_loc.grad.dtype == t_full.dtype, tag + ": grad dtype")
    assert_close(s_loc.grad, s_ref.grad[..., lo:hi], what=tag + " student grad")
    assert_close(t_loc.grad, t_ref.grad[..., lo:hi], what=tag + " teacher grad")
    return got


def check_divergences_fp32(ctx):
    g = ctx.gen(1)
    s, t = logits((2, 3, 101), g), logits((2, 3, 101), g)
    for kind, param in DIVERGENCES:
        for temperature in (1.0, 0.7):
            compare_divergence(ctx, kind, param, s, t, temperature)
    # the other split, with a 1-token shard for 3 ranks, and a 1-D (single row) input
    for kind, param in DIVERGENCES:
        compare_divergence(ctx, kind, param, s, t, 2.0, variant=1, what="variant 1")
        compare_divergence(ctx, kind, param, s[0, 0], t[0, 0], 1.0, what="1-D")


def check_divergences_dtypes(ctx):
    g = ctx.gen(2)
    cases = [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
    ]
    for sd, td in cases:
        s, t = logits((5, 77), g, dtype=sd), logits((5, 77), g, dtype=td)
        for kind, param in DIVERGENCES:
            compare_divergence(ctx, kind, param, s, t, 1.3, what=f"{sd}/{td}")


def masked_pair(ctx, vocab, variant=0):
    """Rows exercising -inf masks, empty shards, empty rows and NaN (see the comments)."""
    g = ctx.gen(3)
    rows = 8
    s, t = logits((rows, vocab), g), logits((rows, vocab), g)
    sizes = shard_sizes(vocab, ctx.world, variant)
    lo1 = sizes[0]
    ninf = -math.inf
    banned = torch.rand(vocab, generator=g) < 0.3
    s[0, banned] = ninf  # 0: the same banned tokens on both sides
    t[0, banned] = ninf
    s[1, :lo1] = ninf  # 1: rank 0's whole shard masked on both sides (vocab padding)
    t[1, :lo1] = ninf
    s[2] = ninf  # 2: no distribution at all: NaN, zero gradient
    t[2] = ninf
    t[3, lo1] = ninf  # 3: teacher -inf where q > 0: reverse KL is +inf
    s[4, :] = ninf  # 4: student one-hot, on the last shard
    s[4, vocab - 1] = 1.0
    s[5, lo1 + sizes[1] // 2] = math.nan  # 5: NaN on rank 1's shard poisons the row
    s[6, lo1:] = ninf  # 6: student mass only on rank 0's shard, teacher everywhere
    t[7, :lo1] = ninf  # 7: teacher mass only outside rank 0's shard
    return s, t


def check_divergences_masked(ctx):
    s, t = masked_pair(ctx, 64)
    for kind, param in DIVERGENCES:
        got = compare_divergence(ctx, kind, param, s, t, 1.0, what="masked")
        expect(math.isnan(got[2]) and math.isnan(got[5]), f"{kind}: empty and poisoned rows must be NaN")
    v = compare_divergence(ctx, "reverse_kl", None, s, t, 1.0, what="masked")
    expect(v[3] == math.inf, "reverse KL with p_i = 0 < q_i must be +inf")
    s2, t2 = masked_pair(ctx, 64, variant=1)
    for kind, param in DIVERGENCES:
        compare_divergence(ctx, kind, param, s2, t2, 1.0, variant=1, what="masked variant 1")
    # At T = 0.5 these rows reach x/T ~ 20 and KL ~ 15, where float32 itself (the single-device
    # op against float64) is only good to ~1e-5: check the masking logic there in float64.
    for kind, param in DIVERGENCES:
        compare_divergence(ctx, kind, param, s2.double(), t2.double(), 0.5, variant=1, what="masked f64")


def check_distill_loss(ctx):
    import kdext
    import kdext.parallel as P

    g = ctx.gen(4)
    rows, vocab = (3, 4), 90
    s, t = logits(rows + (vocab,), g), logits(rows + (vocab,), g)
    s[0, 1, 5] = math.nan  # an ignored row with NaN logits must not leak
    labels = torch.randint(0, vocab, rows, generator=g)
    labels[0, 1] = -100
    labels[2, 0] = -100
    mask = torch.ones(rows, dtype=torch.bool)
    mask[1, 3] = False
    mask[0, 1] = False
    nothing = torch.zeros(rows, dtype=torch.bool)
    lo, hi = ctx.bounds(vocab)
    for kind, param in DIVERGENCES:
        kw = divergence_kwargs(kind, param)
        for reduction in ("mean", "sum", "none"):
            for sel in ({"labels": labels}, {"mask": mask}, {"labels": labels, "mask": mask}, {"mask": nothing}):
                for teacher_grad in (False, True):
                    if teacher_grad and reduction != "sum":
                        continue
                    s_loc, t_loc = ctx.shard(s).requires_grad_(), ctx.shard(t).requires_grad_(teacher_grad)
                    s_ref, t_ref = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
                    args = dict(kind=kind, temperature=1.5, reduction=reduction, **kw, **sel)
                    none_counts = "mask" in sel and sel["mask"] is nothing
                    got = P.distill_loss(s_loc, t_loc, **args)
                    # When no row counts, the mean is NaN and every gradient 0 (F.cross_entropy's
                    # convention), on one device and here.
                    ref = kdext.distill_loss(s_ref, t_ref, **args)
                    tag = f"distill_loss {kind}({param}) {reduction} {sorted(sel)} teacher_grad={teacher_grad}"
                    if none_counts and reduction == "mean":
                        expect(math.isnan(got) and math.isnan(ref), tag + ": no row counts: NaN")
                    assert_close(got, ref, what=tag)
                    assert_same_on_all_ranks(got.detach(), tag)
                    up = torch.randn(got.shape, generator=ctx.gen(5), dtype=got.dtype)
                    (got * up).sum().backward()
                    (ref * up).sum().backward()
                    assert_close(s_loc.grad, s_ref.grad[..., lo:hi], what=tag + " student grad")
                    expect(torch.isfinite(s_loc.grad).all(), tag + ": an ignored NaN row leaked into the gradient")
                    if none_counts:
                        expect(not s_loc.grad.any(), tag + ": no row counts: the gradient must be 0")
                    if teacher_grad:
                        assert_close(t_loc.grad, t_ref.grad[..., lo:hi], what=tag + " teacher grad")
    # per-row weights (the same on every rank), a NaN row of weight 0 among them
    weights = torch.rand(rows, generator=g) * 2 - 0.5
    weights[0, 1] = 0.0
    for reduction in ("mean", "sum", "none"):
        s_loc, s_ref = ctx.shard(s).requires_grad_(), s.clone().requires_grad_()
        w_loc, w_ref = weights.clone().requires_grad_(), weights.clone().requires_grad_()
        args = dict(kind="reverse_kl", reduction=reduction, labels=labels)
        got = P.distill_loss(s_loc, ctx.shard(t), weights=w_loc, **args)
        ref = kdext.distill_loss(s_ref, t, weights=w_ref, **args)
        assert_close(got, ref, what=f"distill_loss weights {reduction}")
        got.sum().backward()
        ref.sum().backward()
        assert_close(s_loc.grad, s_ref.grad[..., lo:hi], what=f"distill_loss weights {reduction} grad")
        assert_close(w_loc.grad, w_ref.grad, what=f"distill_loss weights {reduction} weights' grad")
        expect(torch.isfinite(s_loc.grad).all() and torch.isfinite(w_loc.grad).all(),
               f"distill_loss weights {reduction}: the NaN row of weight 0 leaked")
    # no labels / mask, default arguments
    s_loc = ctx.shard(s[1:]).requires_grad_()
    s_ref = s[1:].clone().requires_grad_()
    got, ref = P.distill_loss(s_loc, ctx.shard(t[1:])), kdext.distill_loss(s_ref, t[1:])
    got.backward()
    ref.backward()
    assert_close(got, ref, what="distill_loss defaults")
    assert_close(s_loc.grad, s_ref.grad[..., lo:hi], what="distill_loss defaults grad")


def compare_rowwise(ctx, name, x_full, temperature, what=""):
    import kdext
    import kdext.parallel as P

    x_loc = ctx.shard(x_full).requires_grad_()
    x_ref = x_full.detach().clone().requires_grad_()
    got = getattr(P, name)(x_loc, temperature=temperature)
    ref = getattr(kdext, name)(x_ref, temperature=temperature)
    lo, hi = ctx.bounds(x_full.shape[-1])
    tag = f"{what} {name} {x_full.dtype} T={temperature}"
    sliced = got.dim() == x_full.dim()  # softmax / log_softmax return the local slice
    ref_cmp = ref[..., lo:hi] if sliced else ref
    expect(got.shape == ref_cmp.shape and got.dtype == ref.dtype, tag + ": shape/dtype")
    assert_close(got, ref_cmp, what=tag + " value")
    if not sliced:
        assert_same_on_all_ranks(got.detach(), tag)
    up = torch.randn(ref.shape, generator=ctx.gen(6), dtype=torch.float64).to(ref.dtype)
    (got * (up[..., lo:hi] if sliced else up)).sum().backward()
    (ref * up).sum().backward()
    assert_close(x_loc.grad, x_ref.grad[..., lo:hi], what=tag + " grad")


def check_softmax_family(ctx):
    g = ctx.gen(7)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = logits((3, 2, 83), g, dtype=dtype)
        for name in ("softmax", "log_softmax", "logsumexp", "entropy"):
            for temperature in (1.0, 0.6):
                compare_rowwise(ctx, name, x, temperature)
    # -inf masks: banned tokens, one shard all -inf, a row all -inf; a NaN row
    s, _ = masked_pair(ctx, 64)
    for name in ("softmax", "log_softmax", "logsumexp", "entropy"):
        compare_rowwise(ctx, name, s, 1.0, what="masked")


def check_large_logits(ctx):
    """Logits around 1e4: the single-device softmax, log-probs and entropy form
    (x/T - max) - log Z, exact for any shift; the vocab-parallel ops must keep that
    precision (a float32 lse would be off by ulp(1e4) / 2 ~ 5e-4 in every log-prob).
    T is a power of two so that x / T is exact."""
    import kdext
    import kdext.parallel as P

    g = ctx.gen(12)
    x = logits((4, 97), g) + 1e4
    x[1, : shard_sizes(97, ctx.world)[0]] -= 30.0  # rank 0's shard far below the max in this row
    for name in ("softmax", "log_softmax", "logsumexp", "entropy"):
        for temperature in (1.0, 0.5):
            compare_rowwise(ctx, name, x, temperature, what="x + 1e4")
    tokens = torch.randint(0, 97, (4,), generator=g)
    x_loc, x_ref = ctx.shard(x).requires_grad_(), x.clone().requires_grad_()
    got, ref = P.logprobs(x_loc, tokens, 0.5), kdext.logprobs(x_ref, tokens, 0.5)
    assert_close(got, ref, what="logprobs x + 1e4")
    got.sum().backward()
    ref.sum().backward()
    lo, hi = ctx.bounds(97)
    assert_close(x_loc.grad, x_ref.grad[..., lo:hi], what="logprobs x + 1e4 grad")


def check_logprobs(ctx):
    import kdext
    import kdext.parallel as P

    g = ctx.gen(8)
    vocab = 70
    sizes = shard_sizes(vocab, ctx.world)
    starts = [sum(sizes[:r]) for r in range(ctx.world)]
    # shard boundaries, first and last token, and random ids
    ids = sorted({0, vocab - 1, *starts, *[s - 1 for s in starts if s > 0]})
    ids += torch.randint(0, vocab, (12 - len(ids) % 12,), generator=g).tolist()
    tokens = torch.tensor(ids)
    x = logits((len(ids), vocab), g)
    x[1, tokens[1]] = -math.inf  # a masked token: log-prob -inf
    x[2, :] = -math.inf  # no distribution: NaN
    lo, hi = ctx.bounds(vocab)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for tok in (tokens, tokens.to(torch.int32)):
            xd = x.to(dtype)
            x_loc, x_ref = ctx.shard(xd).requires_grad_(), xd.clone().requires_grad_()
            got = P.logprobs(x_loc, tok, temperature=1.4)
            ref = kdext.logprobs(x_ref, tok, temperature=1.4)
            tag = f"logprobs {dtype} {tok.dtype}"
            assert_close(got, ref, what=tag)
            assert_same_on_all_ranks(got.detach(), tag)
            expect(got[1] == -math.inf and math.isnan(got[2]), tag + ": masked token -inf, empty row NaN")
            up = torch.randn(ref.shape, generator=ctx.gen(9), dtype=ref.dtype)
            (got * up).sum().backward()
            (ref * up).sum().backward()
            assert_close(x_loc.grad, x_ref.grad[..., lo:hi], what=tag + " grad")
    # leading dims
    x3 = logits((2, 3, vocab), g)
    t3 = torch.randint(0, vocab, (2, 3), generator=g)
    assert_close(P.logprobs(ctx.shard(x3), t3), kdext.logprobs(x3, t3), what="logprobs 3-D")
    # an id outside the global vocabulary: IndexError on every rank, as the CPU kernel; the
    # group stays usable afterwards
    bad = tokens.clone()
    bad[3] = vocab
    with pytest.raises(IndexError, match="outside the vocabulary"):
        P.logprobs(ctx.shard(x), bad)
    with pytest.raises(IndexError):
        kdext.logprobs(x, bad)
    assert_close(P.logprobs(ctx.shard(x), tokens), kdext.logprobs(x, tokens), what="logprobs after an error")


def check_shard_range(ctx):
    import kdext.parallel as P

    for vocab, variant in ((101, 0), (64, 1)):
        lo, hi = ctx.bounds(vocab, variant)
        expect(P.shard_range(hi - lo) == (lo, hi, vocab), f"shard_range V={vocab}")


def check_validation(ctx):
    """Argument errors are raised before any collective, so no rank is left waiting."""
    import kdext.parallel as P

    s = torch.randn(2, 5 + ctx.rank)
    with P.count_collectives() as log:
        with pytest.raises(ValueError, match="kind must be one of"):  # the words of kdext.distill_loss
            P.distill_loss(s, s, kind="kl")
        with pytest.raises(ValueError, match="beta must be in"):
            P.jsd(s, s, beta=1.5)
        with pytest.raises(ValueError, match="temperature"):
            P.reverse_kl(s, s, temperature=0.0)
        with pytest.raises(ValueError, match="vocabulary size mismatch"):
            P.forward_kl(s, s[:, 1:])
        with pytest.raises(ValueError, match="reduction"):
            P.distill_loss(s, s, reduction="avg")
        with pytest.raises(TypeError, match="tokens must be int64 or int32"):
            P.logprobs(s, torch.zeros(2))
        with pytest.raises(ValueError, match="labels must have shape"):
            P.distill_loss(s, s, labels=torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="top_p must be in"):
            P.top_p_sample(s, top_p=1.5)
        with pytest.raises(ValueError, match=r"top_k must be in \[0, 2\*\*63 - 1\]"):
            P.top_p_sample(s, top_k=-1)
        with pytest.raises(ValueError, match="teacher_logits is None"):
            P.top_p_sample(s, alpha=0.2)
        with pytest.raises(ValueError, match="not both"):
            P.top_p_sample(s, seed=1, generator=torch.Generator())
        with pytest.raises(ValueError, match="shape of logits"):
            P.top_p_sample(s, teacher_logits=s[:, 1:], alpha=0.5)
    expect(log.count == 0, "argument errors must come before any collective")
    # the group is still in step
    expect(torch.isfinite(P.tvd(s, s.flip(-1))).all(), "group usable after argument errors")


def check_subgroup(ctx):
    """group= a subgroup: ranks {0, 2} of 3 split the vocabulary between them."""
    import torch.distributed as dist

    import kdext
    import kdext.parallel as P

    if ctx.world != 3:
        return
    group = dist.new_group([0, 2])
    g = ctx.gen(10)
    s, t = logits((4, 50), g), logits((4, 50), g)
    if ctx.rank == 1:
        with pytest.raises(RuntimeError, match="not a member"):
            P.reverse_kl(s, t, group=group)
        return
    lo, hi = (0, 20) if ctx.rank == 0 else (20, 50)
    s_loc = s[:, lo:hi].clone().requires_grad_()
    s_ref = s.clone().requires_grad_()
    got = P.reverse_kl(s_loc, t[:, lo:hi], group=group)
    ref = kdext.reverse_kl(s_ref, t)
    got.sum().backward()
    ref.sum().backward()
    assert_close(got, ref, what="subgroup value")
    assert_close(s_loc.grad, s_ref.grad[:, lo:hi], what="subgroup grad")
    tok = torch.tensor([0, 19, 20, 49])
    assert_close(P.logprobs(s[:, lo:hi], tok, group=group), kdext.logprobs(s, tok), what="subgroup logprobs")


def check_empty_rows(ctx):
    import kdext.parallel as P

    x = torch.randn(0, 3 + ctx.rank, requires_grad=True)
    expect(P.reverse_kl(x, x.detach()).shape == (0,), "reverse_kl shape")
    expect(P.entropy(x).shape == (0,), "entropy shape")
    expect(P.softmax(x).shape == x.shape, "softmax shape")
    loss = P.distill_loss(x, x.detach(), reduction="sum")
    loss.backward()
    expect(loss.item() == 0.0 and x.grad.shape == x.shape, "distill_loss of no rows")


# --- bytes through collectives ---------------------------------------------

COLLECTIVES = [
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_into_tensor",
    "gather_object",
    "gather_single",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
]


class CollectiveCounter:
    """Wraps every collective of torch.distributed; records (name, bytes this rank puts in)."""

    def __init__(self):
        self.calls = []
        self.active = False

    def __enter__(self):
        import torch.distributed as dist

        self.saved = {}
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.active:
                tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
                if name in ("all_gather_single", "all_gather_into_tensor"):
                    tensors = tensors[1:]  # the input; the output is W times it
                self.calls.append((name, sum(x.numel() * x.element_size() for x in tensors)))
            return fn(*args, **kwargs)

        return wrapper

    def measure(self, f):
        self.calls = []
        self.active = True
        try:
            f()
        finally:
            self.active = False
        return list(self.calls)


def op_runners(ctx, rows, vocab, dtype):
    """(name, forward thunk, backward thunk) for every op, on a [rows, vocab] problem."""
    import kdext.parallel as P

    g = ctx.gen(11)
    s_full, t_full = logits((rows, vocab), g, dtype=dtype), logits((rows, vocab), g, dtype=dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    labels = tokens.clone()
    labels[::3] = -100
    runners = []

    def add(name, fwd):
        state = {}

        def forward():
            s = ctx.shard(s_full).requires_grad_()
            t = ctx.shard(t_full).requires_grad_()
            state["out"] = fwd(s, t)

        def backward():
            out = state["out"]
            out.backward(torch.ones_like(out))

        runners.append((name, forward, backward))

    for kind, param in DIVERGENCES:
        add(f"{kind}({param})", lambda s, t, k=kind, p=param: call_divergence(P, k, p, s, t, 1.0))
    add("distill_loss", lambda s, t: P.distill_loss(s, t, kind="jsd", labels=labels))
    add("softmax", lambda s, t: P.softmax(s))
    add("log_softmax", lambda s, t: P.log_softmax(s))
    add("logsumexp", lambda s, t: P.logsumexp(s))
    add("entropy", lambda s, t: P.entropy(s))
    add("logprobs", lambda s, t: P.logprobs(s, tokens))
    return runners


def expected_bytes(name, rows, a, world):
    """Payload bytes (forward, backward) that the schedule of kdext/parallel/__init__.py promises.

    ``a``: bytes of the accumulation dtype; the softmax family and logprobs exchange
    their lse's in float64 (8 bytes) whatever the input dtype.
    """
    if name == "logprobs":
        return 8 + 16 * rows, 0  # the W shard sizes (one int64 each), then (lse, x_token / T)
    if name in ("softmax", "log_softmax"):
        return 8 * rows, a * rows
    if name == "logsumexp":
        return 8 * rows, 0
    if name == "entropy":
        return 8 * rows + a * rows, 0
    return 5 * a * rows, 0  # divergences and distill_loss: gather 2 + sum 3 per row


def check_collective_bytes(ctx):
    """Every op moves O(rows) bytes, independent of V; divergences use <= 2 collectives and none in backward."""
    import kdext.parallel as P

    per_op = {}
    with CollectiveCounter() as counter:
        for dtype, a in ((torch.float32, 4), (torch.float64, 8)):
            for rows in (6, 12):
                for vocab in (ctx.world * 8, ctx.world * 3000):
                    for name, fwd, bwd in op_runners(ctx, rows, vocab, dtype):
                        with P.count_collectives() as own:
                            f_calls = counter.measure(fwd)
                        b_calls = counter.measure(bwd)
                        f_bytes, b_bytes = sum(n for _, n in f_calls), sum(n for _, n in b_calls)
                        tag = f"{name} rows={rows} V={vocab} {dtype}"
                        # the module's own accounting (used by the benchmark) agrees
                        calls = f"{tag}: forward {f_calls}, backward {b_calls}"
                        expect(own.count == len(f_calls) and own.bytes == f_bytes, "count_collectives: " + calls)
                        # only all-gather / all-reduce, and never anything of size O(rows x V)
                        names = {n for n, _ in f_calls + b_calls}
                        expect(names <= {"all_gather_single", "all_gather_into_tensor", "all_reduce"}, calls)
                        expect(max((n for _, n in f_calls + b_calls), default=0) <= 5 * a * rows + 8, calls)
                        expect((f_bytes, b_bytes) == expected_bytes(name, rows, a, ctx.world), "bytes: " + calls)
                        if name not in ("softmax", "log_softmax", "logsumexp", "entropy", "logprobs"):
                            expect(len(f_calls) <= 2 and len(b_calls) == 0, "divergence schedule: " + calls)
                        if name in ("entropy", "logprobs", "logsumexp"):
                            expect(len(b_calls) == 0, "backward needs no collective: " + calls)
                        per_op.setdefault((name, dtype, rows), set()).add(f_bytes + b_bytes)
    for key, seen in per_op.items():
        expect(len(seen) == 1, f"{key}: bytes moved depend on the vocabulary size: {seen}")



# --- sampling ---------------------------------------------------------------

SAMPLE_FIELDS = ("tokens", "student_logprob", "teacher_logprob", "sample_logprob", "threshold")
# A row's token is pinned down by float32 arithmetic when, in the float64 reference, the
# top-k/top-p target is not within this fraction of the kept mass of the F of any value of
# the row, and u * kept mass not within it of a CDF boundary. float32 r (one rounding of
# each value, ~6e-8 relative, sums accurate to a few ulps in both implementations) moves F
# and the CDF by far less, so on such rows the single-device op and the vocab-parallel one
# must keep the same set and draw the same token.
SAMPLE_MARGIN = 1e-5


def sample_reference(s, t, top_p, top_k, temperature, alpha, u):
    """Float64 reference with a sort: per row (kept mask, threshold, token, well-conditioned).

    Well-conditioned (see SAMPLE_MARGIN): no F(v) within that relative distance of the target,
    the smallest kept and the largest dropped value further apart than that, and u * mass
    that far from every CDF boundary.

    r = (1 - alpha) softmax(s/T) + alpha softmax(t/T); top-k by count, then top-p by mass on
    what top-k kept (ties kept); the token inverts the kept CDF in vocabulary order at u * mass.
    """
    x = s.double() / temperature
    r = torch.zeros_like(x)
    if alpha < 1:
        r += (1 - alpha) * torch.softmax(x, -1)
    if alpha > 0:
        r += alpha * torch.softmax(t.double() / temperature, -1)
    out = []
    for i in range(r.shape[0]):
        ri = r[i]
        if not torch.isfinite(ri).all() or not (ri > 0).any():
            out.append((None, math.nan, -1, True))
            continue
        vals, _ = torch.sort(ri[ri > 0], descending=True)
        above_mass = torch.cumsum(vals, 0) - vals  # mass strictly above, for distinct values below
        # for ties, F(v) = mass of values > v: take the first occurrence of each value
        first = torch.ones_like(vals, dtype=torch.bool)
        first[1:] = vals[1:] != vals[:-1]
        count_above = torch.arange(len(vals), dtype=torch.float64)
        f_mass = torch.empty_like(vals)
        f_count = torch.empty_like(vals)
        last_m, last_c = 0.0, 0.0
        for j in range(len(vals)):
            if first[j]:
                last_m, last_c = float(above_mass[j]), float(count_above[j])
            f_mass[j], f_count[j] = last_m, last_c
        keep_sorted = torch.ones_like(vals, dtype=torch.bool)
        good = True
        total = float(vals.sum())
        if top_k > 0:
            keep_sorted &= f_count < top_k
        mass_k = float(vals[keep_sorted].sum())
        if top_p < 1:
            target = top_p * mass_k
            keep_sorted &= f_mass < target
            fm = f_mass[first]
            gap = ((fm - target).abs() / torch.clamp(torch.maximum(fm, torch.full_like(fm, target)), min=1e-300)).min()
            good &= bool(gap > SAMPLE_MARGIN)
        thr = float(vals[keep_sorted].min())
        dropped = vals[~keep_sorted]
        if dropped.numel() > 0:  # the cut between two values that float32 might round together
            good &= bool((thr - float(dropped.max())) / thr > SAMPLE_MARGIN)
        keep = ri >= thr
        kept_r = torch.where(keep, ri, torch.zeros_like(ri))
        cdf = torch.cumsum(kept_r, 0)
        goal = float(u[i]) * float(cdf[-1])
        tok = int((cdf > goal).nonzero()[0])
        good &= bool(((cdf[keep] - goal).abs() / cdf[-1]).min() > SAMPLE_MARGIN)
        out.append((keep, thr, tok, good))
    return out


def compare_sample(ctx, s, t, what, variant=0, seed=1234, max_ill=None, **kw):
    """P.top_p_sample on the shards against kdext.top_p_sample on the full logits and the
    float64 reference; returns (got, ref, reference rows)."""
    import kdext
    import kdext.parallel as P

    alpha = kw.get("alpha", 0.0)
    got = P.top_p_sample(ctx.shard(s, variant=variant), teacher_logits=None if t is None else ctx.shard(t, variant=variant),
                         seed=seed, **kw)
    ref = kdext.top_p_sample(s, teacher_logits=t, seed=seed, **kw)
    tag = f"{what} {kw}"
    for name in SAMPLE_FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        expect(a.shape == b.shape and a.dtype == b.dtype, f"{tag} {name}: shape/dtype {a.shape} {a.dtype}")
        assert_same_on_all_ranks(a, f"{tag} {name}")
    from kdext.parallel.top_p_sample import philox_uniform

    rows = s.reshape(-1, s.shape[-1]).shape[0]
    ids = kw.get("row_ids")
    u = philox_uniform(seed, 0, torch.arange(rows, device=s.device) if ids is None else ids.reshape(-1))
    refs = sample_reference(s.reshape(rows, -1), None if t is None else t.reshape(rows, -1),
                            kw.get("top_p", 1.0), kw.get("top_k", 0), kw.get("temperature", 1.0), alpha, u)
    g_tok, r_tok = got.tokens.reshape(-1), ref.tokens.reshape(-1)
    flat = {n: (getattr(got, n).reshape(-1), getattr(ref, n).reshape(-1)) for n in SAMPLE_FIELDS[1:]}
    ill = 0
    for i, (keep, thr, tok, good) in enumerate(refs):
        gt = int(g_tok[i])
        if keep is None:
            expect(gt == -1 and int(r_tok[i]) == -1, f"{tag} row {i}: no distribution: token -1, got {gt}")
            for n, (a, b) in flat.items():
                expect(math.isnan(a[i]), f"{tag} row {i}: no distribution: {n} must be NaN, got {float(a[i])}")
            continue
        expect(0 <= gt < s.shape[-1] and bool(keep[gt]), f"{tag} row {i}: token {gt} is not in the nucleus")
        if not good:
            ill += 1
            continue
        expect(gt == tok == int(r_tok[i]), f"{tag} row {i}: tokens {gt} (parallel), {int(r_tok[i])} (single), "
                                           f"{tok} (float64 reference) must agree on a well-conditioned row")
        expect(math.isclose(float(flat["threshold"][0][i]), thr, rel_tol=1e-5),
               f"{tag} row {i}: threshold {float(flat['threshold'][0][i])} vs float64 {thr}")
        if gt == int(r_tok[i]):
            for n, (a, b) in flat.items():
                atol = 1e-5 if n != "threshold" else 0.0
                ok = (math.isnan(a[i]) and math.isnan(b[i])) or math.isclose(float(a[i]), float(b[i]), rel_tol=1e-5,
                                                                              abs_tol=atol)
                expect(ok, f"{tag} row {i}: {n} {float(a[i])} (parallel) vs {float(b[i])} (single)")
    limit = max(1, rows // 20) if max_ill is None else max_ill
    expect(ill <= limit, f"{tag}: {ill} of {rows} rows within float rounding of a cut (expected <= {limit})")
    return got, ref, refs


def check_top_p_sample(ctx):
    import kdext
    import kdext.parallel as P

    g = ctx.gen(13)
    rows, vocab = 40, 301
    s, t = logits((rows, vocab), g), logits((rows, vocab), g)
    s[3] = 0.5  # ties: a uniform row (all kept whatever top_p), and a row with a tied maximum
    s[4, 10] = s[4, 200] = s[4].max() + 2.0
    configs = [
        dict(),
        dict(top_p=0.9, temperature=0.8),
        dict(top_p=0.8, alpha=0.2),
        dict(top_p=0.95, alpha=1.0, temperature=1.3),
        dict(top_k=20),
        dict(top_k=40, top_p=0.7, alpha=0.5, temperature=1.2),
        dict(top_k=1),
        dict(top_k=vocab + 5, top_p=0.5),
    ]
    for kw in configs:
        teacher = t if kw.get("alpha", 0.0) > 0 else None
        compare_sample(ctx, s, teacher, "random", **kw)
    # the teacher given with alpha = 0: teacher_logprob is reported, r is the student's
    got, ref, _ = compare_sample(ctx, s, t, "alpha=0 with teacher", top_p=0.9)
    expect(torch.isfinite(got.teacher_logprob).all(), "alpha=0 with teacher: teacher_logprob finite")
    # the other split (a 1-token shard for 3 ranks), fp16 / bf16 / fp64 logits, leading dims
    compare_sample(ctx, s, t, "variant 1", variant=1, top_p=0.85, alpha=0.3)
    ids = torch.arange(rows, dtype=torch.int64) * 1_000_003 - 77  # any int64 ids, the same on every rank
    got, ref, _ = compare_sample(ctx, s, t, "row_ids", top_p=0.9, top_k=30, alpha=0.2, row_ids=ids)
    plain = P.top_p_sample(ctx.shard(s), teacher_logits=ctx.shard(t), top_p=0.9, top_k=30, alpha=0.2, seed=1234)
    expect(not torch.equal(plain.tokens, got.tokens), "row_ids must change the draws")
    for dtype in (torch.bfloat16, torch.float64):
        compare_sample(ctx, s.to(dtype), t.to(dtype), f"{dtype}", top_p=0.9, alpha=0.1, seed=5)
    got, _, _ = compare_sample(ctx, s.view(4, 10, vocab), None, "3-D", top_p=0.9, seed=7)
    expect(got.tokens.shape == (4, 10), "3-D: token shape")
    # greedy limit: a tiny top_p keeps only the maximum (both of a tied maximum)
    got, ref, refs = compare_sample(ctx, s, None, "greedy", top_p=1e-9)
    want = s.double().argmax(-1)
    for i in range(rows):
        if i in (3, 4):
            continue
        expect(int(got.tokens[i]) == int(want[i]), f"greedy row {i}: {int(got.tokens[i])} != argmax {int(want[i])}")
        expect(float(got.sample_logprob[i]) == 0.0, f"greedy row {i}: sample_logprob must be 0")
    expect(int(got.tokens[4]) in (10, 200), "greedy with a tied maximum keeps both")
    # masks: banned tokens, a shard all -inf, rows with no distribution (all -inf; NaN), one-hot
    ms, mt = masked_pair(ctx, 64)
    for kw in (dict(top_p=0.9), dict(top_p=0.8, alpha=0.3), dict(top_k=5, alpha=0.6)):
        got, ref, refs = compare_sample(ctx, ms, mt if kw.get("alpha") else None, "masked", seed=11, max_ill=1, **kw)
        expect(int(got.tokens[2]) == -1 and int(got.tokens[5]) == -1, f"masked {kw}: empty and NaN rows: token -1")
        banned = torch.isinf(ms[0])
        expect(not bool(banned[got.tokens[0]]), f"masked {kw}: a banned token was drawn")
    got, _, _ = compare_sample(ctx, ms, None, "masked one-hot", seed=3)
    expect(int(got.tokens[4]) == 63 and float(got.student_logprob[4]) == 0.0, "one-hot row on the last shard")
    expect(int(got.tokens[1]) >= shard_sizes(64, ctx.world)[0], "row 1: rank 0's shard is all -inf")
    # the draw follows the distribution: 4000 draws of one row (top_p = 0.6) against its kept r
    x = logits((1, 37), g).expand(4000, 37).contiguous()
    got = P.top_p_sample(ctx.shard(x), top_p=0.6, seed=99)
    keep, _, _, _ = sample_reference(x[:1], None, 0.6, 0, 1.0, 0.0, torch.zeros(1))[0]
    r = torch.softmax(x[0].double(), -1) * keep
    r = r / r.sum()
    freq = torch.bincount(got.tokens, minlength=37).double() / 4000
    expect(bool((freq[~keep] == 0).all()), "draws outside the nucleus")
    sd = (r * (1 - r) / 4000).sqrt()
    expect(bool(((freq - r).abs() <= 5 * sd + 1e-12).all()), f"draw frequencies {freq[keep]} vs {r[keep]}")
    # generators: each rank's generator advances as the single-device op's; the first rank's
    # stream is used, so equal generator states give the single-device tokens
    ga, gb = ctx.gen(21), ctx.gen(21)
    got = P.top_p_sample(ctx.shard(s), top_p=0.9, generator=ga)
    ref = kdext.top_p_sample(s, top_p=0.9, generator=gb)
    expect(torch.equal(got.tokens, ref.tokens), "generator: tokens equal the single-device op's")
    expect(torch.equal(torch.randint(0, 1 << 30, (4,), generator=ga), torch.randint(0, 1 << 30, (4,), generator=gb)),
           "generator advanced as the single-device op advances it")
    # different generator states on the ranks: still one token per row for the whole group
    got = P.top_p_sample(ctx.shard(s), top_p=0.9, generator=ctx.gen(100 + ctx.rank))
    assert_same_on_all_ranks(got.tokens, "generators differing across ranks")
    # seeds differing across ranks: an error on every rank, after which the group is in step
    with pytest.raises(ValueError, match="different seeds"):
        P.top_p_sample(ctx.shard(s), seed=ctx.rank)
    with pytest.raises(ValueError, match="top_p must be in"):
        P.top_p_sample(ctx.shard(s), top_p=0.0)
    with pytest.raises(ValueError, match="teacher_logits is None"):
        P.top_p_sample(ctx.shard(s), alpha=0.5)
    compare_sample(ctx, s, None, "after errors", top_p=0.9)
    empty = P.top_p_sample(torch.zeros(0, 3 + ctx.rank), top_p=0.9, seed=1)
    expect(empty.tokens.shape == (0,) and empty.threshold.shape == (0,), "no rows")


def check_sample_collective_bytes(ctx):
    """top_p_sample moves O(rows) bytes, bounded independently of V, and never the logits:
    gather (V_local, seed, offset), 24 B per call; gather lse's, 8 B per row and side; gather the
    row totals, 32 B per row; per search round, gather 4K float64 per still-active row, at most
    search_round_bound() rounds per search; gather the owner's draw, 32 B per row."""
    import kdext.parallel as P
    from kdext.parallel.top_p_sample import SEARCH_PIVOTS, search_round_bound

    per_round = 4 * SEARCH_PIVOTS * 8
    bound = search_round_bound()
    with CollectiveCounter() as counter:
        for rows in (6, 12):
            for vocab in (ctx.world * 8, ctx.world * 3000):
                g = ctx.gen(14)
                s, t = logits((rows, vocab), g), logits((rows, vocab), g)
                for kw, sides, searches in ((dict(top_p=0.9), 1, 1), (dict(top_k=50, top_p=0.9, alpha=0.2), 2, 2),
                                            (dict(), 1, 0)):
                    teacher = ctx.shard(t) if kw.get("alpha") else None
                    with P.count_collectives() as own:
                        calls = counter.measure(lambda: P.top_p_sample(ctx.shard(s), teacher_logits=teacher, seed=4, **kw))
                    tag = f"top_p_sample {kw} rows={rows} V={vocab}: {calls}"
                    expect(own.count == len(calls) and own.bytes == sum(n for _, n in calls), "count_collectives: " + tag)
                    expect({n for n, _ in calls} <= {"all_gather_single", "all_gather_into_tensor"}, tag)
                    sizes = [n for _, n in calls]
                    expect(sizes[:3] == [24, 8 * sides * rows, 32 * rows] and sizes[-1] == 32 * rows, "fixed part: " + tag)
                    rounds = sizes[3:-1]
                    expect(len(rounds) <= searches * bound, "rounds: " + tag)
                    expect(all(0 < n <= per_round * rows and n % per_round == 0 for n in rounds), "round payloads: " + tag)
                    if searches:
                        expect(len(rounds) >= 1, "a search takes at least one round: " + tag)
                    # O(rows), whatever V: the whole call stays under a bound without V in it
                    expect(sum(sizes) <= 24 + rows * (8 * sides + 64 + per_round * searches * bound), tag)


CHECKS = [
    check_divergences_fp32,
    check_divergences_dtypes,
    check_divergences_masked,
    check_distill_loss,
    check_softmax_family,
    check_large_logits,
    check_logprobs,
    check_shard_range,
    check_validation,
    check_subgroup,
    check_empty_rows,
    check_collective_bytes,
    check_top_p_sample,
    check_sample_collective_bytes,
]
CHECK_NAMES = [c.__name__ for c in CHECKS]


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, REPO)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    ctx = Ctx(rank, world)
    results = {}
    for check in CHECKS:
        # written before each check, so a rank that dies still reports where
        results[check.__name__] = "crashed or timed out in this check (see the captured stderr)"
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        results[check.__name__] = run_check(check, ctx)
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _run_group(world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        error = None
        try:
            mp.start_processes(_worker, args=(world, init_file, tmp), nprocs=world, join=True, start_method="spawn")
        except Exception as err:  # a rank crashed or timed out
            error = f"{type(err).__name__}: {err}"
        out = {}
        for rank in range(world):
            path = os.path.join(tmp, f"rank{rank}.json")
            if not os.path.exists(path):
                return {"error": f"rank {rank} wrote no results ({error})"}
            with open(path) as f:
                out[rank] = json.load(f)
            for name in CHECK_NAMES:
                out[rank].setdefault(name, f"not run: the group ended early ({error})")
        return out


@pytest.fixture(scope="module")
def group_results():
    return _run_group


@pytest.mark.parametrize("check", CHECK_NAMES)
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel(group_results, world, check):
    results = group_results(world)
    assert "error" not in results, results.get("error")
    failures = {rank: res[check] for rank, res in results.items() if res[check] != "ok"}
    assert not failures, "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in failures.items())


def test_torchrun_example():
    """examples/parallel_torchrun.py under torchrun (2 Gloo ranks on CPU) agrees with the single-device ops."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO, "examples", "parallel_torchrun.py"),
        "--rows",
        "16",
        "--vocab",
        "1000",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all ops agree with the single-device result" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("counter,key,words", PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, words):
    """The Python Philox4x32-10 of kdext.parallel: Random123's known-answer vectors."""
    from kdext.parallel.top_p_sample import philox4x32_10

    out = philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in out) == words


@pytest.mark.parametrize("seed,offset", [(1234, 0), (-7, 5), ((1 << 63) - 3, (1 << 40) + 3)])
def test_philox_uniform_matches_the_kernel(seed, offset):
    """u of every row equals the kernel's: on a uniform row of V = 4096 tokens every r is the
    same float and the kernel's double running sum is exact, so its token is floor(u * 4096),
    the top 12 bits of u; 300 rows check (seed, row, offset) -> u, by index and by row_ids
    (negative, repeated and beyond 2^32 included)."""
    import kdext
    from kdext.parallel.top_p_sample import philox_uniform

    rows, vocab = 300, 4096
    x = torch.zeros(rows, vocab)
    tokens = kdext.ops.top_p_sample(x, None, 1.0, 0, 1.0, 0.0, seed, offset)[0]
    u = philox_uniform(seed, offset, torch.arange(rows))
    assert torch.equal(tokens, (u.double() * vocab).floor().long())
    ids = torch.randint(-(1 << 62), 1 << 62, (rows,), generator=torch.Generator().manual_seed(offset % 1000))
    ids[:3] = torch.tensor([-1, (1 << 63) - 1, 1 << 32])
    ids[3] = ids[4]
    tokens = kdext.ops.top_p_sample(x, None, 1.0, 0, 1.0, 0.0, seed, offset, ids)[0]
    u = philox_uniform(seed, offset, ids)
    assert torch.equal(tokens, (u.double() * vocab).floor().long())


def test_signatures_are_the_single_device_ones_plus_group():
    """Every op of kdext.parallel takes its single-device twin's parameters (same names, order and
    defaults) plus ``group=None``; distill_loss has no ``fused`` (its gradient is never fused)."""
    import inspect

    import kdext
    import kdext.parallel as P

    twins = [name for name in P.__all__ if name not in ("count_collectives", "shard_range")]
    for name in twins:
        want = [p for p in inspect.signature(getattr(kdext, name)).parameters.values() if p.name != "fused"]
        got = list(inspect.signature(getattr(P, name)).parameters.values())
        assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in want] + [("group", None)], name
