"""The CUDA launchers and kernels run on the CPU simulator, against the CPU kernels.

No GPU is needed: tests/cpp/sim_divergence.cpp and tests/cpp/sim_softmax.cpp
compile the launchers of csrc/include/kdext/cuda/ (launch plan, kernels,
reductions) with g++ against the simulator of tests/cpp/cuda_sim (threads as
fibers; __syncthreads, warp shuffles and cluster.sync() as the barriers of
the threads that take part; per-block poisoned shared memory; distributed
shared memory across a cluster; the runtime's launch checks and occupancy
queries for a described device). Every output must agree with the CPU kernel
(torch.ops.kdext on CPU) within tests/reference.py's BACKEND_TOL (the table
the GPU tests use), and per-row values with float64 references.

The simulator is built with 64-thread blocks and run on small devices, so that
small odd shapes reach every path of the launch plan: several rows per warp
(sub-warp groups), a warp per row, a block per row (the fold across warps),
rows split across blocks (chunk partials merged in order), the on-chip kernel
in one block and in clusters of 2 to 16 blocks (chosen by the plan or forced),
and the unfused fallback. Each case also checks, from the simulator's launch
log, that the path it names is the one that ran. Outputs start as NaN bytes,
buffers end at a guard page: an unwritten output or an out-of-bounds access
fails.
"""

import math
import os
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import torch

import kdext  # noqa: F401  (registers the ops)
import reference as R
from reference import BACKEND_TOL
from test_softmax import value_bound

ops = torch.ops.kdext
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_THREADS = 64

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
KIND_CODE = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4, "tvd": 5}

# Simulated devices: (SMs, compute capability major, opt-in shared memory per block, cluster launch, blocks per
# launch at most). A small grid limit makes every grid-stride loop (and a cluster's loop over rows) go round.
BIG_GRID = 2**31 - 1
DEVICES = {
    "h100_small_smem": (4, 9, 8 * 1024, 1, BIG_GRID),  # long rows only fit on chip as a cluster
    "h100": (16, 9, 227 * 1024, 1, BIG_GRID),
    "h100_grid3": (16, 9, 227 * 1024, 1, 3),
    "h100_grid32": (16, 9, 227 * 1024, 1, 32),
    "a100": (4, 8, 163 * 1024, 0, BIG_GRID),  # no clusters: the on-chip kernel in one block
}
KNOBS = ("KDEXT_CUDA_ONCHIP", "KDEXT_CUDA_CLUSTER", "KDEXT_CUDA_CHUNKS")


