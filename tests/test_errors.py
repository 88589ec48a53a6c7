"""Every bad input raises RuntimeError / ValueError / TypeError (IndexError for an
out-of-vocabulary token) whose message names the offending argument: for every
public function, for the raw ops, and under fake tensors (what torch.compile
traces with), where the fake kernels must raise the same errors.

A case builds its inputs when it runs, so the same case runs eagerly and
inside FakeTensorMode. Tensors on another device are `meta` tensors: they
provoke a device mismatch on any machine.
"""

import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kdext

ops = torch.ops.kdext
ERRORS = (RuntimeError, ValueError, TypeError)


def L(*shape, dtype=torch.float32, device="cpu"):
    """Logits (or any float tensor) of a shape."""
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


def I(*shape, high=5, dtype=torch.int64, device="cpu"):
    return torch.randint(0, high, shape, dtype=dtype, device=device)


def B(*shape, device="cpu"):
    return torch.ones(shape, dtype=torch.bool, device=device)


class Case:
    def __init__(self, id, fn, exc, words):
        self.id, self.fn, self.exc = id, fn, exc
        self.words = (words,) if isinstance(words, str) else tuple(words)

    def check(self):
        with pytest.raises(self.exc) as info:
            self.fn()
        message = str(info.value)
        for word in self.words:
            assert word in message, f"{self.id}: {type(info.value).__name__}({message!r}) does not name {word!r}"


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

PAIR_FNS = {
    "reverse_kl": lambda s, t, **kw: kdext.reverse_kl(s, t, **kw),
    "forward_kl": lambda s, t, **kw: kdext.forward_kl(s, t, **kw),
    "jsd": lambda s, t, **kw: kdext.jsd(s, t, **kw),
    "skew_forward_kl": lambda s, t, **kw: kdext.skew_forward_kl(s, t, **kw),
    "skew_reverse_kl": lambda s, t, **kw: kdext.skew_reverse_kl(s, t, **kw),
    "tvd": lambda s, t, **kw: kdext.tvd(s, t, **kw),
    "distill_loss": lambda s, t, **kw: kdext.distill_loss(s, t, **kw),
    "distill_loss_none": lambda s, t, **kw: kdext.distill_loss(s, t, reduction="none", **kw),
    "distill_loss_labels": lambda s, t, **kw: kdext.distill_loss(s, t, labels=_labels_for(s), **kw),
}


def _labels_for(s):
    if not isinstance(s, torch.Tensor) or s.dim() == 0:
        return torch.zeros(1, dtype=torch.long)
    return torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)


def pair_cases():
    """(id, make student and teacher, exception, words)."""
    bad_temperature = [(f"temperature={v}", v) for v in (0.0, -1.0, math.nan, math.inf, -math.inf)]
    out = [
        ("vocab_mismatch", lambda: (L(3, 5), L(3, 6)), ValueError, ("student_logits", "teacher_logits", "vocab")),
        ("row_mismatch", lambda: (L(3, 5), L(4, 5)), ValueError, ("student_logits", "teacher_logits")),
        ("row_dims_mismatch", lambda: (L(3, 5), L(1, 3, 5)), ValueError, ("student_logits", "teacher_logits")),
        ("int_student", lambda: (I(3, 5), L(3, 5)), TypeError, "student_logits"),
        ("int_teacher", lambda: (L(3, 5), I(3, 5, dtype=torch.int32)), TypeError, "teacher_logits"),
        ("bool_student", lambda: (B(3, 5), L(3, 5)), TypeError, "student_logits"),
        ("zero_dim", lambda: (L(), L()), ValueError, "student_logits"),
        ("zero_dim_teacher", lambda: (L(5), L()), ValueError, "teacher_logits"),
        ("empty_vocab", lambda: (L(3, 0), L(3, 0)), ValueError, ("student_logits", "vocabulary")),
        ("float64_mixed", lambda: (L(3, 5, dtype=torch.float64), L(3, 5)), TypeError, ("float64", "teacher_logits")),
        ("float64_mixed_t", lambda: (L(3, 5, dtype=torch.bfloat16), L(3, 5, dtype=torch.float64)), TypeError,
         ("float64", "student_logits")),
        ("devices", lambda: (L(3, 5, device="meta"), L(3, 5)), RuntimeError, ("student_logits", "teacher_logits")),
        ("devices_t", lambda: (L(3, 5), L(3, 5, device="meta")), RuntimeError, ("student_logits", "teacher_logits")),
    ]
    cases = []
    for name, fn in PAIR_FNS.items():
        for cid, make, exc, words in out:
            cases.append(Case(f"{name}-{cid}", lambda fn=fn, make=make: fn(*make()), exc, words))
        for cid, v in bad_temperature:
            cases.append(Case(f"{name}-{cid}", lambda fn=fn, v=v: fn(L(3, 5), L(3, 5), temperature=v), ValueError,
                              "temperature"))
        cases.append(Case(f"{name}-temperature_str", lambda fn=fn: fn(L(3, 5), L(3, 5), temperature="1"),
                          (TypeError, RuntimeError), "temperature"))
        cases.append(Case(f"{name}-not_a_tensor", lambda fn=fn: fn([[1.0, 2.0]], L(1, 2)), (TypeError, RuntimeError),
                          "student_logits"))
        # The schema's float would take True as 1.0; every public function refuses a bool.
        cases.append(Case(f"{name}-temperature_bool", lambda fn=fn: fn(L(3, 5), L(3, 5), temperature=True),
                          TypeError, "temperature"))
    for fn_name, pname in (("jsd", "beta"), ("skew_forward_kl", "alpha"), ("skew_reverse_kl", "alpha")):
        fn = PAIR_FNS[fn_name]
        for v in (-0.1, 1.1, math.nan, math.inf):
            cases.append(Case(f"{fn_name}-{pname}={v}", lambda fn=fn, pname=pname, v=v: fn(L(3, 5), L(3, 5), **{pname: v}),
                              ValueError, pname))
        cases.append(Case(f"{fn_name}-{pname}_bool", lambda fn=fn, pname=pname: fn(L(3, 5), L(3, 5), **{pname: False}),
                          TypeError, pname))
    return cases


