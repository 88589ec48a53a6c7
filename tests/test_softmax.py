"""softmax, log_softmax, logsumexp and entropy (with temperature) against float64 references.

Error model (see reference.py): every result is compared with the float64
reference evaluated on the *same* rounded inputs. What is left is

* the float32 accumulation error of a log-domain quantity (lse, log q_i, H):
  `acc = log_domain_atol(x, T)`, 64 roundings of size max|x/T| + log V;
  a probability q_i = exp(log q_i) carries it as a relative error;
* the rounding of the result to its dtype, `u = unit_roundoff(dtype)`
  (softmax / log_softmax / gradients come back in the input's dtype);
* underflow near zero, `sub = underflow_atol(dtype)`.

The gradient bounds below follow from these by the chain rule, term by term;
softmax and log_softmax differentiate through their *rounded* output (the
backward is a kernel on the saved output), hence the u in their first term.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdext
import reference as R

OPS = ["softmax", "log_softmax", "logsumexp", "entropy"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
VOCABS = [1, 7, 513, 1271]


def out_dtype(name, x):
    if name in ("softmax", "log_softmax"):
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reference_value(name, xr, temperature):
    if name == "softmax":
        return R.log_probs(xr, temperature).exp()
    if name == "log_softmax":
        return R.log_probs(xr, temperature)
    if name == "logsumexp":
        return R.logsumexp(xr, temperature)
    return R.entropy(xr, temperature)


def value_bound(name, x, temperature, want):
    acc = R.log_domain_atol(x, temperature)
    u = R.unit_roundoff(out_dtype(name, x))
    sub = R.underflow_atol(out_dtype(name, x))
    if name == "softmax":  # relative error acc (exp of an abs. error) plus rounding
        return 2 * (u + acc) * want + sub
    if name == "log_softmax":
        return acc + 2 * u * want.abs()
    return acc  # logsumexp, entropy: float32 per-row values, acc covers the final rounding


def grad_bound(name, x, temperature, g, want):
    """Bound on |d(op)/dx - reference| for the upstream gradient g (float64, same rounding as used)."""
    xr = x.detach().double()
    lq = R.log_probs(xr, temperature)
    q = lq.exp()
    acc = R.log_domain_atol(x, temperature)
    u = R.unit_roundoff(x.dtype)
    sub = R.underflow_atol(x.dtype)
    T = temperature
    if name == "softmax":
        # grad_i = y_i (g_i - sum_j g_j y_j) / T with y the rounded output (rel. error u + acc):
        # y_i's error times |g_i - dot|, plus y_i times the dot's error <= (u + acc) max|g|.
        dot = (g * q).sum(-1, keepdim=True)
        gmax = g.abs().amax(-1, keepdim=True)
        # (sub: y_i flushed to zero carries the same factor.)
        factor = ((g - dot).abs() + gmax) / T
        return (2 * (u + acc) * q + sub) * factor + 2 * u * want.abs() + sub
    if name == "log_softmax":
        # grad_i = (g_i - exp(y_i) sum_j g_j) / T; exp(y_i) has relative error |dy_i| <= acc + u |log q_i|.
        qlq = torch.where(q > 0, q * lq.abs(), torch.zeros_like(q))
        gsum = g.abs().sum(-1, keepdim=True)
        return (2 * (q * acc + u * qlq) + sub) * gsum / T + 2 * u * want.abs() + sub
    if name == "logsumexp":
        # softmax(x/T) in x's dtype (u + acc) times (g / T) rounded to x's dtype (u), rounded (u).
        return 2 * (2 * u + acc) * want.abs() + sub * (1 + g.abs().unsqueeze(-1) / T)
    # entropy: grad_j = -g q_j (log q_j + H) / T computed in float32 from lse and H (each within acc).
    h = R.entropy(xr, temperature).unsqueeze(-1)
    # (q_j flushed to zero below float32's smallest normal: sub in place of acc q_j.)
    spread = torch.where(torch.isfinite(lq), (lq + h).abs(), torch.zeros_like(q))
    return (2 * acc * q + sub) * (spread + 2) * g.abs().unsqueeze(-1) / T + 2 * u * want.abs() + sub


def check_against_reference(name, x, temperature, seed=0):
    x = x.detach().requires_grad_()
    out = getattr(kdext, name)(x, temperature)
    expected_shape = x.shape if name in ("softmax", "log_softmax") else x.shape[:-1]
    assert out.shape == expected_shape
    assert out.dtype == out_dtype(name, x)

    xr = x.detach().double().requires_grad_()
    want = reference_value(name, xr, temperature)
    R.assert_within(out, want.detach(), value_bound(name, x, temperature, want.detach()), f"{name} value")

    # The upstream gradient is rounded to the output's dtype first; the
    # reference gets the same rounded numbers.
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(out.dtype)
    (gx,) = torch.autograd.grad(out, x, upstream)
    (gx_ref,) = torch.autograd.grad(want, xr, upstream.double())
    assert gx.dtype == x.dtype and gx.shape == x.shape
    R.assert_within(gx, gx_ref, grad_bound(name, x, temperature, upstream.double(), gx_ref), f"{name} gradient")


@pytest.mark.parametrize("name", OPS)
@given(**R.logit_draws(VOCABS), dtype=st.sampled_from(DTYPES))
def test_matches_float64_reference(name, seed, rows, vocab, dtype, temperature, scale, mask_frac):
    gen = torch.Generator().manual_seed(seed)
    x = R.random_logits(gen, tuple(rows) + (vocab,), dtype, scale, mask_frac)
    check_against_reference(name, x, temperature, seed)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama3_vocab(name, dtype):
    gen = torch.Generator().manual_seed(17)
    x = R.random_logits(gen, (2, 128256), dtype, 3.0, 0.1)
    check_against_reference(name, x, 0.8)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_and_leading_dims(name):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 5, 40, generator=gen)
    rows_strided = base[:, 1:4, :]  # leading dims that do not collapse into a view
    last_strided = torch.randn(40, 5, 3, generator=gen).permute(2, 1, 0)  # last dim not unit-stride
    every_other = torch.randn(4, 81, generator=gen, dtype=torch.float64).to(torch.bfloat16)[:, ::2]
    assert not rows_strided.is_contiguous() and last_strided.stride(-1) != 1 and every_other.stride(-1) == 2
    for x in (rows_strided, last_strided, every_other, base.unsqueeze(0).unsqueeze(2)):
        check_against_reference(name, x, 1.3)


@pytest.mark.parametrize("name", OPS)
def test_gradcheck_float64(name):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = getattr(kdext, name)
    assert torch.autograd.gradcheck(lambda a: fn(a, 1.7), (x,))


@pytest.mark.parametrize("name", OPS)
def test_empty_rows(name):
    x = torch.randn(0, 7, requires_grad=True)
    out = getattr(kdext, name)(x)
    assert out.shape == ((0, 7) if name in ("softmax", "log_softmax") else (0,))
    out.sum().backward()
    assert x.grad.shape == (0, 7)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from(VOCABS + [4099]),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.7, 1.0, 3.0]),
    mask_frac=st.sampled_from([0.0, 0.5]),
)
def test_softmax_rows_sum_to_one(seed, vocab, dtype, temperature, mask_frac):
    gen = torch.Generator().manual_seed(seed)
    x = R.random_logits(gen, (5, vocab), dtype, 4.0, mask_frac)
    total = kdext.softmax(x, temperature).double().sum(-1)
    # Each q_i is within 2 (u + acc) q_i + sub of the truth, and the q_i sum to 1.
    bound = 2 * (R.unit_roundoff(dtype) + R.log_domain_atol(x, temperature)) + vocab * R.underflow_atol(dtype)
    R.assert_within(total, torch.ones(5, dtype=torch.float64), bound, "sum of softmax")
    assert (kdext.softmax(x, temperature) >= 0).all()


@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from(VOCABS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    shift_scale=st.sampled_from([1.0, 100.0, 1000.0]),
)
def test_log_softmax_invariant_to_row_shift(seed, vocab, dtype, temperature, shift_scale):
    gen = torch.Generator().manual_seed(seed)
    # Logits on a 2^-10 grid and integer shifts below 2^13: x + c is exact in
    # float32, and so is x / T for these temperatures, so both calls see exactly
    # shifted inputs and the only differences are kdext's own rounding errors.
    x = (torch.randn(4, vocab, generator=gen, dtype=torch.float64) * 4 * 1024).round() / 1024
    c = (torch.randn(4, 1, generator=gen, dtype=torch.float64) * shift_scale).round().clamp(-4096, 4096)
    x, xc = x.to(dtype), (x + c).to(dtype)
    assert torch.equal(xc.double() - x.double(), c.expand_as(x))
    a, b = kdext.log_softmax(x, temperature), kdext.log_softmax(xc, temperature)
    ref = R.log_probs(x, temperature)
    u = R.unit_roundoff(dtype)
    bound = R.log_domain_atol(x, temperature) + R.log_domain_atol(xc, temperature) + 4 * u * ref.abs()
    R.assert_within(b, a, bound, "log_softmax(x + c) vs log_softmax(x)")
    bound = R.log_domain_atol(x, temperature) + R.log_domain_atol(xc, temperature)
    R.assert_within(kdext.logsumexp(xc, temperature) - c.squeeze(-1) / temperature,
                    kdext.logsumexp(x, temperature), bound, "logsumexp(x + c) - c / T")


@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from(VOCABS + [4099]),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.5, 1.0, 4.0]),
    scale=st.sampled_from([0.01, 1.0, 10.0]),
    mask_frac=st.sampled_from([0.0, 0.5]),
)
def test_entropy_between_zero_and_log_vocab(seed, vocab, dtype, temperature, scale, mask_frac):
    gen = torch.Generator().manual_seed(seed)
    x = R.random_logits(gen, (6, vocab), dtype, scale, mask_frac)
    h = kdext.entropy(x, temperature).double()
    acc = R.log_domain_atol(x, temperature)
    live = torch.isfinite(x).sum(-1).double()  # H <= log(number of tokens with q > 0)
    assert (h >= -acc).all(), h.min()
    assert (h <= live.log() + acc).all(), (h - live.log()).max()


@pytest.mark.parametrize("vocab", [1, 2, 7, 1271, 128256])
def test_entropy_extremes(vocab):
    # Uniform: H = log V, lse = c / T + log V, softmax = 1 / V.
    x = torch.full((2, vocab), 3.0)
    torch.testing.assert_close(kdext.entropy(x, 1.5).double(), torch.full((2,), math.log(vocab), dtype=torch.float64),
                               atol=R.log_domain_atol(x, 1.5), rtol=0)
    torch.testing.assert_close(kdext.logsumexp(x, 1.5).double(),
                               torch.full((2,), 2.0 + math.log(vocab), dtype=torch.float64),
                               atol=R.log_domain_atol(x, 1.5), rtol=0)
    # One-hot-ish: one logit 200/T above the rest. The true entropy is below
    # V * 200 e^-200 < 1e-80; the centred sums have no cancellation, so what
    # kdext returns is that tiny positive number's float32 rounding: 0 up to a
    # few roundings of float32's smallest normal.
    for temperature in (0.5, 1.0, 2.0):
        y = torch.zeros(3, vocab)
        y[:, vocab // 2] = 200.0
        h = kdext.entropy(y, temperature)
        assert (h >= 0).all() and (h <= 1e-30).all(), h
    # A single live token (the rest masked): exactly 0, with a zero gradient.
    z = torch.full((2, vocab), -math.inf)
    z[:, -1] = 5.0
    z.requires_grad_()
    h = kdext.entropy(z, 0.7)
    assert (h == 0).all()
    h.sum().backward()
    assert (z.grad == 0).all()


@pytest.mark.parametrize("shift", [1000.0, 10000.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("vocab", [7, 1271, 128256])
def test_entropy_precise_for_large_logits(shift, temperature, vocab):
    """H = lse - E_q[x/T] cancels catastrophically for large logits unless the
    sums are centred on the row max: x + 10^4 would lose ~1e-3 absolute. The
    centred kernel's error must not grow with the shift: a few dozen roundings
    of O(1 + log V) numbers. (T is a power of two, so x / T is exact.)"""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(3, vocab, generator=gen) * 3 + shift
    bound = 16 * 2.0**-24 * (1 + math.log(vocab))
    R.assert_within(kdext.entropy(x, temperature), R.entropy(x, temperature), bound, f"entropy(x + {shift})")


@pytest.mark.parametrize("shift", [1000.0, 10000.0])
def test_entropy_gradient_precise_for_large_logits(shift):
    """dH/dx_j = -q_j (log q_j + H) / T must be as shift-free as H itself.

    With log q_j formed as (x_j - m) - log Z (centred, as the forward does), a
    float32 computation has |error_j| <= q_j (2 + |log q_j + H|) 16 u (1 + |log q_j|
    + log V) + 2 u |grad_j|: torch's own float32 autograd of -(q * log_softmax(x)).sum()
    stays under half of that bound here. Forming log q_j = x_j / T - lse with lse
    rounded to float32 (|lse| ~ shift) instead adds ulp(shift) / 2 to every log q_j.
    """
    vocab = 1271
    gen = torch.Generator().manual_seed(vocab)
    x = (torch.randn(3, vocab, generator=gen) * 3 + shift).requires_grad_()
    (g,) = torch.autograd.grad(kdext.entropy(x).sum(), x)
    xr = x.detach().double().requires_grad_()
    h_ref = R.entropy(xr)
    (g_ref,) = torch.autograd.grad(h_ref.sum(), xr)
    lq = R.log_probs(xr.detach())
    u = 2.0**-24
    spread = (lq + h_ref.detach().unsqueeze(-1)).abs()
    bound = lq.exp() * (2 + spread) * 16 * u * (1 + lq.abs() + math.log(vocab)) + 2 * u * g_ref.abs()
    R.assert_within(g, g_ref, bound + R.underflow_atol(torch.float32), f"entropy gradient at x + {shift}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token_vocabulary(dtype):
    x = torch.tensor([[2.5], [-1.0]], dtype=dtype, requires_grad=True)
    assert (kdext.softmax(x, 0.3) == 1).all()
    assert (kdext.log_softmax(x, 0.3) == 0).all()
    assert (kdext.entropy(x, 0.3) == 0).all()
    torch.testing.assert_close(kdext.logsumexp(x, 0.5), (x.detach() * 2).squeeze(-1).to(out_dtype("entropy", x)))
    for name in OPS:
        (g,) = torch.autograd.grad(getattr(kdext, name)(x, 0.3).sum(), x)
        # q = 1: d lse(x/T)/dx = q/T = 1/T; softmax, log_softmax and entropy are constant.
        expected = torch.full_like(x, 1 / 0.3) if name == "logsumexp" else torch.zeros_like(x)
        torch.testing.assert_close(g, expected, atol=0, rtol=2 * R.unit_roundoff(dtype))


def test_output_dtypes():
    for dtype in DTYPES:
        x = torch.randn(2, 5).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert kdext.softmax(x).dtype == dtype and kdext.log_softmax(x).dtype == dtype
        assert kdext.logsumexp(x).dtype == acc and kdext.entropy(x).dtype == acc


def test_low_precision_is_computed_in_float32():
    """bf16 / fp16 softmax is the float32 computation rounded once: within one
    ulp of the float32 result rounded to the low precision (double rounding)."""
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(8, 1000, generator=gen) * 5).to(dtype)
        for name in ("softmax", "log_softmax"):
            low = getattr(kdext, name)(x, 1.0).float()
            high = getattr(kdext, name)(x.float(), 1.0)
            torch.testing.assert_close(low, high, atol=R.underflow_atol(dtype), rtol=torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------
# The contract on infinities and NaN
# ---------------------------------------------------------------------------


def test_all_masked_row():
    inf = math.inf
    x = torch.tensor([[0.0, 1.0, -inf, 2.0], [-inf, -inf, -inf, -inf], [3.0, -inf, -inf, 1.0]], requires_grad=True)
    xd = x.detach()
    # softmax / log_softmax / logsumexp behave like torch: NaN, NaN, -inf.
    torch.testing.assert_close(kdext.softmax(x), torch.softmax(xd, -1), equal_nan=True)
    torch.testing.assert_close(kdext.log_softmax(x), torch.log_softmax(xd, -1), equal_nan=True)
    torch.testing.assert_close(kdext.logsumexp(x), torch.logsumexp(xd, -1))
    # entropy: no distribution, so NaN, and a zero gradient (docs/DESIGN.md).
    h = kdext.entropy(x, 1.3)
    assert torch.isnan(h[1]) and torch.isfinite(h[[0, 2]]).all()
    (g,) = torch.autograd.grad(h[[0, 2]].sum() + h[1], x)  # NaN upstream value included
    assert (g[1] == 0).all() and torch.isfinite(g).all()
    # masked entries of live rows get no gradient
    assert g[0, 2] == 0 and (g[2, 1:3] == 0).all()


@pytest.mark.parametrize("name", OPS)
def test_nan_poisons_only_its_row(name):
    x = torch.randn(3, 2, 17)
    x[1, 0, 4] = math.nan
    x.requires_grad_()
    out = getattr(kdext, name)(x, 0.9)
    rows_out = out if out.dim() == 2 else out.reshape(3, 2, -1)
    assert torch.isnan(rows_out[1, 0]).all(), "NaN must reach its row's output"
    assert torch.isfinite(rows_out[[0, 2]]).all() and torch.isfinite(rows_out[1, 1]).all()
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.isnan(g[1, 0]).all()
    assert torch.isfinite(g[[0, 2]]).all() and torch.isfinite(g[1, 1]).all()


@pytest.mark.parametrize("name", OPS)
def test_plus_inf_logit_poisons_only_its_row(name):
    """A +inf logit is outside the contract (q = inf / inf): it must poison its
    own row and nothing else, never crash. softmax / log_softmax match torch (NaN)."""
    x = torch.randn(3, 9)
    x[0, 3] = math.inf
    out = getattr(kdext, name)(x)
    assert torch.isfinite(out[1:]).all()
    assert not torch.isfinite(out[0]).any()
    ref = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}.get(name)
    if ref is not None:
        torch.testing.assert_close(out[0], ref(x, -1)[0], equal_nan=True)


# ---------------------------------------------------------------------------
# lse_float64: the per-row lse in float64 that vocab shards exchange
# ---------------------------------------------------------------------------

ops = torch.ops.kdext


@given(**R.logit_draws(VOCABS), dtype=st.sampled_from(DTYPES))
def test_lse_float64_matches_float64_reference(seed, rows, vocab, dtype, temperature, scale, mask_frac):
    """The lse of the same rounded inputs, within the float32 accumulation error
    (float64 for float64 logits): log_domain_atol, as for logsumexp."""
    gen = torch.Generator().manual_seed(seed)
    x = R.random_logits(gen, tuple(rows) + (vocab,), dtype, scale, mask_frac)
    out = ops.lse_float64(x, temperature)
    assert out.dtype == torch.float64 and out.shape == x.shape[:-1]
    R.assert_within(out, R.logsumexp(x, temperature), R.log_domain_atol(x, temperature), "lse_float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (2, 3, 7), (513,), (4, 1271), (0, 9), (3, 0, 8)])
def test_lse_float64_is_entropy_forwards_lse(device, dtype, shape):
    """Bit for bit the lse entropy_forward returns (what kdext.parallel exchanged
    before lse_float64 existed), on every shape, with masked entries, large
    logits and a temperature."""
    gen = torch.Generator().manual_seed(11)
    x = R.random_logits(gen, shape, dtype, 7.0, 0.3, device) + 2000.0  # masked entries stay -inf
    for temperature in (1.0, 0.37):
        got = ops.lse_float64(x, temperature)
        assert got.dtype == torch.float64 and got.shape == x.shape[:-1] and got.device == x.device
        assert torch.equal(got, ops.entropy_forward(x, temperature)[1])


@pytest.mark.parametrize("shift", [1000.0, 10000.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("vocab", [7, 1271, 128256])
def test_lse_float64_keeps_the_exact_max(shift, temperature, vocab):
    """The float32 state's max is exact and only max + log(sum) is formed in
    float64, so the error does not grow with the logits: a few dozen roundings
    of O(1 + log V), where the float32 logsumexp rounds at ulp(shift / T) / 2.
    (T is a power of two, so x / T is exact.)"""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(3, vocab, generator=gen) * 3 + shift
    want = R.logsumexp(x, temperature)
    bound = 16 * 2.0**-24 * (1 + math.log(vocab))
    R.assert_within(ops.lse_float64(x, temperature), want, bound, f"lse_float64(x + {shift})")
    if shift / temperature >= 2**12:  # a float32 lse rounds by up to ulp / 2 >= 2^-12 there
        float32_error = (kdext.logsumexp(x, temperature).double() - want).abs().max().item()
        assert float32_error > bound, "the float64 output is what makes the difference"


def test_lse_float64_row_contract(device):
    """Masked entries add nothing, a row whose logits are all -inf has lse -inf
    (the row contract: an Empty row), and a NaN or +inf logit poisons its row
    only (not finite, like logsumexp's)."""
    inf = math.inf
    x = torch.tensor([[0.0, 1.0, -inf, 2.0], [-inf, -inf, -inf, -inf], [3.0, -inf, -inf, 1.0],
                      [1.0, math.nan, 0.0, 2.0], [0.5, inf, 0.0, 1.0]], device=device)
    for dtype in DTYPES:
        out = ops.lse_float64(x.to(dtype), 1.3).cpu()
        want = torch.logsumexp(x.to(dtype).double().cpu() / 1.3, -1)
        R.assert_within(out[[0, 2]], want[[0, 2]], 2 * R.log_domain_atol(x[[0, 2]].to(dtype), 1.3))
        assert out[1] == -inf
        assert torch.isnan(out[3]) and not torch.isfinite(out[4])
        assert torch.equal(torch.isfinite(out), torch.isfinite(kdext.logsumexp(x.to(dtype), 1.3).cpu()))


def test_lse_float64_non_contiguous_and_not_differentiable():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 5, 40, generator=gen)
    rows_strided = base[:, 1:4, :]
    last_strided = torch.randn(40, 5, 3, generator=gen).permute(2, 1, 0)
    every_other = torch.randn(4, 81, generator=gen).to(torch.bfloat16)[:, ::2]
    for x in (rows_strided, last_strided, every_other):
        R.assert_within(ops.lse_float64(x, 1.3), R.logsumexp(x, 1.3), R.log_domain_atol(x, 1.3))
        assert torch.equal(ops.lse_float64(x, 1.3), ops.lse_float64(x.contiguous(), 1.3))
    x = torch.randn(2, 9, requires_grad=True)
    assert not ops.lse_float64(x, 1.0).requires_grad