# ---------------------------------------------------------------------------
# building and running the simulator
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The CPU references here are thousands of tiny ops: one intra-op thread (no fork-join per op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



DRIVERS = ("sim_divergence", "sim_softmax")


@pytest.fixture(scope="module")
def simulators(tmp_path_factory):
    """Both drivers, compiled once per session, side by side (CI has two cores)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA kernel simulator")
    out = tmp_path_factory.mktemp("cuda_sim")
    procs = {}
    for name in DRIVERS:
        cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-rdynamic", f"-DKDEXT_CUDA_BLOCK_THREADS={BLOCK_THREADS}",
               "-I" + os.path.join(ROOT, "tests", "cpp", "cuda_sim"), "-I" + os.path.join(ROOT, "csrc", "include"),
               os.path.join(ROOT, "tests", "cpp", name + ".cpp"), "-o", str(out / name)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        err = p.communicate()[1]
        assert p.returncode == 0, f"building {name} failed:\n{err[-6000:]}"
    return {name: str(out / name) for name in DRIVERS}


def i64(*v):
    return np.array(v, dtype=np.int64).tobytes()


def f64(*v):
    return np.array(v, dtype=np.float64).tobytes()


def raw(x):
    return x.detach().contiguous().view(torch.uint8).numpy().tobytes()


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Job:
    """One launcher call: its encoded input and the outputs (dtype, shape) it returns."""

    def __init__(self, what, data, outputs):
        self.what, self.data, self.outputs = what, data, outputs

    def decode(self, buf, pos):
        err = int(np.frombuffer(buf[pos : pos + 8], dtype=np.int64)[0])
        pos += 8
        out = []
        for dtype, shape in self.outputs:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if n == 0:
                out.append(torch.empty(shape, dtype=dtype))
            else:
                out.append(torch.frombuffer(bytearray(buf[pos : pos + n]), dtype=torch.uint8).view(dtype).reshape(shape))
            pos += n
        return err, out, pos


def run_sim(exe, device, env, jobs, order="forward"):
    """Runs the jobs in one simulator process; returns the outputs of each and the launch log."""
    data = i64(*DEVICES[device]) + i64(len(jobs)) + b"".join(j.data for j in jobs)
    penv = {k: v for k, v in os.environ.items() if k not in KNOBS}
    penv.update(env, CUDA_SIM_LOG="1", CUDA_SIM_ORDER=order)
    r = subprocess.run([exe, "/dev/stdin", "/dev/stdout"], input=data, capture_output=True, env=penv)
    log = r.stderr.decode(errors="replace")
    assert r.returncode == 0, f"the simulator failed (rc {r.returncode}):\n{log[-4000:]}"
    results, pos = [], 0
    for j in jobs:
        err, out, pos = j.decode(r.stdout, pos)
        assert err == 0, f"{j.what}: the launcher returned cudaError {err}"
        results.append(out)
    assert pos == len(r.stdout), "the simulator wrote more than the jobs' outputs"
    return results, log


def launched(log):
    """(kernel, cluster) of every launch in the log."""
    out = []
    for line in log.splitlines():
        if line.startswith("cuda_sim: launch "):
            f = line.split()
            out.append((f[2], int(f[5].split("=")[1])))
    return out


def layout(x, kind):
    """x [rows, V] as the simulator takes it: (flat entries, row stride, offset past a 16-byte boundary)."""
    rows, V = x.shape
    if kind == "contiguous":
        return x.reshape(-1), V, 0
    if kind == "offset1":  # rows one entry past an aligned address
        return x.reshape(-1), V, 1
    if kind == "padded":  # row stride V + 3, starting one entry in
        big = torch.full((rows, V + 3), 7.0, dtype=x.dtype)
        big[:, 1 : V + 1] = x
        return big.reshape(-1)[1 : 1 + (rows - 1) * (V + 3) + V], V + 3, 1
    raise ValueError(kind)


def seed_of(*key):
    return zlib.crc32(repr(key).encode()) % 100000


def assert_backend_close(got, want, what):
    """got (simulated CUDA) against want (the CPU kernel), or against (want, the dtype whose tolerance applies)."""
    want, tol_dtype = want if isinstance(want, tuple) else (want, want.dtype)
    atol, rtol = BACKEND_TOL[tol_dtype]
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def compare_all(cases, results, check_float64):
    for (job, want, check), got in zip(cases, results):
        assert len(got) == len(want), job.what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_backend_close(g, w, f"{job.what} [output {i}]")
        if check is not None:
            check_float64(job.what, check, got)


def normal_rows(x, T):
    """Rows with a distribution and no NaN or +inf (the rows a float64 reference is compared on)."""
    return torch.isfinite(R.logsumexp(x, T))


# ---------------------------------------------------------------------------
# divergence family
# ---------------------------------------------------------------------------

KINDS = [("reverse_kl", 0.0), ("forward_kl", 0.0), ("jsd", 0.5), ("jsd", 0.1), ("skew_forward_kl", 0.1),
         ("skew_reverse_kl", 0.3), ("tvd", 0.0)]
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
         (torch.float64, torch.float64)]
# With 64-thread blocks (fp32 pairs: 4 entries a pack, 16-bit: 8): (6, 1), (6, 7) one or two threads per row,
# several rows per warp; (70, 2) 64 one-thread groups in a block and a second block partly used; (6, 129) 8 or 16
# threads per row; (7, 300) a warp per row, long enough for the on-chip kernel in fp32; (5, 1271) a block per row
# (a fold across warps); (5, 2600) fp32 rows the plan splits across two blocks.
SHAPES = [(6, 1), (6, 7), (70, 2), (6, 129), (7, 300), (5, 1271), (5, 2600)]


@pytest.fixture(scope="module")
def sim_divergence(simulators):
    return simulators["sim_divergence"]


def pair(shape, ds, dt, seed):
    """Student and teacher logits with shared -inf masks and special rows (as tests/test_cuda_kernels.py):
    row 0 a teacher -inf where the student has mass (reverse KL = +inf), row 1 student all -inf and row 4
    teacher all -inf (empty), row 2 a NaN student logit and row 3 a +inf teacher logit (poisoned)."""
    g = torch.Generator().manual_seed(seed)
    rows, V = shape
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = s * 0.7 + torch.randn(shape, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(shape, generator=g) < 0.1
    s[mask] = -math.inf
    t[mask] = -math.inf
    s[0, 0] = 1.0  # (a live entry) where the teacher has none: reverse KL = +inf
    t[0, 0] = -math.inf
    s[1] = -math.inf
    s[2, V // 2] = math.nan
    t[3, V - 1] = math.inf
    t[4] = -math.inf
    return s.to(ds), t.to(dt)


def divergence_job(op, kind, param, s, t, T, s_layout="contiguous", t_layout="contiguous", flags=0, extra=()):
    rows, V = s.shape
    fs, ss, so = layout(s, s_layout)
    ft, ts, to = layout(t, t_layout)
    data = i64(op, KIND_CODE[kind], rows, V, DTYPE_CODE[s.dtype], DTYPE_CODE[t.dtype], ss, ts, so, to, flags)
    data += f64(param, T) + raw(fs) + raw(ft) + b"".join(raw(e) for e in extra)
    acc = acc_dtype(s.dtype)
    outputs = {
        0: [(acc, (rows,)), (acc, (rows, 4))],
        1: ([(s.dtype, (rows, V))] if flags & 1 else []) + ([(t.dtype, (rows, V))] if flags & 2 else []),
        2: [(acc, ()), (s.dtype, (rows, V))],
        3: [(acc, (rows, 3))],
    }[op]
    what = f"{['forward', 'backward', 'loss', 'partial'][op]} {kind}({param}) {tuple(s.shape)} {s.dtype}/{t.dtype}"
    return Job(what, data, outputs)


def divergence_cases(kinds, pairs, shapes, layouts=False):
    """(job, the CPU kernel's outputs, float64 check) for every op on every (kind, pair, shape)."""
    cases = []
    T = 1.7
    for kind, param in kinds:
        for ds, dt in pairs:
            for shape in shapes:
                s, t = pair(shape, ds, dt, seed=seed_of(kind, param, shape))
                gen = torch.Generator().manual_seed(seed_of(kind, param, shape, "upstream"))
                rows, V = shape
                acc = acc_dtype(ds)
                sl, tl = ("padded", "offset1") if layouts else ("contiguous", "contiguous")
                values, stats = ops.divergence_forward(s, t, kind, param, T)
                cases.append((divergence_job(0, kind, param, s, t, T, sl, tl), [values, stats],
                              ("values", s, t, kind, param, T)))
                gv = torch.randn(rows, dtype=acc, generator=gen)
                gv[::5] = 0.0  # zero upstream gradients: zero rows even when poisoned (CPU rule)
                for flags in (3, 1):
                    want = ops.divergence_backward(gv, s, t, stats, kind, param, T, bool(flags & 1), bool(flags & 2))
                    want = [w for w, f in zip(want, (1, 2)) if flags & f]
                    cases.append((divergence_job(1, kind, param, s, t, T, sl, tl, flags, (gv, stats)), want, None))
                for ignore_special in (False, True):
                    w = torch.rand(rows, dtype=acc, generator=gen)
                    w[5::3] = 0.0
                    if ignore_special:
                        w[:5] = 0.0  # the special rows ignored: a finite loss, zero gradients on them
                    loss, grad = ops.divergence_loss(s, t, w, kind, param, 0.8)
                    cases.append((divergence_job(2, kind, param, s, t, 0.8, sl, tl, 0, (w,)), [loss, grad],
                                  ("loss", s, t, kind, param, 0.8, w) if ignore_special else None))
                lse_s, lse_t = stats[:, 0].contiguous(), stats[:, 1].contiguous()
                for lo, hi in ((0, V // 3), (V // 3, V)):
                    if hi > lo:
                        ps, pt = s[:, lo:hi], t[:, lo:hi]
                        want = ops.divergence_partial(ps, pt, lse_s, lse_t, kind, param, T)
                        cases.append((divergence_job(3, kind, param, ps, pt, T, "offset1" if lo % 2 else "contiguous",
                                                     "contiguous", 0, (lse_s, lse_t)), [want], None))
    return cases


def check_divergence_float64(what, check, got):
    """Per-row values (or a loss over normal rows) against the float64 reference, within the float32 bound
    of a log-domain quantity (tests/reference.py) for logits of this size."""
    name, s, t, kind, param, T = check[:6]
    ref = R.divergence(s.double(), t.double(), kind, param, T)
    bound = max(R.log_domain_atol(s, T), R.log_domain_atol(t, T))
    if name == "values":
        rows = normal_rows(s, T) & normal_rows(t, T) & torch.isfinite(ref)
        R.assert_within(got[0][rows], ref[rows], bound + 1e-5 * ref[rows].abs(), what)
    else:  # the loss, its special rows ignored (weight 0): sum_r w_r value_r
        w = check[6].double()
        ref = (w * torch.where(w != 0, ref, torch.zeros_like(ref))).sum()
        R.assert_within(got[0].reshape(1), ref.reshape(1), bound * (w.sum() + 1) + 1e-5 * ref.abs(), what)


def same_bits(a, b):
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# Thread orders of the simulator (tests/cpp/cuda_sim/cuda_sim.h, Order) that every case runs under, besides
# the default round robin: the reverse round robin, and one block (and warp) running ahead of the others as far
# as the barriers let it, the first or the last.
RACE_ORDERS = ("reverse", "serial", "serial-reverse")


def run_checked(exe, device, env, cases, check_float64, race_cases=None):
    """Runs the cases, compares them with the CPU kernels and float64, and runs those `race_cases(job)`
    selects (all by default) again in RACE_ORDERS: the same bits, or a kernel has a data race. Returns the
    launches."""
    results, log = run_sim(exe, device, env, [c[0] for c in cases])
    compare_all(cases, results, check_float64)
    race = [i for i, c in enumerate(cases) if race_cases is None or race_cases(c[0])]
    for order in RACE_ORDERS:
        again, _ = run_sim(exe, device, env, [cases[i][0] for i in race], order=order)
        for i, b in zip(race, again):
            assert all(same_bits(x, y) for x, y in zip(results[i], b)), \
                f"{cases[i][0].what}: differs in the {order} thread order"
    return launched(log)


# path: (device, knobs, kernels that must run, on-chip cluster sizes that must run, kernels that must not run)
DIVERGENCE_PATHS = {
    "plan_h100_small_smem": ("h100_small_smem", {}, {"pair_onchip_kernel", "pair_merge_kernel", "sums_merge_kernel"},
                             {1, 2, 4}, set()),
    "plan_a100": ("a100", {}, {"pair_onchip_kernel", "pair_merge_kernel"}, {1}, set()),
    "plan_grid3": ("h100_grid3", {}, {"pair_onchip_kernel", "pair_state_kernel", "pair_sums_kernel"}, {1}, set()),
    "row_kernels": ("h100", {"KDEXT_CUDA_ONCHIP": "0"}, {"pair_state_kernel", "pair_sums_kernel", "pair_grad_kernel"},
                    set(), {"pair_onchip_kernel"}),
    "split3_grid3": ("h100_grid3", {"KDEXT_CUDA_ONCHIP": "0", "KDEXT_CUDA_CHUNKS": "3"},
                     {"pair_merge_kernel", "sums_merge_kernel", "pair_grad_kernel"}, set(), {"pair_onchip_kernel"}),
    "cluster1": ("h100", {"KDEXT_CUDA_CLUSTER": "1"}, {"pair_onchip_kernel"}, {1}, set()),
    "cluster2_grid3": ("h100_grid3", {"KDEXT_CUDA_CLUSTER": "2"}, {"pair_onchip_kernel"}, {2}, set()),
    "cluster8_grid32": ("h100_grid32", {"KDEXT_CUDA_CLUSTER": "8"}, {"pair_onchip_kernel"}, {8}, set()),
    "cluster16_grid32": ("h100_grid32", {"KDEXT_CUDA_CLUSTER": "16"}, {"pair_onchip_kernel"}, {16}, set()),
}


# The barrier structure of a divergence kernel depends on reverse KL or not and on the pack width, not on the
# kind: the thread-order runs take two kinds and three dtype pairs; the forced splits and large clusters
# (costly to simulate: 3 to 16 blocks for every row) three kinds and four pairs.
RACE_KINDS = ("reverse_kl(0.0)", "skew_reverse_kl(0.3)")
RACE_PAIRS = ("torch.float32/torch.float32", "torch.bfloat16/torch.float32", "torch.float64/torch.float64")


def race_subset(job):
    return any(k in job.what for k in RACE_KINDS) and any(p in job.what for p in RACE_PAIRS)


@pytest.mark.parametrize("path", list(DIVERGENCE_PATHS))
def test_divergence_paths(sim_divergence, path):
    """Every op, kind and dtype pair on one launch path (a subset for the largest forced clusters)."""
    device, env, kernels, clusters, forbidden = DIVERGENCE_PATHS[path]
    kinds, pairs, shapes = KINDS, PAIRS, SHAPES
    if path.startswith(("cluster8", "cluster16", "split3")):
        kinds = [("reverse_kl", 0.0), ("skew_reverse_kl", 0.3), ("tvd", 0.0)]
        pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                 (torch.float64, torch.float64)]
    if path.startswith("cluster"):  # (a forced cluster takes every row on chip: not 70 rows of a block or more)
        shapes = [sh for sh in SHAPES if sh[0] < 64]
    runs = run_checked(sim_divergence, device, env, divergence_cases(kinds, pairs, shapes), check_divergence_float64,
                       race_subset)
    ran = {k for k, _ in runs}
    onchip = {c for k, c in runs if k == "pair_onchip_kernel"}
    assert kernels <= ran and not (forbidden & ran), f"{path}: ran {sorted(ran)}"
    assert clusters <= onchip, f"{path}: on-chip clusters {sorted(onchip)}"
    if device == "a100":
        assert onchip == {1}, "clusters on a device without them"


def test_divergence_layouts(sim_divergence):
    """Padded and misaligned rows (no common 16-byte alignment: scalar packs), row and on-chip kernels."""
    cases = divergence_cases([("jsd", 0.4), ("reverse_kl", 0.0)], [(torch.bfloat16, torch.float32),
                                                                  (torch.float32, torch.float32)], SHAPES, layouts=True)
    for device, env in (("h100_grid3", {"KDEXT_CUDA_ONCHIP": "0", "KDEXT_CUDA_CHUNKS": "2"}), ("h100_small_smem", {})):
        run_checked(sim_divergence, device, env, cases, check_divergence_float64)


def test_knobs_out_of_range_are_ignored(sim_divergence):
    """A knob outside its range (docs/CUDA.md) is ignored with a warning: the plan's own path runs."""
    cases = divergence_cases([("jsd", 0.4)], [(torch.float32, torch.float32)], [(5, 1271)])
    for env in ({"KDEXT_CUDA_CLUSTER": "3"}, {"KDEXT_CUDA_CHUNKS": "-2", "KDEXT_CUDA_ONCHIP": "maybe"}):
        results, log = run_sim(sim_divergence, "h100_small_smem", env, [c[0] for c in cases])
        compare_all(cases, results, check_divergence_float64)
        for name in env:
            assert f"kdext: ignoring {name}=" in log, log[-2000:]
        assert ("pair_onchip_kernel", 2) in launched(log), "the plan's cluster of 2"


def test_divergence_empty_batch(sim_divergence):
    """No rows: nothing is launched but the loss's fixed-order sum, which writes 0."""
    s, t, w = torch.zeros(0, 37), torch.zeros(0, 37), torch.zeros(0)
    jobs = [divergence_job(0, "jsd", 0.5, s, t, 1.0), divergence_job(2, "jsd", 0.5, s, t, 1.0, extra=(w,)),
            divergence_job(1, "jsd", 0.5, s, t, 1.0, flags=3, extra=(w, torch.zeros(0, 4)))]
    results, log = run_sim(sim_divergence, "h100", {}, jobs)
    assert results[1][0].item() == 0.0 and results[1][1].shape == (0, 37)
    assert [k for k, _ in launched(log)] == ["ordered_sum_kernel"]


def scale_job(x, factor, on_device):
    rows, V = x.shape
    data = i64(4, 0, rows, V, DTYPE_CODE[x.dtype], DTYPE_CODE[x.dtype], V, V, 0, 0, int(on_device)) + f64(0.0, 1.0)
    return Job(f"scale {x.dtype} {factor}", data + raw(x) + f64(factor), [(x.dtype, (rows, V))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale(sim_divergence, dtype):
    x = torch.randn(37, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[3, 4] = math.nan
    jobs = [scale_job(x, f, d) for f, d in ((2.5, True), (-0.5, False), (1.0, True))]
    results, _ = run_sim(sim_divergence, "h100_grid3", {}, jobs)  # (a grid-stride loop that goes round)
    for (got,), f in zip(results, (2.5, -0.5, 1.0)):  # x * f rounds once, in any dtype: exact agreement
        torch.testing.assert_close(got, (x.double() * f).to(dtype), atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------
# softmax family and logprobs
# ---------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (6, 1) a lone entry; (6, 7) sub-warp groups; (70, 3) two blocks of one-thread groups; (6, 301) a warp per row;
# (5, 1271) a block per row; (5, 2600) fp32 rows split across blocks.
SOFTMAX_SHAPES = [(6, 1), (6, 7), (70, 3), (6, 301), (5, 1271), (5, 2600)]


@pytest.fixture(scope="module")
def sim_softmax(simulators):
    return simulators["sim_softmax"]


def logits(shape, dtype, seed):
    """Random logits with -inf masks, an all -inf row (1) and NaN (2) and +inf (3) rows (tests/test_cuda_kernels.py)."""
    g = torch.Generator().manual_seed(seed)
    rows, V = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if V > 1:
        x[torch.rand(shape, generator=g) < 0.1] = -math.inf
    x[1] = -math.inf
    x[2, V // 2] = math.nan
    x[3, 0] = math.inf
    return x.to(dtype)


def softmax_job(op, x, T, x_layout="contiguous", g=None, flags=0, extra=()):
    rows, V = x.shape
    fx, stride, off = layout(x, x_layout)
    gd = DTYPE_CODE[g.dtype] if g is not None else 0
    data = i64(op, rows, V, DTYPE_CODE[x.dtype], stride, off, gd, flags) + f64(T) + raw(fx)
    if g is not None:
        data += raw(g)
    data += b"".join(raw(e) for e in extra)
    acc = acc_dtype(x.dtype)
    full, per_row = (x.dtype, (rows, V)), (acc, (rows,))
    per_row64 = (torch.float64, (rows,))
    outputs = {0: [full], 1: [full], 2: [full], 3: [per_row], 4: [per_row, per_row64], 5: [per_row],
               6: [full], 7: [per_row, per_row], 8: [full], 9: [per_row64]}[op]
    names = ["softmax", "log_softmax", "softmax_backward", "logsumexp", "entropy", "entropy(shard)",
             "entropy_backward", "logprobs", "logprobs_backward", "lse_float64"]
    return Job(f"{names[op]} {tuple(x.shape)} {x.dtype} {x_layout}", data, outputs)


def softmax_cases(dtypes, shapes, x_layout="contiguous"):
    cases = []
    T = 0.7
    for dtype in dtypes:
        for shape in shapes:
            x = logits(shape, dtype, seed=seed_of(shape, dtype))
            gen = torch.Generator().manual_seed(seed_of(shape, dtype, "upstream"))
            rows, V = shape
            acc = acc_dtype(dtype)
            for log in (False, True):
                y = ops.log_softmax(x, T) if log else ops.softmax(x, T)
                cases.append((softmax_job(int(log), x, T, x_layout), [y], ("log_softmax" if log else "softmax", x, T)))
                for gdt in (dtype,) + ((torch.bfloat16,) if dtype == torch.float32 else ()):
                    g = torch.randn(shape, dtype=torch.float64, generator=gen).to(gdt)
                    want = ops.softmax_backward(g, y, T, log)
                    cases.append((softmax_job(2, y, T, g=g, flags=int(log)), [want], None))
            cases.append((softmax_job(3, x, T, x_layout), [ops.logsumexp(x, T)], ("logsumexp", x, T)))
            ent, lse = ops.entropy_forward(x, T, None)
            # (the lse is float64 from a float32 sum: the float32 tolerance applies to it)
            cases.append((softmax_job(4, x, T, x_layout), [ent, (lse, acc)], ("entropy", x, T)))
            cases.append((softmax_job(9, x, T, x_layout), [(ops.lse_float64(x, T), acc)], ("lse_float64", x, T)))
            lo = V // 3
            shard = x[:, lo:]
            cases.append((softmax_job(5, shard, T, "offset1" if lo % 2 else "contiguous", extra=(lse,)),
                          [ops.entropy_forward(shard, T, lse)[0]], None))
            grad = torch.randn(rows, dtype=acc, generator=gen)
            cases.append((softmax_job(6, x, T, x_layout, extra=(grad, ent, lse)),
                          [ops.entropy_backward(grad, x, ent, lse, T)], None))
            tokens = torch.randint(0, V, (rows,), generator=gen)
            tokens[-1] = V - 1
            lp, lse2 = ops.logprobs_forward(x, tokens, T)
            cases.append((softmax_job(7, x, T, x_layout, extra=(tokens,)), [lp, lse2], ("logprobs", x, T, tokens)))
            gl = torch.randn(rows, dtype=acc, generator=gen)
            bt = tokens.clone()
            bt[0] = -1  # a foreign token (another vocab shard's): no one-hot term
            cases.append((softmax_job(8, x, T, x_layout, extra=(gl, bt, lse2)),
                          [ops.logprobs_backward(gl, x, bt, lse2, T)], None))
    return cases


def check_softmax_float64(what, check, got):
    """Values against the float64 reference on the normal rows, with tests/test_softmax.py's bounds."""
    name, x, T = check[:3]
    xr = x.double()
    rows = normal_rows(x, T)
    if name == "logprobs":
        ref, bound = R.logprobs(xr, check[3], T), R.log_domain_atol(x, T)
    elif name == "lse_float64":
        ref, bound = R.logsumexp(xr, T), R.log_domain_atol(x, T)
    else:
        ref = {"softmax": lambda: R.log_probs(xr, T).exp(), "log_softmax": lambda: R.log_probs(xr, T),
               "logsumexp": lambda: R.logsumexp(xr, T), "entropy": lambda: R.entropy(xr, T)}[name]()
        bound = value_bound(name, x, T, ref)
        bound = bound[rows] if isinstance(bound, torch.Tensor) else bound
    R.assert_within(got[0][rows], ref[rows], bound, what)


def run_softmax(exe, device, env, cases):
    return {k for k, _ in run_checked(exe, device, env, cases, check_softmax_float64)}


SOFTMAX_PATHS = {
    "plan": ("h100", {}, {"row_state_kernel", "softmax_kernel", "softmax_bwd_kernel", "row_map_kernel",
                          "row_state_merge_kernel", "sum_chunks_kernel", "entropy_partial_kernel"}),
    "plan_grid3": ("h100_grid3", {}, {"row_state_kernel", "softmax_kernel", "row_map_kernel"}),
    "split3_grid3": ("h100_grid3", {"KDEXT_CUDA_CHUNKS": "3"}, {"row_state_merge_kernel", "sum_chunks_kernel"}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", list(SOFTMAX_PATHS))
def test_softmax_paths(sim_softmax, path, dtype):
    device, env, kernels = SOFTMAX_PATHS[path]
    ran = run_softmax(sim_softmax, device, env, softmax_cases([dtype], SOFTMAX_SHAPES))
    if dtype in (torch.float32, torch.float64) or path == "split3_grid3":  # (16-bit rows are too short to split)
        assert kernels <= ran, f"{path}: expected {sorted(kernels)} among {sorted(ran)}"


def test_softmax_layouts(sim_softmax):
    cases = softmax_cases([torch.bfloat16, torch.float32], SOFTMAX_SHAPES, x_layout="padded")
    cases += softmax_cases([torch.float16], SOFTMAX_SHAPES, x_layout="offset1")
    run_softmax(sim_softmax, "h100", {"KDEXT_CUDA_CHUNKS": "2"}, cases)
    run_softmax(sim_softmax, "h100", {}, cases)


@pytest.mark.parametrize("path", ["plan", "split3_grid3"])
def test_lse_float64_is_entropy_forwards_lse(sim_softmax, path):
    """lse_float64 is the row-state pass of logsumexp with max + log(sum) formed in float64: bit for bit the
    lse that entropy_forward returns (as on the CPU), also on split rows; and on logits near 1000 it keeps
    the state's exact max, so its error is tests/test_softmax.py's test_lse_float64_keeps_the_exact_max
    bound (a few dozen roundings of O(1 + log V)), not the rounding of a float32 lse at 2000
    (T = 0.5, a power of two: x / T is exact)."""
    device, env, _ = SOFTMAX_PATHS[path]
    T = 0.5
    jobs, refs = [], []
    for dtype in DTYPES:
        for shape in SOFTMAX_SHAPES:
            x = logits(shape, dtype, seed=seed_of(shape, dtype, "lse64")).double()
            x = torch.where(torch.isfinite(x), x + 1000.0, x).to(dtype)  # -inf, NaN and +inf stay
            jobs += [softmax_job(9, x, T), softmax_job(4, x, T)]
            refs.append((x, f"{tuple(shape)} {dtype}"))
    results, log = run_sim(sim_softmax, device, env, jobs)
    for (x, what), (lse64,), (_, lse) in zip(refs, results[::2], results[1::2]):
        assert same_bits(lse64, lse), f"lse_float64 {what}: not entropy_forward's lse"
        rows = normal_rows(x, T)
        bound = 16 * 2.0**-24 * (1 + math.log(x.shape[-1]))
        R.assert_within(lse64[rows], R.logsumexp(x.double(), T)[rows], bound, f"lse_float64 {what}")
    if path == "split3_grid3":
        assert "row_state_merge_kernel" in {k for k, _ in launched(log)}


def test_logprobs_tokens_out_of_range(sim_softmax):
    """A token outside [0, V) is never read by the CUDA forward: NaN (the CPU kernel raises instead); the
    lse and the other rows are unaffected."""
    x = logits((6, 301), torch.float32, seed=5)
    tokens = torch.tensor([3, 0, 7, 300, 9, 11])
    lp, lse = ops.logprobs_forward(x, tokens, 1.3)
    bad = tokens.clone()
    bad[0], bad[4] = -1, 301
    lp[0], lp[4] = math.nan, math.nan
    results, _ = run_sim(sim_softmax, "h100", {}, [softmax_job(7, x, 1.3, extra=(bad,))])
    assert_backend_close(results[0][0], lp, "logprobs with tokens -1 and V")
    assert_backend_close(results[0][1], lse, "their lse")


def test_tuning_hook():
    """kdext._C._set_cuda_tuning (how tests/test_cuda_kernels.py switches paths in one process, the environment
    being read once): a round trip, and out-of-range values refused with the argument's name."""
    old = kdext._C._cuda_tuning()
    try:
        kdext._C._set_cuda_tuning(onchip=False, cluster=8, chunks=3)
        assert kdext._C._cuda_tuning() == {"onchip": False, "cluster": 8, "chunks": 3}
        with pytest.raises(ValueError, match="cluster"):
            kdext._C._set_cuda_tuning(onchip=True, cluster=6, chunks=0)
        with pytest.raises(ValueError, match="chunks"):
            kdext._C._set_cuda_tuning(onchip=True, cluster=0, chunks=4097)
        assert kdext._C._cuda_tuning() == {"onchip": False, "cluster": 8, "chunks": 3}
    finally:
        kdext._C._set_cuda_tuning(**old)