def distill_loss_cases():
    s, t = (lambda: L(2, 3, 5)), (lambda: L(2, 3, 5))
    dl = kdext.distill_loss
    cases = [
        Case("distill_loss-kind", lambda: dl(s(), t(), kind="kl"), ValueError, ("kind", "kl")),
        Case("distill_loss-kind_none", lambda: dl(s(), t(), kind=None), (ValueError, TypeError), "kind"),
        Case("distill_loss-reduction", lambda: dl(s(), t(), reduction="avg"), ValueError, "reduction"),
        Case("distill_loss-labels_shape", lambda: dl(s(), t(), labels=I(2, 4)), ValueError, "labels"),
        Case("distill_loss-labels_flat", lambda: dl(s(), t(), labels=I(6)), ValueError, "labels"),
        Case("distill_loss-labels_list", lambda: dl(s(), t(), labels=[[0, 1, 2], [0, 1, 2]]), TypeError, "labels"),
        Case("distill_loss-labels_float", lambda: dl(s(), t(), labels=torch.zeros(2, 3)), TypeError, "labels"),
        Case("distill_loss-labels_bool", lambda: dl(s(), t(), labels=B(2, 3)), TypeError, "labels"),
        Case("distill_loss-labels_device", lambda: dl(s(), t(), labels=I(2, 3, device="meta")), RuntimeError, "labels"),
        Case("distill_loss-mask_dtype", lambda: dl(s(), t(), mask=torch.ones(2, 3)), TypeError, "mask"),
        Case("distill_loss-mask_shape", lambda: dl(s(), t(), mask=B(3, 2)), ValueError, "mask"),
        Case("distill_loss-mask_device", lambda: dl(s(), t(), mask=B(2, 3, device="meta")), RuntimeError, "mask"),
        Case("distill_loss-jsd_beta", lambda: dl(s(), t(), kind="jsd", beta=1.5), ValueError, "beta"),
        Case("distill_loss-skew_alpha", lambda: dl(s(), t(), kind="skew_forward_kl", alpha=-0.5), ValueError, "alpha"),
        Case("distill_loss-skew_rev_alpha", lambda: dl(s(), t(), kind="skew_reverse_kl", alpha=math.nan), ValueError,
             "alpha"),
        Case("distill_loss-teacher_grad_unfused_checks", lambda: dl(s(), t().requires_grad_(), kind="tvd",
                                                                     temperature=-2.0), ValueError, "temperature"),
    ]
    return cases


SINGLE_FNS = {
    "softmax": lambda x, **kw: kdext.softmax(x, **kw),
    "log_softmax": lambda x, **kw: kdext.log_softmax(x, **kw),
    "logsumexp": lambda x, **kw: kdext.logsumexp(x, **kw),
    "entropy": lambda x, **kw: kdext.entropy(x, **kw),
    "logprobs": lambda x, **kw: kdext.logprobs(x, _tokens_for(x), **kw),
}


def _tokens_for(x):
    if not isinstance(x, torch.Tensor):
        return torch.zeros(1, dtype=torch.long)
    return torch.zeros(x.shape[:-1] if x.dim() else (), dtype=torch.long, device=x.device)


