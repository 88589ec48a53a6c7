"""CUDA kernels versus the CPU kernels, op by op, on the same inputs.

Every op of csrc/cuda/*.cu is run on CUDA and on the CPU (the semantic
reference, csrc/cpu/*.cpp) and the results must agree within a per-dtype
tolerance, NaN for NaN and inf for inf. Inputs cover odd shapes (V = 1, odd V,
V = 128256 with few rows so the vocabulary is split across blocks, 3-D
leading dims), every dtype and mixed student/teacher dtypes, -inf masks,
rows that are all -inf (empty), rows with NaN or +inf (poisoned),
non-contiguous and misaligned inputs. Before each CUDA call the caching
allocator is filled with poisoned blocks (all-ones bytes: NaN in every float
dtype; then 0x7F bytes: huge finite values) so an output element a kernel
forgets to write shows up as a mismatch. The kernel paths (row kernels, split
vocabulary, on-chip clusters of each size, the unfused fallback) are forced in
turn through the launchers' tuning knobs (kdext._C._set_cuda_tuning).

Skipped when no CUDA device is visible (this whole file needs a GPU).
"""

import contextlib
import zlib

import pytest
import torch

import kdext  # noqa: F401  (registers the ops)
from reference import BACKEND_TOL, DIVERGENCE_CASES, JSD_ENDPOINTS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ops = torch.ops.kdext
DEV = "cuda"
DIVERGENCES = DIVERGENCE_CASES + JSD_ENDPOINTS
TOL = BACKEND_TOL  # (atol, rtol) per stored dtype (tests/reference.py)
PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float64, torch.float64),
]
SHAPES = [(3, 5), (7, 1), (5, 1271), (41, 401, 1271), (2, 128256), (9, 4099), (1, 70000)]
SMALL_SHAPES = [(3, 5), (7, 1), (6, 1271), (9, 4099)]
BIG_SHAPES = [(41, 401, 1271), (2, 128256), (1, 70000), (12, 128256)]
BIG_KINDS = [("reverse_kl", 0.0), ("jsd", 0.5), ("tvd", 0.0)]
BIG_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
# The full cross product on small shapes, a slice of it on large ones.
DIV_CASES = [(k, p, sh, a, b) for (k, p) in DIVERGENCES for sh in SMALL_SHAPES for (a, b) in PAIRS] + [
    (k, p, sh, a, b) for (k, p) in BIG_KINDS for sh in BIG_SHAPES for (a, b) in BIG_PAIRS
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


# Kernel paths of the launchers (csrc/include/kdext/cuda/launch_plan.h), as
# tuning knobs (docs/CUDA.md). The launchers read KDEXT_CUDA_* from the
# environment once per process, so a test switches paths through
# kdext._C._set_cuda_tuning; "default" is the plan's own choice.
DEFAULT_TUNING = {"onchip": True, "cluster": 0, "chunks": 0}
PATHS = {
    "default": {},
    "no_onchip": {"onchip": False},
    "split3": {"onchip": False, "chunks": 3},
    "cluster1": {"cluster": 1},
    "cluster2": {"cluster": 2},
    "cluster8": {"cluster": 8},
}


@contextlib.contextmanager
def cuda_path(name):
    old = kdext._C._cuda_tuning()
    kdext._C._set_cuda_tuning(**{**DEFAULT_TUNING, **PATHS[name]})
    try:
        yield
    finally:
        kdext._C._set_cuda_tuning(**old)


def poison(nbytes_list, byte):
    """Fill the caching allocator's free memory with `byte` so unwritten outputs are visible.

    Large outputs (> 1 MiB) reuse a freed block of at least their size; small
    ones are carved from 2 MiB small-pool segments, which are filled whole
    (two 1 MiB blocks each)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.empty(int(n) + 512, dtype=torch.uint8, device=DEV).fill_(byte) for n in nbytes_list]
    blocks += [torch.empty(2**20, dtype=torch.uint8, device=DEV).fill_(byte) for _ in range(8)]
    del blocks
    torch.cuda.synchronize()


def nbytes(x):
    if isinstance(x, torch.Tensor):
        return [x.numel() * x.element_size()]
    out = []
    for y in x:
        out += nbytes(y)
    return out


def to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return type(x)(to_cpu(y) for y in x)


def assert_match(cuda_out, cpu_out, what, f64_tol=None):
    if isinstance(cpu_out, torch.Tensor):
        got = cuda_out.detach().cpu()
        assert got.dtype == cpu_out.dtype, f"{what}: dtype {got.dtype} != {cpu_out.dtype}"
        assert got.shape == cpu_out.shape, f"{what}: shape {tuple(got.shape)} != {tuple(cpu_out.shape)}"
        dtype = f64_tol if (f64_tol is not None and cpu_out.dtype == torch.float64) else cpu_out.dtype
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got, cpu_out, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    assert len(cuda_out) == len(cpu_out)
    for i, (a, b) in enumerate(zip(cuda_out, cpu_out)):
        assert_match(a, b, f"{what}[{i}]", f64_tol)


def check_op(fn, cuda_args, what, paths=("default",), f64_tol=None):
    """Runs fn on the CPU copies of the args and on CUDA (under each path and both poisons).

    f64_tol: the dtype whose tolerance applies to float64 outputs computed from a
    float32 accumulation (entropy's lse)."""
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in cuda_args]
    expected = fn(*cpu_args)
    sizes = nbytes(expected)
    for path in paths:
        for byte in (0xFF, 0x7F):
            with cuda_path(path):
                poison(sizes, byte)
                got = fn(*cuda_args)
                torch.cuda.synchronize()
            assert_match(got, expected, f"{what} [{path}, poison 0x{byte:02X}]", f64_tol)
    return expected


def logits(shape, dtype, seed, scale=3.0, masks=True):
    """Random logits with -inf masks, an all -inf row and a NaN row (when there are enough rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if masks and shape[-1] > 1:
        x[torch.rand(shape, generator=g) < 0.1] = float("-inf")
    flat = x.view(-1, shape[-1])
    if masks and flat.shape[0] >= 4:
        flat[1] = float("-inf")  # empty row
        flat[2, shape[-1] // 2] = float("nan")  # poisoned row
        flat[3, 0] = float("inf")  # poisoned row
    return x.to(dtype).to(DEV)


def pair(shape, ds, dt, seed):
    """Student and teacher logits with shared -inf masks (banned / filtered tokens) and special rows:
    row 0: a teacher -inf where the student has mass (reverse KL = +inf, a true value);
    row 1: student all -inf, row 4: teacher all -inf (empty: NaN value, zero gradient);
    row 2: a NaN student logit, row 3: a +inf teacher logit (poisoned: NaN value and gradient)."""
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = s * 0.7 + torch.randn(shape, generator=g, dtype=torch.float64) * 2
    if V > 1:
        mask = torch.rand(shape, generator=g) < 0.1
        s[mask] = float("-inf")
        t[mask] = float("-inf")
    fs, ft = s.view(-1, V), t.view(-1, V)
    if fs.shape[0] >= 5 and V > 2:
        j = int(torch.isfinite(fs[0]).nonzero()[0])
        ft[0, j] = float("-inf")
        fs[1] = float("-inf")
        fs[2, V // 2] = float("nan")
        ft[3, V - 1] = float("inf")
        ft[4] = float("-inf")
    return s.to(ds).to(DEV), t.to(dt).to(DEV)


def seed_of(*key):
    return zlib.crc32(repr(key).encode()) % 100000


def noncontig(x, kind):
    """The same values as x in a non-contiguous or misaligned layout."""
    if kind == "padded":  # row stride > V
        big = torch.full(x.shape[:-1] + (x.shape[-1] + 3,), 7.0, dtype=x.dtype, device=x.device)
        big[..., 1 : x.shape[-1] + 1] = x
        return big[..., 1 : x.shape[-1] + 1]
    if kind == "offset1":  # contiguous rows starting one element past an aligned address
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        y = flat[1:].view(x.shape)
        y.copy_(x)
        return y
    if kind == "transposed" and x.dim() == 3:  # leading dims swapped: a copy is made by the op
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


# ---------------------------------------------------------------------------
# divergence family
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,param,shape,ds,dt", DIV_CASES)
def test_divergence_forward_backward(kind, param, shape, ds, dt):
    s, t = pair(shape, ds, dt, seed=seed_of(kind, shape))
    T = 1.7
    fwd = lambda a, b: ops.divergence_forward(a, b, kind, param, T)
    values, stats = check_op(fwd, [s, t], f"divergence_forward {kind}", paths=("default", "no_onchip", "split3"))
    rows = values.shape
    g = torch.randn(rows, dtype=values.dtype)
    g.view(-1)[::5] = 0.0  # zero upstream gradients: zero rows even when poisoned (CPU rule)
    bwd = lambda gv, a, b, st: ops.divergence_backward(gv, a, b, st, kind, param, T, True, True)
    check_op(bwd, [g.to(DEV), s, t, stats.to(DEV)], f"divergence_backward {kind}", paths=("default", "split3"))
    bwd_s = lambda gv, a, b, st: ops.divergence_backward(gv, a, b, st, kind, param, T, True, False)
    check_op(bwd_s, [g.to(DEV), s, t, stats.to(DEV)], f"divergence_backward(student only) {kind}")


@pytest.mark.parametrize("kind,param,shape,ds,dt", DIV_CASES)
def test_divergence_loss(kind, param, shape, ds, dt):
    s, t = pair(shape, ds, dt, seed=seed_of(kind, shape, 7))
    rows = shape[:-1]
    w = torch.rand(rows, dtype=torch.float64 if ds == torch.float64 else torch.float32)
    w.view(-1)[5::3] = 0.0  # ignored rows: zero gradient, no contribution
    fn = lambda a, b, ww: ops.divergence_loss(a, b, ww, kind, param, 0.8)
    paths = ("default", "no_onchip", "split3", "cluster1", "cluster2", "cluster8")
    if shape in BIG_SHAPES:
        paths = ("default", "no_onchip", "cluster2")
    # The special rows (inf, empty, NaN) counted: a NaN or inf loss, their gradients as the CPU's.
    check_op(fn, [s, t, w.to(DEV)], f"divergence_loss {kind}", paths=paths)
    # The special rows ignored (weight 0): a finite loss and zero gradients on them, NaN rows included.
    w.view(-1)[:5] = 0.0
    check_op(fn, [s, t, w.to(DEV)], f"divergence_loss {kind} (special rows ignored)", paths=paths)


@pytest.mark.parametrize("layout", ["padded", "offset1", "transposed"])
@pytest.mark.parametrize("ds,dt", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_divergence_noncontiguous(layout, ds, dt):
    s, t = pair((6, 11, 1031), ds, dt, seed=3)
    s2, t2 = noncontig(s, layout), noncontig(t, "offset1" if layout == "padded" else layout)
    fwd = lambda a, b: ops.divergence_forward(a, b, "jsd", 0.4, 1.0)
    check_op(fwd, [s2, t2], f"divergence_forward {layout}", paths=("default", "no_onchip"))
    w = torch.rand(s.shape[:-1])
    fn = lambda a, b, ww: ops.divergence_loss(a, b, ww, "reverse_kl", 0.0, 1.0)
    check_op(fn, [s2, t2, w.to(DEV)], f"divergence_loss {layout}", paths=("default", "no_onchip", "cluster2"))


@pytest.mark.parametrize("kind,param", DIVERGENCES)
def test_divergence_partial_shards_sum_to_forward(kind, param):
    s, t = pair((13, 3001), torch.bfloat16, torch.float32, seed=11)
    values, stats = ops.divergence_forward(s, t, kind, param, 1.3)
    lse_s, lse_t = stats[..., 0], stats[..., 1]
    cuts = [0, 1, 1000, 1001, 2999, 3001]  # unequal shards, some of one entry
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        fn = lambda a, b, ls, lt: ops.divergence_partial(a, b, ls, lt, kind, param, 1.3)
        parts.append(check_op(fn, [s[:, lo:hi], t[:, lo:hi], lse_s, lse_t], f"divergence_partial {kind}"))
    total = sum(parts)
    torch.testing.assert_close(total[:, 0], values.cpu(), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(total[:, 1:], stats[:, 2:].cpu(), atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale(dtype):
    x = torch.randn(1001, 37, dtype=dtype, device=DEV)
    ref = x.clone()
    ops.scale_(x, torch.ones((), device=DEV))
    assert torch.equal(x, ref)  # factor 1: untouched
    nan_x = torch.full((5, 7), float("nan"), dtype=dtype, device=DEV)
    ops.scale_(nan_x, torch.ones((), dtype=torch.float64, device=DEV))
    assert torch.isnan(nan_x).all()
    with pytest.raises(RuntimeError, match="factor"):  # factor on another device, as on the CPU
        ops.scale_(x, torch.tensor(3.0, device="cpu" if DEV == "cuda" else "meta"))
    for factor in (torch.tensor(2.5, device=DEV), torch.tensor(-0.5, dtype=torch.float64, device=DEV),
                   torch.tensor(0.25, dtype=torch.bfloat16, device=DEV)):
        y = ref.clone()
        ops.scale_(y, factor)
        expect = ref.cpu() * float(factor)
        torch.testing.assert_close(y.cpu(), expect.to(dtype), atol=TOL[dtype][0], rtol=TOL[dtype][1])
    odd = ref.clone()[:, 1:]  # misaligned rows
    ops.scale_(odd, torch.tensor(2.0, device=DEV))
    torch.testing.assert_close(odd.cpu(), (ref[:, 1:].cpu() * 2).to(dtype), atol=0, rtol=0)
    flat = ref.clone().view(-1)[3:]  # misaligned contiguous
    ops.scale_(flat, torch.tensor(2.0, device=DEV))
    torch.testing.assert_close(flat.cpu(), (ref.view(-1)[3:].cpu() * 2).to(dtype), atol=0, rtol=0)


def test_loss_is_deterministic():
    s, t = pair((257, 32000), torch.bfloat16, torch.bfloat16, seed=5)
    w = torch.rand(257, device=DEV)
    for path in ("default", "no_onchip", "split3"):
        with cuda_path(path):
            a = ops.divergence_loss(s, t, w, "reverse_kl", 0.0, 1.0)
            b = ops.divergence_loss(s, t, w, "reverse_kl", 0.0, 1.0)
        for x, y in zip(a, b):  # bitwise, NaN included
            torch.testing.assert_close(x, y, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{path}: {m}")


def test_fused_loss_matches_autograd_of_unfused():
    s, t = pair((64, 5003), torch.bfloat16, torch.bfloat16, seed=9)
    s = s.clone().requires_grad_(True)
    loss = kdext.distill_loss(s, t, kind="reverse_kl")  # fused kernel + scale_ backward
    (g_fused,) = torch.autograd.grad(loss * 3.0, s)
    loss2 = kdext.distill_loss(s, t, kind="reverse_kl", fused=False)
    (g_unfused,) = torch.autograd.grad(loss2 * 3.0, s)
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(g_fused, g_unfused, atol=1e-4, rtol=1.6e-2, equal_nan=True)


@pytest.mark.slow
def test_indexing_beyond_2_31():
    """rows x V > 2^31: the last rows must equal the same rows computed alone."""
    rows, V = 16400, 131072  # 2.15e9 entries per tensor
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 20 GB of GPU memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    s = torch.randn(rows, V, device=DEV, dtype=torch.bfloat16, generator=g)
    t = torch.randn(rows, V, device=DEV, dtype=torch.bfloat16, generator=g)
    w = torch.ones(rows, device=DEV)
    tail = slice(rows - 3, rows)
    loss, grad = ops.divergence_loss(s, t, w, "reverse_kl", 0.0, 1.0)
    values, stats = ops.divergence_forward(s, t, "reverse_kl", 0.0, 1.0)
    gs, _ = ops.divergence_backward(torch.ones(rows, device=DEV), s, t, stats, "reverse_kl", 0.0, 1.0, True, False)
    s_tail, t_tail = s[tail].clone(), t[tail].clone()
    del s, t
    v_ref, _ = ops.divergence_forward(s_tail, t_tail, "reverse_kl", 0.0, 1.0)
    _, g_ref = ops.divergence_loss(s_tail, t_tail, torch.ones(3, device=DEV), "reverse_kl", 0.0, 1.0)
    torch.testing.assert_close(values[tail], v_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[tail], g_ref, atol=0, rtol=0)
    torch.testing.assert_close(gs[tail], g_ref, atol=1e-6, rtol=1.6e-2)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------
# softmax family
# ---------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_family(shape, dtype):
    x = logits(shape, dtype, seed=17)
    T = 0.7
    paths = ("default", "split3")
    for log in (False, True):
        fn = (lambda a: ops.log_softmax(a, T)) if log else (lambda a: ops.softmax(a, T))
        y = check_op(fn, [x], f"{'log_' if log else ''}softmax", paths=paths)
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        bwd = lambda gg, yy: ops.softmax_backward(gg, yy, T, log)
        check_op(bwd, [g.to(DEV), y.to(DEV)], f"softmax_backward(log={log})", paths=paths)
    check_op(lambda a: ops.logsumexp(a, T), [x], "logsumexp", paths=paths)
    f64_tol = None if dtype == torch.float64 else torch.float32  # the lse is float64 from a float32 sum
    check_op(lambda a: ops.lse_float64(a, T), [x], "lse_float64", paths=paths, f64_tol=f64_tol)
    ent, lse = check_op(lambda a: ops.entropy_forward(a, T, None), [x], "entropy_forward", paths=paths,
                        f64_tol=f64_tol)
    assert lse.dtype == torch.float64
    grad = torch.randn(ent.shape, dtype=ent.dtype)
    eb = lambda gg, a, h, ll: ops.entropy_backward(gg, a, h, ll, T)
    check_op(eb, [grad.to(DEV), x, ent.to(DEV), lse.to(DEV)], "entropy_backward", paths=paths)
    # a vocab shard's partial entropy given the global lse
    V = shape[-1]
    lo, hi = V // 3, V
    ep = lambda a, ll: ops.entropy_forward(a, T, ll)
    check_op(ep, [x[..., lo:hi], lse.to(DEV)], "entropy_forward(shard)", paths=paths, f64_tol=f64_tol)


def test_softmax_backward_mixed_dtypes():
    y = ops.softmax(logits((9, 777), torch.float32, seed=1), 1.0)
    for gdt in (torch.bfloat16, torch.float64, torch.float16):
        g = torch.randn(9, 777, dtype=torch.float64).to(gdt).to(DEV)
        for log in (False, True):
            bwd = lambda gg, yy: ops.softmax_backward(gg, yy, 1.0, log)
            check_op(bwd, [g, y], f"softmax_backward g={gdt} log={log}")


@pytest.mark.parametrize("layout", ["padded", "offset1", "transposed"])
def test_softmax_noncontiguous(layout):
    x = noncontig(logits((5, 6, 2049), torch.bfloat16, seed=2), layout)
    check_op(lambda a: ops.softmax(a, 1.0), [x], f"softmax {layout}")
    check_op(lambda a: ops.entropy_forward(a, 1.0, None), [x], f"entropy {layout}", f64_tol=torch.float32)


# ---------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tok_dtype", [torch.int64, torch.int32])
def test_logprobs(shape, dtype, tok_dtype):
    x = logits(shape, dtype, seed=23)
    V = shape[-1]
    tokens = torch.randint(0, V, shape[:-1], dtype=tok_dtype)
    tokens.view(-1)[-1] = V - 1
    T = 1.3
    lp, lse = check_op(lambda a, k: ops.logprobs_forward(a, k, T), [x, tokens.to(DEV)], "logprobs_forward",
                       paths=("default", "split3"))
    g = torch.randn(lp.shape, dtype=lp.dtype)
    bwd = lambda gg, a, k, ll: ops.logprobs_backward(gg, a, k, ll, T)
    check_op(bwd, [g.to(DEV), x, tokens.to(DEV), lse.to(DEV)], "logprobs_backward", paths=("default", "split3"))


def test_logprobs_out_of_range_tokens():
    """CUDA: NaN for a token outside [0, V) in the forward (the CPU raises), no one-hot term in the backward."""
    x = logits((4, 1000), torch.float32, seed=4, masks=False)
    tokens = torch.tensor([0, -1, 1000, 999], device=DEV)
    lp, lse = ops.logprobs_forward(x, tokens, 1.0)
    assert torch.isnan(lp[1]) and torch.isnan(lp[2])
    assert torch.isfinite(lp[0]) and torch.isfinite(lp[3])
    with pytest.raises(IndexError):
        ops.logprobs_forward(x.cpu(), tokens.cpu(), 1.0)
    g = torch.ones(4, device=DEV)
    grad = ops.logprobs_backward(g, x, tokens, lse, 1.0)
    ref = ops.logprobs_backward(g.cpu(), x.cpu(), tokens.cpu(), lse.cpu(), 1.0)
    torch.testing.assert_close(grad.cpu(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad[1], -torch.softmax(x[1], -1), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# opcheck on CUDA tensors
# ---------------------------------------------------------------------------


def _opcheck_cases():
    s = torch.randn(3, 5, 67, device=DEV, dtype=torch.bfloat16)
    t = torch.randn(3, 5, 67, device=DEV, dtype=torch.float32)
    s32 = torch.randn(6, 67, device=DEV, requires_grad=True)
    t32 = torch.randn(6, 67, device=DEV)
    values, stats = ops.divergence_forward(s32.detach(), t32, "jsd", 0.3, 1.1)
    tok = torch.randint(0, 67, (6,), device=DEV)
    x = torch.randn(6, 67, device=DEV, requires_grad=True)
    ent, lse = ops.entropy_forward(x.detach(), 1.0, None)
    y = ops.softmax(x.detach(), 1.0)
    return [
        (ops.divergence_forward, (s, t, "reverse_kl", 0.0, 1.0)),
        (ops.divergence_forward, (s32, t32, "jsd", 0.3, 1.1)),
        (ops.divergence_backward, (torch.randn(6, device=DEV), s32.detach(), t32, stats, "jsd", 0.3, 1.1, True, True)),
        (ops.divergence_loss, (s32.detach(), t32, torch.rand(6, device=DEV), "reverse_kl", 0.0, 1.0)),
        (ops.divergence_loss, (s, t, torch.rand(3, 5, device=DEV), "tvd", 0.0, 2.0)),
        (ops.divergence_partial, (s32.detach(), t32, stats[:, 0], stats[:, 1], "skew_reverse_kl", 0.2, 1.1)),
        (ops.scale_, (torch.randn(6, 67, device=DEV), torch.tensor(2.0, device=DEV))),
        (ops.softmax, (x, 0.9)),
        (ops.log_softmax, (x, 0.9)),
        (ops.softmax_backward, (torch.randn(6, 67, device=DEV), y, 0.9, False)),
        (ops.logsumexp, (x, 1.2)),
        (ops.lse_float64, (x, 1.2)),
        (ops.entropy_forward, (x, 1.0, None)),
        (ops.entropy_forward, (x.detach(), 1.0, lse)),
        (ops.entropy_backward, (torch.randn(6, device=DEV), x.detach(), ent, lse, 1.0)),
        (ops.logprobs_forward, (x, tok, 1.0)),
        (ops.logprobs_backward, (torch.randn(6, device=DEV), x.detach(), tok, lse, 1.0)),
    ]


@pytest.mark.parametrize("case", range(17))
def test_opcheck_cuda(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_opcheck_cuda_divergence_loss_autograd():
    s = torch.randn(6, 67, device=DEV, requires_grad=True)
    t = torch.randn(6, 67, device=DEV)
    torch.library.opcheck(ops.divergence_loss, (s, t, torch.rand(6, device=DEV), "reverse_kl", 0.0, 1.0))
