"""Feature (hidden-state) distillation: the layer map, the loss and its projection's gradients
against float64 autograd, and the CLI end to end (the projection saved beside OUT/final,
resumed bit for bit)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from kdext.train import cli
from kdext.train.hidden import FILE_NAME, HiddenProjection, default_layer_pairs, load_projection, parse_layer_pairs
from kdext.train.options import ConfigError

from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)


def test_layer_pairs():
    assert parse_layer_pairs("1:2, 0:0") == [(1, 2), (0, 0)]
    for bad in ("1-2", "a:b", "1:2:3", "", "1:2,1:2", "-1:2"):
        with pytest.raises(ConfigError, match="--hidden-layers"):
            parse_layer_pairs(bad)
    assert default_layer_pairs(2, 4) == [(1, 2), (2, 4)]
    assert default_layer_pairs(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert default_layer_pairs(1, 2) == [(1, 2)]


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_loss_and_projection_gradients_match_float64(loss):
    torch.manual_seed(0)
    pairs = [(1, 3), (0, 0), (2, 1)]
    proj = HiddenProjection(pairs, 5, 7, loss)
    proj64 = copy.deepcopy(proj).double()
    s = [torch.randn(11, 5, requires_grad=True) for _ in range(3)]
    t = [torch.randn(11, 7) for _ in range(4)]
    s64 = [x.detach().double().requires_grad_(True) for x in s]
    got = proj.loss_sum(s, t)
    ref = 0.0
    for lin, (a, b) in zip(proj64.proj, pairs):
        x, y = lin(s64[a]), t[b].double()
        if loss == "mse":
            ref = ref + ((x - y) ** 2).mean(-1).sum()
        else:
            ref = ref + (1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum()
    ref = ref / len(pairs)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    got.backward()
    ref.backward()
    for a, b in zip(s, s64):
        assert torch.allclose(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    for (n, p), (_, p64) in zip(proj.named_parameters(), proj64.named_parameters()):
        assert torch.allclose(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6), n
    # the teacher's states get no gradient, even when they ask for one
    tg = [x.clone().requires_grad_(True) for x in t]
    proj.loss_sum(s, tg).backward()
    assert all(x.grad is None for x in tg)


def distill(tiny, out, *extra, method="rkl"):
    args = ["distill", "--method", method, "--teacher", tiny["gpt2_teacher"], "--student", tiny["llama_student"],
            "--data", tiny["data"], "--out", str(out), "--batch-size", "4", "--lr", "1e-2", "--max-new-tokens", "5",
            "--no-progress", "--hidden-coef", "0.5", *map(str, extra)]
    return cli.main(args)


def test_cli_smoke_projection_saved_beside_final(tiny, tmp_path):
    assert distill(tiny, tmp_path, "--max-steps", "3", "--hidden-layers", "1:2,0:1", "--hidden-loss", "cosine") == 0
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["loss/hidden"] > 0 for r in recs)
    path = tmp_path / FILE_NAME
    assert path.is_file() and not (tmp_path / "final" / FILE_NAME).exists()
    assert not any("hidden" in f or "proj" in f for f in os.listdir(tmp_path / "final"))
    proj = load_projection(str(path))
    assert proj.pairs == [(1, 2), (0, 1)] and proj.loss == "cosine"
    assert (proj.student_width, proj.teacher_width) == (16, 32)
    # trained: it moved away from its (seeded) initial weights
    state = torch.load(sorted((tmp_path / "checkpoints").iterdir())[-1], weights_only=False)
    saved = state["extras"]["hidden_projection"]
    assert all(torch.equal(saved[k], v) for k, v in proj.state_dict().items())
    from kdext.train.seeds import Stream, stream_seed

    torch.manual_seed(stream_seed(0, Stream.HIDDEN_INIT))
    init = HiddenProjection([(1, 2), (0, 1)], 16, 32, "cosine")
    assert any(not torch.equal(init.state_dict()[k], v) for k, v in proj.state_dict().items())


def test_out_of_range_layers_are_refused(tiny, tmp_path, capsys):
    assert distill(tiny, tmp_path, "--max-steps", "1", "--hidden-layers", "2:1") == cli.EXIT_USAGE
    assert "--hidden-layers: pair 2:1 is out of range" in capsys.readouterr().err
    rc = cli.main(["distill", "--method", "sft", "--student", tiny["llama_student"], "--data", tiny["data"],
                   "--out", str(tmp_path), "--hidden-coef", "1", "--no-progress"])
    assert rc == cli.EXIT_USAGE and "--teacher is required for --hidden-coef" in capsys.readouterr().err


def test_resume_with_projection_is_bit_identical(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--max-steps", "4", "--warmup-steps", "1"]
    assert distill(tiny, a, *common, method="kd") == 0
    assert distill(tiny, b, *common, "--stop-after", "2", method="kd") == 0
    assert distill(tiny, b, *common, "--resume", method="kd") == 0
    assert fixtures.max_param_diff(fixtures.load_state(a / "final"), fixtures.load_state(b / "final")) == 0.0
    pa, pb = load_projection(str(a / FILE_NAME)), load_projection(str(b / FILE_NAME))
    assert all(torch.equal(pa.state_dict()[k], pb.state_dict()[k]) for k in pa.state_dict())
    # a checkpoint with a projection is not resumed without one
    rc = cli.main(["distill", "--method", "kd", "--teacher", tiny["gpt2_teacher"], "--student", tiny["llama_student"],
                   "--data", tiny["data"], "--out", str(b), "--batch-size", "4", "--lr", "1e-2", "--max-steps", "4",
                   "--warmup-steps", "1", "--max-new-tokens", "5", "--no-progress", "--resume"])
    assert rc == cli.EXIT_USAGE