def single_cases():
    bad = [
        ("int", lambda: I(3, 5), TypeError, "logits"),
        ("int32", lambda: I(3, 5, dtype=torch.int32), TypeError, "logits"),
        ("bool", lambda: B(3, 5), TypeError, "logits"),
        ("complex", lambda: torch.randn(3, 5, dtype=torch.complex64), TypeError, "logits"),
        ("zero_dim", lambda: L(), ValueError, "logits"),
        ("empty_vocab", lambda: L(3, 0), ValueError, ("logits", "vocabulary")),
        ("not_a_tensor", lambda: [1.0, 2.0], (TypeError, RuntimeError), "logits"),
    ]
    cases = []
    for name, fn in SINGLE_FNS.items():
        for cid, make, exc, words in bad:
            cases.append(Case(f"{name}-{cid}", lambda fn=fn, make=make: fn(make()), exc, words))
        for v in (0.0, -0.5, math.nan, math.inf):
            cases.append(Case(f"{name}-temperature={v}", lambda fn=fn, v=v: fn(L(3, 5), temperature=v), ValueError,
                              "temperature"))
        cases.append(Case(f"{name}-temperature_str", lambda fn=fn: fn(L(3, 5), temperature="hot"),
                          (TypeError, RuntimeError), "temperature"))
        cases.append(Case(f"{name}-temperature_bool", lambda fn=fn: fn(L(3, 5), temperature=True), TypeError,
                          "temperature"))
    lp = kdext.logprobs
    cases += [
        Case("logprobs-tokens_float", lambda: lp(L(3, 5), torch.zeros(3)), TypeError, "tokens"),
        Case("logprobs-tokens_int16", lambda: lp(L(3, 5), I(3, dtype=torch.int16)), TypeError, "tokens"),
        Case("logprobs-tokens_bool", lambda: lp(L(3, 5), B(3)), TypeError, "tokens"),
        Case("logprobs-tokens_shape", lambda: lp(L(3, 5), I(4)), ValueError, "tokens"),
        Case("logprobs-tokens_extra_dim", lambda: lp(L(3, 5), I(3, 1)), ValueError, "tokens"),
        Case("logprobs-tokens_device", lambda: lp(L(3, 5), I(3, device="meta")), RuntimeError, ("tokens", "logits")),
        Case("logprobs-logits_device", lambda: lp(L(3, 5, device="meta"), I(3)), RuntimeError, ("tokens", "logits")),
        Case("logprobs-tokens_list", lambda: lp(L(3, 5), [0, 1, 2]), (TypeError, RuntimeError), "tokens"),
    ]
    return cases


def _ids(*shape, dtype=torch.int64, device="cpu"):
    """Distinct teacher ids 0..k-1 in every row of a [..., k] shape."""
    return torch.arange(shape[-1], dtype=dtype, device=device).expand(shape).contiguous()


def sparse_cases():
    """sparse_distill_loss and topk_logprobs (the sparse family)."""
    SL = kdext.sparse_distill_loss
    s, ids, lp = (lambda: L(2, 9)), (lambda: _ids(2, 3)), (lambda: L(2, 3))
    cases = [
        Case("sparse_distill_loss-kind", lambda: SL(s(), ids(), lp(), kind="kl"), ValueError, ("kind", "kl")),
        Case("sparse_distill_loss-tail", lambda: SL(s(), ids(), lp(), tail="drop"), ValueError, "tail"),
        Case("sparse_distill_loss-ids_float", lambda: SL(s(), L(2, 3), lp()), TypeError, "teacher_ids"),
        Case("sparse_distill_loss-ids_int16", lambda: SL(s(), _ids(2, 3, dtype=torch.int16), lp()), TypeError,
             "teacher_ids"),
        Case("sparse_distill_loss-ids_shape", lambda: SL(s(), _ids(3, 3), L(3, 3)), ValueError,
             ("teacher_ids", "[2, k]")),
        Case("sparse_distill_loss-ids_flat", lambda: SL(L(2, 4, 9), _ids(8, 3), L(8, 3)), ValueError, "teacher_ids"),
        Case("sparse_distill_loss-ids_empty", lambda: SL(s(), _ids(2, 0), L(2, 0)), ValueError,
             ("teacher_ids", "no slots")),
        Case("sparse_distill_loss-ids_device", lambda: SL(s(), _ids(2, 3, device="meta"), lp()), RuntimeError,
             ("teacher_ids", "student_logits")),
        Case("sparse_distill_loss-ids_list", lambda: SL(s(), [[0, 1]], lp()), TypeError, "teacher_ids"),
        Case("sparse_distill_loss-logprobs_int", lambda: SL(s(), ids(), _ids(2, 3)), TypeError, "teacher_logprobs"),
        Case("sparse_distill_loss-logprobs_shape", lambda: SL(s(), ids(), L(2, 4)), ValueError,
             ("teacher_logprobs", "teacher_ids")),
        Case("sparse_distill_loss-logprobs_device", lambda: SL(s(), ids(), L(2, 3, device="meta")), RuntimeError,
             "teacher_logprobs"),
        Case("sparse_distill_loss-student_int", lambda: SL(_ids(2, 9), ids(), lp()), TypeError, "student_logits"),
        Case("sparse_distill_loss-student_zero_dim", lambda: SL(L(), _ids(3), L(3)), ValueError, "student_logits"),
        Case("sparse_distill_loss-not_a_tensor", lambda: SL([[1.0, 2.0]], ids(), lp()), TypeError, "student_logits"),
        Case("sparse_distill_loss-beta", lambda: SL(s(), ids(), lp(), kind="jsd", beta=1.5), ValueError, "beta"),
        Case("sparse_distill_loss-beta_bool", lambda: SL(s(), ids(), lp(), kind="jsd", beta=True), TypeError, "beta"),
        Case("sparse_distill_loss-alpha", lambda: SL(s(), ids(), lp(), kind="skew_reverse_kl", alpha=-1.0),
             ValueError, "alpha"),
        Case("sparse_distill_loss-reduction", lambda: SL(s(), ids(), lp(), reduction="avg"), ValueError,
             "reduction"),
        Case("sparse_distill_loss-labels_shape", lambda: SL(s(), ids(), lp(), labels=I(3)), ValueError, "labels"),
        Case("sparse_distill_loss-labels_float", lambda: SL(s(), ids(), lp(), labels=torch.zeros(2)), TypeError,
             "labels"),
        Case("sparse_distill_loss-labels_bool", lambda: SL(s(), ids(), lp(), labels=B(2)), TypeError, "labels"),
        Case("sparse_distill_loss-mask_dtype", lambda: SL(s(), ids(), lp(), mask=torch.ones(2)), TypeError, "mask"),
        Case("sparse_distill_loss-mask_device", lambda: SL(s(), ids(), lp(), mask=B(2, device="meta")),
             RuntimeError, "mask"),
        Case("sparse_distill_loss-weights_shape", lambda: SL(s(), ids(), lp(), weights=torch.ones(3)), ValueError,
             "weights"),
        Case("sparse_distill_loss-weights_int", lambda: SL(s(), ids(), lp(), weights=I(2)), TypeError, "weights"),
        Case("sparse_distill_loss-num_items_zero", lambda: SL(s(), ids(), lp(), num_items=0), ValueError,
             "num_items"),
        Case("sparse_distill_loss-num_items_sum", lambda: SL(s(), ids(), lp(), num_items=4, reduction="sum"),
             ValueError, "num_items"),
        Case("sparse_distill_loss-num_items_str", lambda: SL(s(), ids(), lp(), num_items="4"), TypeError,
             "num_items"),
        Case("sparse_distill_loss-num_items_bool", lambda: SL(s(), ids(), lp(), num_items=True), TypeError,
             "num_items"),
        Case("sparse_distill_loss-num_items_shape", lambda: SL(s(), ids(), lp(), num_items=torch.ones(2)),
             ValueError, "num_items"),
        Case("topk_logprobs-k0", lambda: kdext.topk_logprobs(s(), 0), ValueError, "k"),
        Case("topk_logprobs-k_big", lambda: kdext.topk_logprobs(s(), 10), ValueError, ("k = 10", "9")),
        Case("topk_logprobs-k_float", lambda: kdext.topk_logprobs(s(), 2.0), (TypeError, RuntimeError), "k"),
        Case("topk_logprobs-k_bool", lambda: kdext.topk_logprobs(s(), True), TypeError, "k"),
        Case("topk_logprobs-logits_int", lambda: kdext.topk_logprobs(_ids(2, 9), 2), TypeError, "logits"),
        Case("topk_logprobs-zero_dim", lambda: kdext.topk_logprobs(L(), 1), ValueError, "logits"),
        Case("topk_logprobs-empty_vocab", lambda: kdext.topk_logprobs(L(2, 0), 1), ValueError,
             ("logits", "vocabulary")),
        Case("topk_logprobs-logits_list", lambda: kdext.topk_logprobs([1.0, 2.0], 1), (TypeError, RuntimeError),
             "logits"),
    ]
    fns = {"sparse_distill_loss": lambda **kw: SL(s(), ids(), lp(), **kw),
           "topk_logprobs": lambda **kw: kdext.topk_logprobs(s(), 2, **kw)}
    for name, fn in fns.items():
        for v in (0.0, -1.0, math.nan, math.inf):
            cases.append(Case(f"{name}-temperature={v}", lambda fn=fn, v=v: fn(temperature=v), ValueError,
                              "temperature"))
        cases.append(Case(f"{name}-temperature_str", lambda fn=fn: fn(temperature="1"), (TypeError, RuntimeError),
                          "temperature"))
        cases.append(Case(f"{name}-temperature_bool", lambda fn=fn: fn(temperature=True), TypeError, "temperature"))
    return cases


