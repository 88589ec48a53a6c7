"""kdext.logprobs (log softmax(x / T)[token]) and its raw ops against float64 references.

Error model as in test_softmax.py: the value x_tok / T - lse is a float32
log-domain quantity (`log_domain_atol`); the gradient g (onehot - q) / T is
formed in float32 (q carries acc as a relative error, the one-hot entry
g (1 - q_tok) / T one float32 rounding of |g| / T) and rounded to the logits' dtype.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdext
import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
VOCABS = [1, 7, 513, 1271]
ops = torch.ops.kdext


def grad_bound(x, tokens, temperature, g, want):
    xr = x.detach().double()
    q = R.log_probs(xr, temperature).exp()
    acc = R.log_domain_atol(x, temperature)
    u = R.unit_roundoff(x.dtype)
    sub = R.underflow_atol(x.dtype)
    ga = g.abs().unsqueeze(-1) / temperature
    onehot = torch.zeros_like(q)
    valid = (tokens >= 0) & (tokens < x.shape[-1])
    onehot.scatter_(-1, tokens.long().clamp(0, x.shape[-1] - 1).unsqueeze(-1), valid.double().unsqueeze(-1))
    return (2 * acc * q + sub + 2 * R.acc_unit(x.dtype) * onehot) * ga + 2 * u * want.abs() + sub


def check_against_reference(x, tokens, temperature, seed=0):
    x = x.detach().requires_grad_()
    out = kdext.logprobs(x, tokens, temperature)
    assert out.shape == x.shape[:-1]
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    xr = x.detach().double().requires_grad_()
    want = R.logprobs(xr, tokens, temperature)
    R.assert_within(out, want.detach(), R.log_domain_atol(x, temperature), "logprobs value")

    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(out.dtype)
    (gx,) = torch.autograd.grad(out, x, upstream)
    (gx_ref,) = torch.autograd.grad(want, xr, upstream.double())
    assert gx.dtype == x.dtype and gx.shape == x.shape
    R.assert_within(gx, gx_ref, grad_bound(x, tokens, temperature, upstream.double(), gx_ref), "logprobs gradient")


def random_tokens(gen, rows, vocab, dtype):
    return torch.randint(0, vocab, rows, generator=gen, dtype=torch.int64).to(dtype)


@given(
    **R.logit_draws(VOCABS), dtype=st.sampled_from(DTYPES), token_dtype=st.sampled_from([torch.int64, torch.int32])
)
def test_matches_float64_reference(seed, rows, vocab, dtype, token_dtype, temperature, scale, mask_frac):
    gen = torch.Generator().manual_seed(seed)
    x = R.random_logits(gen, tuple(rows) + (vocab,), dtype, scale, mask_frac)
    tokens = random_tokens(gen, tuple(rows), vocab, token_dtype)  # masked tokens included: -inf
    check_against_reference(x, tokens, temperature, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama3_vocab(dtype):
    gen = torch.Generator().manual_seed(23)
    x = R.random_logits(gen, (3, 128256), dtype, 3.0, 0.1)
    tokens = torch.tensor([0, 128255, 77777])
    check_against_reference(x, tokens, 0.9)


def test_non_contiguous_and_leading_dims():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 40, generator=gen)[:, 1:4, :]  # leading dims do not collapse
    tok = torch.randint(0, 40, (3, 6), generator=gen)[:, ::2]  # non-contiguous tokens
    assert not x.is_contiguous() and not tok.is_contiguous()
    check_against_reference(x, tok, 1.3)
    y = torch.randn(40, 2, 3, generator=gen, dtype=torch.float64).to(torch.float16).permute(2, 1, 0)
    assert y.stride(-1) != 1
    check_against_reference(y, torch.randint(0, 40, (3, 2), generator=gen, dtype=torch.int32), 0.7)
    # 1-D logits: one row, a 0-dim token, a 0-dim result.
    z = torch.randn(11, generator=gen)
    check_against_reference(z, torch.tensor(4), 1.0)


@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32])
def test_gradcheck_float64(token_dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (3, 2), generator=gen).to(token_dtype)
    assert torch.autograd.gradcheck(lambda a: kdext.logprobs(a, tokens, 1.7), (x,))


def test_empty_rows():
    x = torch.randn(0, 7, requires_grad=True)
    out = kdext.logprobs(x, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert x.grad.shape == (0, 7)


@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([1, 7, 100, 513]),
       temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_probabilities_of_all_tokens_sum_to_one(seed, vocab, temperature):
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(vocab, generator=gen) * 4
    x = row.expand(vocab, vocab)  # zero-stride rows: every token of the same row
    lp = kdext.logprobs(x, torch.arange(vocab), temperature).double()
    acc = R.log_domain_atol(row, temperature)
    assert (lp <= acc).all()
    # each exp(lp_i) has relative error <= acc (1 + acc)
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=2 * acc, rtol=0)
    # and they agree with log_softmax of the same row
    R.assert_within(lp, kdext.log_softmax(row, temperature).double(), 2 * acc, "logprobs vs log_softmax")


# ---------------------------------------------------------------------------
# Token range, masks and the contract
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", [-1, 7, 8, 2**31 - 1, -(2**31)])
def test_out_of_range_token_raises_index_error(bad, token_dtype):
    x = torch.randn(3, 7)
    tokens = torch.tensor([0, bad, 2], dtype=token_dtype)
    with pytest.raises(IndexError, match="tokens"):
        kdext.logprobs(x, tokens)
    with pytest.raises(IndexError, match="tokens"):
        ops.logprobs_forward(x, tokens, 1.0)


def test_masked_token_has_log_probability_minus_inf():
    inf = math.inf
    x = torch.tensor([[0.0, 1.0, -inf, 2.0], [-inf, 3.0, -inf, -inf]], requires_grad=True)
    tokens = torch.tensor([2, 0])
    out = kdext.logprobs(x, tokens, 0.8)
    assert (out == -inf).all()
    # The derivative of x_tok / T - lse is still finite: (onehot - q) / T.
    out.sum().backward()
    xr = x.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(R.logprobs(xr, tokens, 0.8).sum(), xr)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), g_ref, atol=1e-6, rtol=1e-6)


def test_all_masked_row_is_nan_with_zero_gradient():
    inf = math.inf
    x = torch.tensor([[0.0, 1.0, 2.0], [-inf, -inf, -inf], [1.0, -inf, 0.0]], requires_grad=True)
    out = kdext.logprobs(x, torch.tensor([1, 1, 2]), 1.2)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    out.sum().backward()  # the NaN row's upstream is 1
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()


def test_nan_poisons_only_its_row():
    x = torch.randn(3, 2, 17)
    x[1, 0, 4] = math.nan
    x.requires_grad_()
    out = kdext.logprobs(x, torch.tensor([[4, 4], [0, 4], [4, 16]]), 0.9)
    assert torch.isnan(out[1, 0])
    assert torch.isfinite(out[[0, 2]]).all() and torch.isfinite(out[1, 1])
    out.sum().backward()
    assert torch.isnan(x.grad[1, 0]).all()
    assert torch.isfinite(x.grad[[0, 2]]).all() and torch.isfinite(x.grad[1, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32])
def test_backward_with_foreign_tokens_adds_no_one_hot(dtype, token_dtype):
    """logprobs_backward on a vocab shard: a token outside [0, V) belongs to
    another shard, so the local gradient is only -g q / T."""
    gen = torch.Generator().manual_seed(13)
    vocab, temperature = 300, 1.4
    x = (torch.randn(6, vocab, generator=gen) * 3).to(dtype)
    lo, hi = torch.iinfo(token_dtype).min, torch.iinfo(token_dtype).max
    tokens = torch.tensor([-1, vocab, vocab + 12345, hi, lo, 5], dtype=token_dtype)
    lse = kdext.logsumexp(x, temperature)
    g = torch.randn(6, generator=gen).to(lse.dtype)
    grad = ops.logprobs_backward(g, x, tokens, lse, temperature)
    assert grad.dtype == dtype and grad.shape == x.shape
    q = R.log_probs(x, temperature).exp()
    want = -g.double().unsqueeze(-1) * q / temperature
    want[5, 5] += g[5].double() / temperature  # the one local token
    R.assert_within(grad, want, grad_bound(x, tokens, temperature, g.double(), want), "logprobs_backward")


def test_backward_matches_forward_lse():
    """logprobs_forward's lse is the row's logsumexp (the saved statistic)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 257, generator=gen)
    lp, lse = ops.logprobs_forward(x, torch.randint(0, 257, (4, 3), generator=gen), 0.6)
    assert lse.shape == (4, 3) and lse.dtype == torch.float32
    R.assert_within(lse, R.logsumexp(x, 0.6), R.log_domain_atol(x, 0.6), "lse")
