"""The trainer's fused LM-head losses (kdext/train/heads.py) against its logits path (--no-fused-linear).

By default every vocabulary-wide term of a loss is computed from the models' final hidden states
and LM heads by kdext.fused_linear_logprobs / kdext.fused_linear_distill_loss; --no-fused-linear
computes the same terms from [N, V] logits rows with kdext.logprobs / distill_loss / entropy.
Both are fp32 and form the same logits up to the summation order of their GEMMs (the model's
``F.linear`` over [B, T, H] against the fused op's chunk GEMMs over [c, H]): each logit differs
by at most a few units of fp32 rounding times H, so losses and gradients agree to ~1e-6 relative
(measured: losses bit for bit, gradients within 1.2e-6 of each tensor's largest entry); the
tests assert 1e-5. The float64 checks of every method (tests/test_train_losses.py) run on the
fused path, the default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdext.train import cli, heads
from kdext.train import methods as M
from kdext.train.config import TrainConfig
from kdext.train.models import ModelError, unwrap
from kdext.train.step import build

from train_fixtures import ref64 as R
from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread  # noqa: F401  (fixture)

GRAD_REL = 1e-5  # per tensor, relative to its largest entry (fp32 GEMM order; see the module doc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shared tiny models, plus a Llama student whose head is not tied to its embeddings."""
    paths = dict(fixtures.get(tmp_path_factory))
    from kdext.train.demo import llama_config, save_new_model
    from kdext.train.models import load_tokenizer

    tok = load_tokenizer(paths["llama_student"])
    cfg = llama_config(len(tok), hidden=16, layers=1, heads=2, ffn=32, max_pos=fixtures.POSITIONS)
    cfg.tie_word_embeddings = False  # the head's gradient apart from the embeddings'
    paths["llama_untied"] = str(tmp_path_factory.mktemp("untied") / "llama_untied")
    save_new_model(cfg, tok, paths["llama_untied"], seed=12)
    return paths


def make_setup(tiny, method, student, fused, **mkw):
    mcfg = M.MethodConfig(temperature=1.3, max_new_tokens=6, **mkw)
    cfg = TrainConfig(method=method, teacher=tiny["gpt2_teacher"], student=tiny[student], data=tiny["data"],
                      out=tiny["root"] + "/unused", batch_size=5, seed=1, method_cfg=mcfg, progress=False,
                      fused_linear=fused)
    return build(cfg)


def loss_and_grads(tiny, method, student, fused, **mkw):
    s = make_setup(tiny, method, student, fused, **mkw)
    prep = s.method.prepare_step(s.ctx, 0)[0]  # MiniLLM: rollouts, rewards and advantages
    rows = M.student_rows(s.ctx, prep.batch)
    assert rows.fused == fused and (rows.logits is None) == fused  # the path asked for really ran
    loss, terms, grads = R.kdext_loss_and_grads(s, prep)
    return loss, {k: float(v.detach()) for k, v in terms.items()}, grads, prep


CASES = [
    ("kd", "gpt2_student", {"lm_coef": 0.5, "kd_ratio": 0.3}),  # + CE and H(p, q) (entropy) at T = 1
    ("kd", "llama_student", {"lm_coef": 0.5, "kd_ratio": 0.3}),
    ("kd", "llama_untied", {}),
    ("rkl", "gpt2_student", {}),
    ("rkl", "llama_student", {}),
    ("minillm", "gpt2_student", {}),
    ("minillm", "llama_student", {}),
    ("gkd", "llama_student", {"lam": 1.0, "beta": 0.3}),
    ("sft", "gpt2_student", {}),
]


@pytest.mark.parametrize("method, student, mkw", CASES)
def test_fused_loss_and_gradients_equal_the_logits_path(tiny, method, student, mkw):
    lf, tf, gf, pf = loss_and_grads(tiny, method, student, True, **mkw)
    ll, tl, gl, pl = loss_and_grads(tiny, method, student, False, **mkw)
    assert torch.equal(pf.batch.response_ids, pl.batch.response_ids)  # the same rows (rollouts too)
    if method == "minillm":  # old log-probs, rewards, advantages: from the fused log-probs vs the logits'
        for k in ("old_logprob", "advantage", "weight"):
            a, b = pf.batch.extras[k].double(), pl.batch.extras[k].double()
            assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max()), k
    assert tf.keys() == tl.keys()
    for k in tl:
        assert abs(tf[k] - tl[k]) <= 1e-5 * (1 + abs(tl[k])), (k, tf[k], tl[k])
    assert abs(float(lf - ll)) <= 1e-5 * abs(float(ll)), (float(lf), float(ll))
    assert gf.keys() == gl.keys()
    for k in gl:
        scale = float(gl[k].abs().max())
        assert scale > 0, k
        assert float((gf[k] - gl[k]).abs().max()) <= GRAD_REL * scale, (k, float((gf[k] - gl[k]).abs().max()), scale)