PUBLIC_CASES = pair_cases() + distill_loss_cases() + single_cases() + sparse_cases()


@pytest.mark.parametrize("case", PUBLIC_CASES, ids=lambda c: c.id)
def test_public_api_error(case):
    case.check()


def test_out_of_vocabulary_token_is_an_index_error():
    with pytest.raises(IndexError, match=r"tokens\[1\] = 5"):
        kdext.logprobs(L(3, 5), torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("op", ["sparse_forward", "sparse_backward", "sparse_loss"])
@pytest.mark.parametrize("bad,exc,words", [
    ((1, 2, 10), IndexError, ("teacher_ids has id 10 at row 1, slot 2", "[0, 10)")),
    ((2, 0, -2), IndexError, ("id -2 at row 2, slot 0",)),
    ((1, 1, 4), ValueError, ("id 4 twice in row 1", "slots 1 and 2")),
])
def test_bad_teacher_ids_raise_on_the_cpu(op, bad, exc, words):
    """An id outside [-1, V) is an IndexError, a repeated one a ValueError, naming row and slots
    (the CUDA kernels make such a row NaN instead: tests/test_sparse.py)."""
    s, lp = L(3, 10), torch.zeros(3, 3)
    ids = torch.tensor([[0, 1, 2], [3, -1, 4], [5, 6, 7]])
    ids[bad[0], bad[1]] = bad[2]
    calls = {"sparse_forward": lambda: ops.sparse_forward(s, ids, lp, "tvd", 0.0, 1.0, "bucket"),
             "sparse_loss": lambda: ops.sparse_loss(s, ids, lp, torch.ones(3), "forward_kl", 0.0, 1.0, "renormalize"),
             "sparse_backward": lambda: ops.sparse_backward(torch.ones(3), s, ids, lp, torch.zeros(3, 3), "jsd", 0.5,
                                                            1.0, "bucket")}
    with pytest.raises(exc) as info:
        calls[op]()
    for word in words:
        assert word in str(info.value), (str(info.value), word)


# Under fake tensors the fake kernels (and the Python checks before them) must
# raise the same error, so a torch.compile user sees the eager message.
FAKE_IDS = [
    "reverse_kl-vocab_mismatch", "forward_kl-row_mismatch", "tvd-int_student", "jsd-beta=1.1",
    "skew_forward_kl-alpha=-0.1", "skew_reverse_kl-temperature=0.0", "reverse_kl-temperature=nan",
    "reverse_kl-float64_mixed", "reverse_kl-devices_t", "jsd-zero_dim", "reverse_kl-empty_vocab",
    "distill_loss-kind", "distill_loss-reduction", "distill_loss-labels_shape", "distill_loss-mask_dtype",
    "distill_loss-labels_device", "distill_loss-vocab_mismatch", "distill_loss_none-temperature=inf",
    "softmax-int", "log_softmax-temperature=-0.5", "logsumexp-zero_dim", "entropy-empty_vocab",
    "entropy-temperature=inf", "logprobs-tokens_float", "logprobs-tokens_shape", "logprobs-tokens_device",
    "logprobs-bool", "sparse_distill_loss-ids_shape", "sparse_distill_loss-ids_float",
    "sparse_distill_loss-logprobs_shape", "sparse_distill_loss-ids_empty", "sparse_distill_loss-tail",
    "sparse_distill_loss-ids_device", "sparse_distill_loss-student_int", "topk_logprobs-k0", "topk_logprobs-k_big",
    "topk_logprobs-empty_vocab", "topk_logprobs-temperature=0.0",
]
_BY_ID = {c.id: c for c in PUBLIC_CASES}


@pytest.mark.parametrize("cid", FAKE_IDS)
def test_same_error_under_fake_tensors(cid):
    check_same_error_under_fake_tensors(_BY_ID[cid])


def check_same_error_under_fake_tensors(case):
    with pytest.raises(case.exc) as eager:
        case.fn()
    with FakeTensorMode():
        with pytest.raises(case.exc) as fake:
            case.fn()
    assert type(fake.value) is type(eager.value)
    for word in case.words:
        assert word in str(fake.value), f"fake: {fake.value!r} does not name {word!r}"
    assert _normalized(fake.value) == _normalized(eager.value), (str(eager.value), str(fake.value))


# C++ prints dtypes by their c10 names and floats without a trailing ".0";
# Python prints torch.int64 and 0.0. Everything else must match word for word.
_C10_NAMES = {"Long": "int64", "Int": "int32", "Short": "int16", "Bool": "bool", "Double": "float64",
              "Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "ComplexFloat": "complex64"}


def _normalized(err):
    text = str(err).replace("torch.", "")
    text = re.sub(r"\b(" + "|".join(_C10_NAMES) + r")\b", lambda m: _C10_NAMES[m.group(1)], text)
    return re.sub(r"(\d)\.0\b", r"\1", text)


# ---------------------------------------------------------------------------
# Raw ops (torch.ops.kdext.*)
# ---------------------------------------------------------------------------


def _fwd(kind="reverse_kl", shape=(3, 5)):
    s, t = L(*shape), L(*shape)
    return s, t, ops.divergence_forward(s, t, kind, 0.0, 1.0)[1]


def raw_cases():
    c = []
    # divergence_forward: the pair checks, its name and parameter
    df = ops.divergence_forward
    c += [
        Case("divergence_forward-vocab", lambda: df(L(3, 5), L(3, 4), "reverse_kl", 0.0, 1.0), ValueError,
             ("student_logits", "teacher_logits")),
        Case("divergence_forward-rows", lambda: df(L(3, 5), L(2, 5), "tvd", 0.0, 1.0), ValueError,
             ("student_logits", "teacher_logits")),
        Case("divergence_forward-int", lambda: df(I(3, 5), L(3, 5), "tvd", 0.0, 1.0), TypeError, "student_logits"),
        Case("divergence_forward-zero_dim", lambda: df(L(), L(), "tvd", 0.0, 1.0), ValueError, "student_logits"),
        Case("divergence_forward-empty_vocab", lambda: df(L(2, 0), L(2, 0), "tvd", 0.0, 1.0), ValueError,
             "student_logits"),
        Case("divergence_forward-f64_mixed", lambda: df(L(3, 5), L(3, 5, dtype=torch.float64), "tvd", 0.0, 1.0),
             TypeError, "float64"),
        Case("divergence_forward-devices", lambda: df(L(3, 5), L(3, 5, device="meta"), "tvd", 0.0, 1.0),
             RuntimeError, ("student_logits", "teacher_logits")),
        Case("divergence_forward-unknown", lambda: df(L(3, 5), L(3, 5), "kl", 0.0, 1.0), ValueError,
             ("divergence", "kl")),
        Case("divergence_forward-beta", lambda: df(L(3, 5), L(3, 5), "jsd", 1.5, 1.0), ValueError, "beta"),
        Case("divergence_forward-alpha", lambda: df(L(3, 5), L(3, 5), "skew_reverse_kl", -0.5, 1.0), ValueError,
             "alpha"),
        Case("divergence_forward-temperature", lambda: df(L(3, 5), L(3, 5), "tvd", 0.0, 0.0), ValueError,
             "temperature"),
        Case("divergence_forward-temperature_nan", lambda: df(L(3, 5), L(3, 5), "tvd", 0.0, math.nan), ValueError,
             "temperature"),
    ]
    db = ops.divergence_backward

    def bwd(grad=None, stats=None, kind="reverse_kl", param=0.0, temperature=1.0, t_shape=None):
        s, t, st = _fwd()
        if t_shape is not None:
            t = L(*t_shape)
        grad = L(3) if grad is None else grad
        return db(grad, s, t, st if stats is None else stats, kind, param, temperature, True, True)

    c += [
        Case("divergence_backward-grad_values_shape", lambda: bwd(grad=L(4)), ValueError, "grad_values"),
        Case("divergence_backward-stats_shape", lambda: bwd(stats=L(3, 3)), ValueError, "stats"),
        Case("divergence_backward-stats_rows", lambda: bwd(stats=L(2, 4)), ValueError, "stats"),
        Case("divergence_backward-vocab", lambda: bwd(t_shape=(3, 6)), ValueError, ("student_logits", "teacher_logits")),
        Case("divergence_backward-unknown", lambda: bwd(kind="kl"), ValueError, "divergence"),
        Case("divergence_backward-beta", lambda: bwd(kind="jsd", param=2.0), ValueError, "beta"),
        Case("divergence_backward-temperature", lambda: bwd(temperature=-1.0), ValueError, "temperature"),
        Case("divergence_backward-grad_values_device", lambda: bwd(grad=L(3, device="meta")), RuntimeError,
             "grad_values"),
        Case("divergence_backward-stats_device", lambda: bwd(stats=L(3, 4, device="meta")), RuntimeError, "stats"),
    ]
    dls = ops.divergence_loss
    c += [
        Case("divergence_loss-row_weights_shape", lambda: dls(L(3, 5), L(3, 5), L(4), "reverse_kl", 0.0, 1.0),
             ValueError, "row_weights"),
        Case("divergence_loss-row_weights_device",
             lambda: dls(L(3, 5), L(3, 5), L(3, device="meta"), "reverse_kl", 0.0, 1.0), RuntimeError, "row_weights"),
        Case("divergence_loss-vocab", lambda: dls(L(3, 5), L(3, 2), L(3), "reverse_kl", 0.0, 1.0), ValueError,
             ("student_logits", "teacher_logits")),
        Case("divergence_loss-int", lambda: dls(L(3, 5), I(3, 5), L(3), "reverse_kl", 0.0, 1.0), TypeError,
             "teacher_logits"),
        Case("divergence_loss-unknown", lambda: dls(L(3, 5), L(3, 5), L(3), "rkl", 0.0, 1.0), ValueError,
             "divergence"),
        Case("divergence_loss-alpha", lambda: dls(L(3, 5), L(3, 5), L(3), "skew_forward_kl", 7.0, 1.0), ValueError,
             "alpha"),
        Case("divergence_loss-temperature", lambda: dls(L(3, 5), L(3, 5), L(3), "tvd", 0.0, math.inf), ValueError,
             "temperature"),
    ]
    dp = ops.divergence_partial
    c += [
        Case("divergence_partial-student_lse_shape", lambda: dp(L(3, 5), L(3, 5), L(4), L(3), "reverse_kl", 0.0, 1.0),
             ValueError, "student_lse"),
        Case("divergence_partial-teacher_lse_shape", lambda: dp(L(3, 5), L(3, 5), L(3), L(2), "reverse_kl", 0.0, 1.0),
             ValueError, "teacher_lse"),
        Case("divergence_partial-student_lse_device",
             lambda: dp(L(3, 5), L(3, 5), L(3, device="meta"), L(3), "reverse_kl", 0.0, 1.0), RuntimeError,
             "student_lse"),
        Case("divergence_partial-teacher_lse_device",
             lambda: dp(L(3, 5), L(3, 5), L(3), L(3, device="meta"), "reverse_kl", 0.0, 1.0), RuntimeError,
             "teacher_lse"),
        Case("divergence_partial-vocab", lambda: dp(L(3, 5), L(3, 6), L(3), L(3), "reverse_kl", 0.0, 1.0), ValueError,
             ("student_logits", "teacher_logits")),
        Case("divergence_partial-unknown", lambda: dp(L(3, 5), L(3, 5), L(3), L(3), "kl", 0.0, 1.0), ValueError,
             "divergence"),
        Case("divergence_partial-beta", lambda: dp(L(3, 5), L(3, 5), L(3), L(3), "jsd", -1.0, 1.0), ValueError,
             "beta"),
        Case("divergence_partial-temperature", lambda: dp(L(3, 5), L(3, 5), L(3), L(3), "tvd", 0.0, 0.0), ValueError,
             "temperature"),
    ]
    c += [
        Case("scale_-factor_shape", lambda: ops.scale_(L(3, 5), L(2)), ValueError, "factor"),
        Case("scale_-factor_device", lambda: ops.scale_(L(3, 5), L(device="meta")), RuntimeError, "factor"),
    ]
    sb = ops.softmax_backward
    c += [
        Case("softmax_backward-shape", lambda: sb(L(3, 4), L(3, 5), 1.0, False), ValueError, "grad_output"),
        Case("softmax_backward-int", lambda: sb(I(3, 5), L(3, 5), 1.0, True), TypeError, "grad_output"),
        Case("softmax_backward-output_int", lambda: sb(L(3, 5), I(3, 5), 1.0, True), TypeError, "output"),
        Case("softmax_backward-temperature", lambda: sb(L(3, 5), L(3, 5), 0.0, False), ValueError, "temperature"),
        Case("softmax_backward-device", lambda: sb(L(3, 5, device="meta"), L(3, 5), 1.0, False), RuntimeError,
             "grad_output"),
    ]
    lf64 = ops.lse_float64
    c += [
        Case("lse_float64-int", lambda: lf64(I(3, 5), 1.0), TypeError, "logits"),
        Case("lse_float64-zero_dim", lambda: lf64(L(), 1.0), ValueError, "logits"),
        Case("lse_float64-empty_vocab", lambda: lf64(L(3, 0), 1.0), ValueError, ("logits", "vocabulary")),
        Case("lse_float64-temperature", lambda: lf64(L(3, 5), 0.0), ValueError, "temperature"),
        Case("lse_float64-temperature_nan", lambda: lf64(L(3, 5), math.nan), ValueError, "temperature"),
    ]
    ef, eb = ops.entropy_forward, ops.entropy_backward
    c += [
        Case("entropy_forward-int", lambda: ef(I(3, 5), 1.0), TypeError, "logits"),
        Case("entropy_forward-temperature", lambda: ef(L(3, 5), -1.0), ValueError, "temperature"),
        Case("entropy_forward-lse_shape", lambda: ef(L(3, 5), 1.0, L(4)), ValueError, "lse"),
        Case("entropy_forward-lse_device", lambda: ef(L(3, 5), 1.0, L(3, device="meta")), RuntimeError, "lse"),
        Case("entropy_backward-grad_shape", lambda: eb(L(4), L(3, 5), L(3), L(3), 1.0), ValueError, "grad"),
        Case("entropy_backward-entropy_shape", lambda: eb(L(3), L(3, 5), L(2), L(3), 1.0), ValueError, "entropy"),
        Case("entropy_backward-lse_shape", lambda: eb(L(3), L(3, 5), L(3), L(1), 1.0), ValueError, "lse"),
        Case("entropy_backward-temperature", lambda: eb(L(3), L(3, 5), L(3), L(3), 0.0), ValueError, "temperature"),
        Case("entropy_backward-int", lambda: eb(L(3), I(3, 5), L(3), L(3), 1.0), TypeError, "logits"),
        Case("entropy_backward-grad_device", lambda: eb(L(3, device="meta"), L(3, 5), L(3), L(3), 1.0), RuntimeError,
             "grad"),
        Case("entropy_backward-lse_device", lambda: eb(L(3), L(3, 5), L(3), L(3, device="meta"), 1.0), RuntimeError,
             "lse"),
    ]
    lf, lb = ops.logprobs_forward, ops.logprobs_backward
    c += [
        Case("logprobs_forward-tokens_dtype", lambda: lf(L(3, 5), L(3), 1.0), TypeError, "tokens"),
        Case("logprobs_forward-tokens_shape", lambda: lf(L(3, 5), I(2), 1.0), ValueError, "tokens"),
        Case("logprobs_forward-temperature", lambda: lf(L(3, 5), I(3), math.nan), ValueError, "temperature"),
        Case("logprobs_forward-logits_int", lambda: lf(I(3, 5), I(3), 1.0), TypeError, "logits"),
        Case("logprobs_forward-tokens_device", lambda: lf(L(3, 5), I(3, device="meta"), 1.0), RuntimeError, "tokens"),
        Case("logprobs_backward-grad_shape", lambda: lb(L(4), L(3, 5), I(3), L(3), 1.0), ValueError, "grad"),
        Case("logprobs_backward-lse_shape", lambda: lb(L(3), L(3, 5), I(3), L(2), 1.0), ValueError, "lse"),
        Case("logprobs_backward-tokens_shape", lambda: lb(L(3), L(3, 5), I(2), L(3), 1.0), ValueError, "tokens"),
        Case("logprobs_backward-tokens_dtype", lambda: lb(L(3), L(3, 5), L(3), L(3), 1.0), TypeError, "tokens"),
        Case("logprobs_backward-logits_int", lambda: lb(L(3), I(3, 5), I(3), L(3), 1.0), TypeError, "logits"),
        Case("logprobs_backward-temperature", lambda: lb(L(3), L(3, 5), I(3), L(3), 0.0), ValueError, "temperature"),
        Case("logprobs_backward-tokens_device", lambda: lb(L(3), L(3, 5), I(3, device="meta"), L(3), 1.0),
             RuntimeError, "tokens"),
        Case("logprobs_backward-grad_device", lambda: lb(L(3, device="meta"), L(3, 5), I(3), L(3), 1.0), RuntimeError,
             "grad"),
        Case("logprobs_backward-lse_device", lambda: lb(L(3), L(3, 5), I(3), L(3, device="meta"), 1.0), RuntimeError,
             "lse"),
    ]
    return c


def sparse_raw_cases():
    """The sparse family's ops: the checks the public functions do not reach (tail and
    divergence names, per-row tensors, stats, k)."""
    sf, sb, sl, tk = ops.sparse_forward, ops.sparse_backward, ops.sparse_loss, ops.topk_logprobs
    s, ids, lp = (lambda: L(2, 9)), (lambda: _ids(2, 3)), (lambda: L(2, 3))
    return [
        Case("sparse_forward-tail", lambda: sf(s(), ids(), lp(), "tvd", 0.0, 1.0, "x"), ValueError, "tail"),
        Case("sparse_forward-divergence", lambda: sf(s(), ids(), lp(), "kl", 0.0, 1.0, "bucket"), ValueError,
             ("divergence", "kl")),
        Case("sparse_forward-beta", lambda: sf(s(), ids(), lp(), "jsd", 1.5, 1.0, "bucket"), ValueError, "beta"),
        Case("sparse_forward-ids_shape", lambda: sf(s(), _ids(2, 2, 3), L(2, 2, 3), "tvd", 0.0, 1.0, "bucket"),
             ValueError, "teacher_ids"),
        Case("sparse_forward-logprobs_shape", lambda: sf(s(), ids(), L(3, 2), "tvd", 0.0, 1.0, "bucket"), ValueError,
             "teacher_logprobs"),
        Case("sparse_forward-temperature", lambda: sf(s(), ids(), lp(), "tvd", 0.0, math.nan, "bucket"), ValueError,
             "temperature"),
        Case("sparse_forward-student_int", lambda: sf(_ids(2, 9), ids(), lp(), "tvd", 0.0, 1.0, "bucket"), TypeError,
             "student_logits"),
        Case("sparse_backward-grad_values_shape", lambda: sb(L(3), s(), ids(), lp(), L(2, 3), "tvd", 0.0, 1.0,
                                                             "bucket"), ValueError, "grad_values"),
        Case("sparse_backward-stats_shape", lambda: sb(L(2), s(), ids(), lp(), L(2, 4), "tvd", 0.0, 1.0, "bucket"),
             ValueError, "stats"),
        Case("sparse_backward-stats_device", lambda: sb(L(2), s(), ids(), lp(), L(2, 3, device="meta"), "tvd", 0.0,
                                                        1.0, "bucket"), RuntimeError, "stats"),
        Case("sparse_backward-grad_values_device", lambda: sb(L(2, device="meta"), s(), ids(), lp(), L(2, 3), "tvd",
                                                              0.0, 1.0, "bucket"), RuntimeError, "grad_values"),
        Case("sparse_backward-tail", lambda: sb(L(2), s(), ids(), lp(), L(2, 3), "tvd", 0.0, 1.0, "all"), ValueError,
             "tail"),
        Case("sparse_loss-row_weights_shape", lambda: sl(s(), ids(), lp(), L(3), "tvd", 0.0, 1.0, "bucket"),
             ValueError, "row_weights"),
        Case("sparse_loss-row_weights_device", lambda: sl(s(), ids(), lp(), L(2, device="meta"), "tvd", 0.0, 1.0,
                                                          "bucket"), RuntimeError, "row_weights"),
        Case("sparse_loss-alpha", lambda: sl(s(), ids(), lp(), L(2), "skew_forward_kl", 2.0, 1.0, "bucket"),
             ValueError, "alpha"),
        Case("sparse_loss-ids_dtype", lambda: sl(s(), L(2, 3), lp(), L(2), "tvd", 0.0, 1.0, "bucket"), TypeError,
             "teacher_ids"),
        Case("topk_logprobs-raw_k", lambda: tk(s(), -3, 1.0), ValueError, "k"),
        Case("topk_logprobs-raw_k_big", lambda: tk(s(), 10, 1.0), ValueError, "k = 10"),
        Case("topk_logprobs-raw_temperature", lambda: tk(s(), 3, 0.0), ValueError, "temperature"),
        Case("topk_logprobs-raw_logits_int", lambda: tk(_ids(2, 9), 3, 1.0), TypeError, "logits"),
    ]


RAW_CASES = raw_cases() + sparse_raw_cases()


@pytest.mark.parametrize("case", RAW_CASES, ids=lambda c: c.id)
def test_raw_op_error(case):
    case.check()


# Raw ops that the Python wrappers do not check first: their fake kernels alone
# must raise the eager words.
RAW_FAKE_IDS = ["lse_float64-int", "lse_float64-empty_vocab", "lse_float64-temperature", "scale_-factor_shape",
                "scale_-factor_device", "sparse_forward-tail", "sparse_forward-divergence", "sparse_forward-ids_shape",
                "sparse_forward-logprobs_shape", "sparse_forward-temperature", "sparse_backward-tail",
                "sparse_loss-alpha", "sparse_loss-ids_dtype", "topk_logprobs-raw_k", "topk_logprobs-raw_k_big",
                "topk_logprobs-raw_temperature"]
_RAW_BY_ID = {c.id: c for c in RAW_CASES}


@pytest.mark.parametrize("cid", RAW_FAKE_IDS)
def test_raw_op_same_error_under_fake_tensors(cid):
    check_same_error_under_fake_tensors(_RAW_BY_ID[cid])


def test_every_op_has_error_cases():
    """Every op of csrc/ops.cpp but top_p_sample (tested with the sampler) is covered above."""
    covered = {c.id.split("-")[0] for c in PUBLIC_CASES + RAW_CASES}
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("kdext::")}
    assert "divergence_forward" in names
    missing = names - covered - {"top_p_sample"}
    assert not missing, f"ops without error tests: {sorted(missing)}"
