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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (atol, rtol) by dtype: per-row outputs are float32 (float64 for float64 inputs);
# gradients and softmax outputs come back in the input's dtype.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 1e-3),
}

DIVERGENCES = [
    ("reverse_kl", None),
    ("forward_kl", None),
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 1.0),
    ("skew_forward_kl", 0.1),
    ("skew_reverse_kl", 0.25),
    ("tvd", None),
]


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


def div_call(module, kind, param, s, t, temperature, **kw):
    fn = getattr(module, kind)
    if param is None:
        return fn(s, t, temperature=temperature, **kw)
    key = "beta" if kind == "jsd" else "alpha"
    return fn(s, t, temperature=temperature, **{key: param}, **kw)


def compare_divergence(ctx, kind, param, s_full, t_full, temperature, variant=0, what=""):
    import kdext
    import kdext.parallel as P

    s_loc = ctx.shard(s_full, variant=variant).requires_grad_()
    t_loc = ctx.shard(t_full, variant=variant).requires_grad_()
    s_ref = s_full.detach().clone().requires_grad_()
    t_ref = t_full.detach().clone().requires_grad_()
    got = div_call(P, kind, param, s_loc, t_loc, temperature)
    ref = div_call(kdext, kind, param, s_ref, t_ref, temperature)
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
        kw = {} if param is None else ({"beta": param} if kind == "jsd" else {"alpha": param})
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
                    # When no row counts, the single-device fused path (the default) returns
                    # NaN gradients (its row weights are 0/0), against the contract that
                    # ignored rows get a zero gradient; its unfused path, like
                    # F.cross_entropy, gives zeros, and so does kdext.parallel.
                    ref = kdext.distill_loss(s_ref, t_ref, **args, fused=not none_counts)
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
        with pytest.raises(ValueError, match="unknown divergence"):
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
        add(f"{kind}({param})", lambda s, t, k=kind, p=param: div_call(P, k, p, s, t, 1.0))
    add("distill_loss", lambda s, t: P.distill_loss(s, t, kind="jsd", labels=labels))
    add("softmax", lambda s, t: P.softmax(s))
    add("log_softmax", lambda s, t: P.log_softmax(s))
    add("logsumexp", lambda s, t: P.logsumexp(s))
    add("entropy", lambda s, t: P.entropy(s))
    add("logprobs", lambda s, t: P.logprobs(s, tokens))
    return runners


def expected_bytes(name, rows, a, world):
    """Payload bytes (forward, backward) that the module docstring's schedule promises.

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