def _distill(tiny, out, method, *extra):
    flags = ["--max-new-tokens", "5", "--ppo-epochs", "2"] if method == "minillm" else []
    return cli.main(["distill", "--method", method, "--teacher", tiny["gpt2_teacher"], "--student",
                     tiny["llama_student"], "--data", tiny["data"], "--out", str(out), "--lr", "1e-3",
                     "--batch-size", "4", "--max-steps", "3", "--save-every", "0", "--no-progress", *flags, *extra])


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("method", ["kd", "rkl", "minillm"])
def test_the_final_student_equals_the_logits_paths(tiny, tmp_path, method):
    """Three AdamW steps (MiniLLM: its rollouts, two PPO epochs): the same final student within
    1e-4 relative per tensor (Adam divides each gradient by its own running size, so the 1e-6
    gradient differences stay of that relative order)."""
    assert _distill(tiny, tmp_path / "fused", method) == 0
    assert _distill(tiny, tmp_path / "logits", method, "--no-fused-linear") == 0
    a, b = fixtures.load_state(str(tmp_path / "fused" / "final")), fixtures.load_state(str(tmp_path / "logits" / "final"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in a)
    assert worst <= 1e-4, worst
    for (x, gx), (y, gy) in zip(_losses(tmp_path / "fused"), _losses(tmp_path / "logits")):
        assert abs(x - y) <= 1e-5 * (1 + abs(y)) and abs(gx - gy) <= 1e-5 * (1 + abs(gy))


# ---------------------------------------------------------------------------------------------
# Logit transforms read from the config, and the check that the fused form is the model's


def _tiny_model(kind):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                  eos_token_id=1)
    if kind == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.25, **common)), (0.25, None)
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=3.0, **common)), (1 / 3.0, None)
    if kind == "gemma2":
        cfg = tf.Gemma2Config(final_logit_softcapping=2.0, head_dim=8, **common)
        return tf.Gemma2ForCausalLM(cfg), (1.0, 2.0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["cohere", "granite", "gemma2"])
def test_config_logit_transforms_reproduce_the_models_logits(kind):
    """Cohere's logit_scale, Granite's logits_scaling, Gemma 2's final_logit_softcapping: the head
    the fused ops get, and the fused log-probs, entropy and divergence against the model's own
    logits through the logits path."""
    torch.manual_seed(0)
    model, want = _tiny_model(kind)
    model.eval()
    scale, cap = heads.logit_transform(model.config)
    assert scale == pytest.approx(want[0]) and cap == want[1]
    V = model.config.vocab_size
    heads.check_head(model, V, torch.device("cpu"), "--student")
    ids = torch.randint(2, V, (2, 7))
    from kdext.train.models import final_hidden

    with torch.no_grad():
        h, _ = final_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = model(input_ids=ids).logits
    fused = heads.Rows(hidden=h.reshape(-1, h.shape[-1]), head=heads.lm_head(model, V))
    plain = heads.Rows(logits=logits.reshape(-1, V))
    y = torch.randint(0, V, (14,))
    torch.testing.assert_close(heads.logprobs(fused, y, 1.3), heads.logprobs(plain, y, 1.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads.entropy_sum(fused, 0.7), heads.entropy_sum(plain, 0.7), rtol=1e-5, atol=1e-5)
    other = heads.Rows(hidden=fused.hidden.flip(0), head=fused.head)
    other_plain = heads.Rows(logits=plain.logits.flip(0))
    torch.testing.assert_close(heads.divergence_sum(fused, other, "jsd", 1.3),
                               heads.divergence_sum(plain, other_plain, "jsd", 1.3), rtol=1e-5, atol=1e-6)


def test_a_model_whose_logits_the_fused_form_misses_is_refused(tiny):
    """A config that claims a logit scale its model does not apply (GPT-2 ignores logit_scale):
    the check at start-up refuses the model, naming the flag and --no-fused-linear."""
    from kdext.train.models import load_model

    model = load_model(tiny["gpt2_student"], "--student", torch.device("cpu"), trainable=True)
    n = model.config.vocab_size
    heads.check_head(model, n, torch.device("cpu"), "--student")  # as it is: accepted
    model.config.logit_scale = 2.0
    with pytest.raises(ModelError, match=r"--student: the fused LM-head losses cannot reproduce.*--no-fused-linear"):
        heads.check_head(model, n, torch.device("cpu"), "--student")


def test_the_head_covers_the_tokenizers_ids_only(tiny):
    """A head padded past the tokenizer: the fused ops see its first len(tokenizer) rows, the
    ids VocabAligner does not set to -inf."""
    s = make_setup(tiny, "kd", "llama_student_padded", True)
    head = heads.lm_head(s.student, s.ctx.aligner.n_tokens)
    assert head.weight.shape[0] == len(s.tokenizer) == unwrap(s.student).get_output_embeddings().weight.shape[0] - 13


# ---------------------------------------------------------------------------------------------
# Memory: no [N, V] tensor in the loss step

_MEMORY_SCRIPT = r"""
import json, sys, torch
from kdext.train import methods as M
from kdext.train.config import TrainConfig
from kdext.train.step import build
torch.set_num_threads(1)
teacher, student, data, batch, fused = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
cfg = TrainConfig(method="kd", teacher=teacher, student=student, data=data, out=sys.argv[6],
                  batch_size=batch, seed=1, method_cfg=M.MethodConfig(lm_coef=0.5), progress=False,
                  fused_linear=fused)
s = build(cfg)
prep = s.method.prepare_step(s.ctx, 0)[0]
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024
def step():
    s.student.zero_grad(set_to_none=False)
    s.method.combine(s.ctx.cfg, s.method.terms(s.ctx, prep), prep.counts).backward()
step()  # warm up: gradients exist, kernels loaded
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS")
step()
print(json.dumps({"peak": rss("VmHWM") - base, "rows": int(prep.batch.response_mask.sum()), "V": len(s.tokenizer)}))
"""


@pytest.fixture(scope="module")
def wide_vocab(tiny, tmp_path_factory):
    """The tiny tokenizer with 32000 added tokens, and a GPT-2 teacher and Llama student over
    them: a vocabulary 1000-2000 times the models' widths, so [N, V] buffers dominate the step."""
    from kdext.train.demo import gpt2_config, llama_config, save_new_model
    from kdext.train.models import load_tokenizer

    tok = load_tokenizer(tiny["llama_student"])
    tok.add_tokens([f"<extra{i}>" for i in range(32000)])
    root = tmp_path_factory.mktemp("wide")
    paths = {"teacher": str(root / "teacher"), "student": str(root / "student"), "root": str(root)}
    save_new_model(gpt2_config(len(tok), hidden=32, layers=1, heads=2, max_pos=fixtures.POSITIONS), tok,
                   paths["teacher"], seed=1)
    save_new_model(llama_config(len(tok), hidden=16, layers=1, heads=2, ffn=32, max_pos=fixtures.POSITIONS), tok,
                   paths["student"], seed=2)
    return paths


def _loss_step_peak(tiny, wide, batch, fused):
    out_dir = os.path.join(wide["root"], "unused")
    # The buffer pool off and a fixed malloc threshold: every buffer over 64 KiB is its own
    # mapping, returned to the OS when freed, so the resident peak is the allocation peak.
    env = dict(fixtures.subprocess_env(), KDEXT_CPU_POOL_MB="0", KDEXT_FUSED_LINEAR_MB="1",
               MALLOC_MMAP_THRESHOLD_="65536")
    args = [wide["teacher"], wide["student"], tiny["data"], str(batch), "1" if fused else "0", out_dir]
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_loss_step_does_not_allocate_rows_times_vocab(tiny, wide_vocab):
    """Peak resident memory of one kd + CE loss step (forward and backward, gradients already
    allocated) in a fresh process, at two batch sizes: on the fused path it grows with the
    activations only, far less than one [N, V] fp32 buffer; on the logits path by several
    [N, V] buffers (the student's and teacher's logits and their gradient). Measured (V = 32300,
    1 MB chunk budget): fused 4.9 MB at N = 37 and 7.0 MB at N = 220; logits 13.6 MB and 83.6 MB,
    where one [220, V] fp32 buffer is 28.4 MB."""
    small_f, large_f = _loss_step_peak(tiny, wide_vocab, 8, True), _loss_step_peak(tiny, wide_vocab, 48, True)
    small_l, large_l = _loss_step_peak(tiny, wide_vocab, 8, False), _loss_step_peak(tiny, wide_vocab, 48, False)
    assert (small_f["rows"], large_f["rows"]) == (small_l["rows"], large_l["rows"])
    one_nv = large_f["rows"] * large_f["V"] * 4  # one [N, V] fp32 buffer at the larger batch
    grow_nv = (large_f["rows"] - small_f["rows"]) * large_f["V"] * 4
    msg = {k: (v["rows"], v["peak"] / 2**20) for k, v in {"fused8": small_f, "fused48": large_f, "logits8": small_l,
                                             "logits48": large_l}.items()} | {"one_nv_MB": one_nv / 2**20}
    assert large_f["peak"] < one_nv / 2, msg
    assert large_f["peak"] - small_f["peak"] < grow_nv / 4, msg
    assert large_l["peak"] - small_l["peak"] > 2 * grow_nv, msg  # the measurement sees [N, V] buffers


# ---------------------------------------------------------------------------------------------
# --fsdp: each LM head gathered once per model forward, not per chunk or per fused call
# (two processes against one: tests/test_train_fsdp.py, which runs the fused path by default)


def test_sharded_heads_are_gathered_once_per_forward(tiny, monkeypatch):
    """One sharded process (a mesh of one, the code path of many), kd + the LM term with
    kd_ratio (three fused calls per micro-batch on the teacher's head) over two micro-batches:
    the teacher's head (a DTensor after its forward, since the teacher
    reshards) is all-gathered twice, once per micro-batch; the student's is never gathered by
    the loss (its unit stays unsharded from forward to backward; FSDP reduce-scatters its
    gradient), and the step's loss and gradients equal the unsharded run's."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    gathered = []
    full_tensor = DTensor.full_tensor

    def counting(self, *a, **k):
        gathered.append(tuple(self.shape))
        return full_tensor(self, *a, **k)

    def run(fsdp):
        mcfg = M.MethodConfig(lm_coef=0.5, kd_ratio=0.5)
        cfg = TrainConfig(method="kd", teacher=tiny["gpt2_teacher"], student=tiny["llama_untied"], data=tiny["data"],
                          out=tiny["root"] + "/unused", batch_size=4, grad_accum=2, seed=1, method_cfg=mcfg,
                          progress=False, fsdp=fsdp)
        s = build(cfg)
        try:
            preps = s.method.prepare_step(s.ctx, 0)
            counts = {k: sum(p.counts[k] for p in preps) for k in preps[0].counts}
            gathered.clear()
            total = 0.0
            for p in preps:
                loss = s.method.combine(s.ctx.cfg, s.method.terms(s.ctx, p), counts)
                loss.backward()
                total += float(loss.detach())
            seen = list(gathered)
            grads = {n: (p.grad.full_tensor() if fsdp else p.grad).detach().clone()
                     for n, p in unwrap(s.student).named_parameters()}
            return total, grads, seen, s
        finally:
            if fsdp:
                dist.destroy_process_group()

    plain_loss, plain_grads, _, _ = run(False)
    monkeypatch.setattr(DTensor, "full_tensor", counting)
    loss, grads, seen, s = run(True)
    teacher_head = tuple(unwrap(s.teacher).get_output_embeddings().weight.shape)
    student_head = tuple(unwrap(s.student).get_output_embeddings().weight.shape)
    assert teacher_head != student_head  # widths 32 and 16
    assert seen.count(teacher_head) == 2, seen
    assert student_head not in seen, seen
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for n, g in plain_grads.items():
        assert float((grads[n] - g).abs().max()) <= 1e-6 * float(g.abs().max()), n
