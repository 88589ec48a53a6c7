"""Nothing lost, nothing silent: the trainer under damaged checkpoints, killed writes, full or
read-only disks, changed settings on resume, bad records, sequences past a model's context and
damaged model files. Each case ends in a resumed run equal to an uninterrupted one, or in a
one-line error that names the file or flag (exit code 1 or 2), never a traceback.

Tests run as root here, and root ignores file permissions: a read-only disk and a full one are
injected through :func:`kdext.train.storage.open_for_write` (the one ``open`` of every write of
the run) or /dev/full (a real ENOSPC); the chmod test runs only as another user (as in CI).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from kdext.train import checkpoint, cli, models, storage
from kdext.train.checkpoint import list_checkpoints, read_checkpoint
from kdext.train.config import TrainConfig
from kdext.train.options import APPLY, INPUT, REFUSE, ConfigError, option, resume_policy
from kdext.train.resume import check_resume

from train_fixtures import tiny as fixtures
from train_fixtures.tiny import single_thread, tiny  # noqa: F401  (fixtures)
from train_fixtures.wrapped_file import WrappedFile


def distill(tiny, out, method="kd", *extra, teacher="gpt2_teacher", student="llama_student", data=None):
    args = ["distill", "--method", method, "--student", tiny[student], "--data", data or tiny["data"],
            "--out", str(out), "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "6", "--no-progress"]
    if teacher:
        args += ["--teacher", tiny[teacher]]
    return cli.main(args + [str(x) for x in extra])


def one_line_error(err: str, *needles: str, lines: int = 1) -> None:
    """A user error: at most ``lines`` lines, no traceback, every needle in it."""
    assert "Traceback" not in err, err
    body = [ln for ln in err.strip().splitlines() if ln.startswith("kdext ")]
    assert body and len(err.strip().splitlines()) <= lines, err
    for n in needles:
        assert n in err, (n, err)


def final_state(out):
    return fixtures.load_state(os.path.join(out, "final"))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


RUN = ["--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "3"]
DISTILLM = ["--sgo", "off"]  # its adaptive schedule needs --eval-data; these tests are about resume


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run that every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    assert distill(tiny, out, "kd", *RUN) == 0
    return final_state(out)


def stopped_run(tiny, out, at=4):
    assert distill(tiny, out, "kd", *RUN, "--stop-after", at) == 0
    return list_checkpoints(str(out))


def same_as(reference, out):
    assert fixtures.max_param_diff(reference, final_state(out)) == 0.0


# ---------------------------------------------------------------------------------------------
# 1-2. Damaged checkpoints are found, skipped and named


def largest_tensor_bytes(path) -> tuple[int, int]:
    """(file offset, length) of the largest tensor's bytes in a checkpoint (a zip of records)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def overwrite_inside_largest_tensor(path):
    offset, size = largest_tensor_bytes(path)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\xff\xff\x7f\x7f" * 4)  # 16 bytes: four float32 3.4e38


def test_overwritten_tensor_bytes_are_caught_and_the_older_checkpoint_used(tiny, tmp_path, reference, capsys):
    ckpts = stopped_run(tiny, tmp_path)
    assert [os.path.basename(p) for p in ckpts] == ["step-00000002.pt", "step-00000004.pt"]
    overwrite_inside_largest_tensor(ckpts[-1])
    capsys.readouterr()
    assert distill(tiny, tmp_path, "kd", *RUN, "--resume") == 0
    err = capsys.readouterr().err
    assert f"skipped the checkpoint {ckpts[-1]}" in err and "does not match its checksum" in err
    assert "resuming from the older step-00000002.pt" in err
    assert os.path.exists(ckpts[-1] + ".damaged")
    same_as(reference, tmp_path)  # steps 3-6 trained again from step 2: the uninterrupted result
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _empty(p):
    open(p, "wb").close()


def _garbage(p):
    n = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                .numpy().tobytes())


@pytest.mark.parametrize("damage, why", [(_truncate, "truncated"), (_empty, "the file is empty"),
                                         (_garbage, "not a checkpoint")])
def test_unreadable_newest_checkpoint_falls_back(tiny, tmp_path, reference, capsys, damage, why):
    ckpts = stopped_run(tiny, tmp_path)
    damage(ckpts[-1])
    capsys.readouterr()
    assert distill(tiny, tmp_path, "kd", *RUN, "--resume") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"skipped the checkpoint {ckpts[-1]}: " in err and why in err
    assert len([ln for ln in err.splitlines() if "skipped" in ln]) == 1
    same_as(reference, tmp_path)


def test_no_checkpoint_verifies_names_each(tiny, tmp_path, capsys):
    ckpts = stopped_run(tiny, tmp_path)
    _truncate(ckpts[0])
    overwrite_inside_largest_tensor(ckpts[1])
    capsys.readouterr()
    assert distill(tiny, tmp_path, "kd", *RUN, "--resume") == cli.EXIT_ERROR
    err = capsys.readouterr().err
    one_line_error(err, "no checkpoint in", f"{ckpts[0]}: cannot be read", f"{ckpts[1]}: tensor ")
    assert list_checkpoints(str(tmp_path)) == ckpts  # nothing renamed when there is nothing to resume from


def test_resume_without_a_checkpoint_says_it_starts_afresh(tiny, tmp_path, capsys):
    assert distill(tiny, tmp_path, "kd", "--max-steps", "1", "--resume") == 0
    assert f"note: --resume: {tmp_path} has no checkpoint yet; starting at step 0" in capsys.readouterr().err


def test_checksums_cover_every_tensor_and_every_value(tiny, tmp_path):
    (path,) = stopped_run(tiny, tmp_path, at=2)
    state = read_checkpoint(path)
    assert state["step"] == 2 and state["settings"]["lr"] == 1e-3 and state["settings"]["method_cfg"]["alpha"] == 0.0

    def resaved(change):
        s = torch.load(path, weights_only=True)
        change(s)
        bad = str(tmp_path / "bad.pt")
        torch.save(s, bad)
        with pytest.raises(checkpoint.CheckpointError) as e:
            read_checkpoint(bad)
        return str(e.value)

    def poke_moment(s):
        exp_avg = s["optimizer"]["state"][0]["exp_avg"]
        exp_avg.view(-1)[0] += 1

    assert "tensor optimizer/state/0/exp_avg does not match its checksum" in resaved(poke_moment)
    assert "settings or structure" in resaved(lambda s: s.update(step=3))
    assert "settings or structure" in resaved(lambda s: s["settings"].update(lr=2e-3))
    assert "no checksums" in resaved(lambda s: s.pop("checksums"))


def test_checksums_of_every_dtype_and_shape():
    state = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.tensor(1.5), "c": torch.zeros(0, 4),
             "d": torch.arange(12.0).reshape(3, 4).t(), "e": [torch.tensor([True, False]), (1, "x", None, 2.5)]}
    c = checkpoint.checksums(state)
    assert set(c["tensors"]) == {"/a", "/b", "/c", "/d", "/e/0"}
    changed = dict(state, a=torch.tensor([1, 1, 1.0078125], dtype=torch.bfloat16))
    assert checkpoint.checksums(changed)["tensors"]["/a"] != c["tensors"]["/a"]
    assert checkpoint.checksums(dict(state, e=[state["e"][0], (1, "x", None, 2.25)]))["values"] != c["values"]
    assert checkpoint.checksums({k: state[k] for k in state})["values"] == c["values"]


def test_checksum_of_unchanged_state_passes(tiny, tmp_path):
    (path,) = stopped_run(tiny, tmp_path, at=2)
    s = torch.load(path, weights_only=True)
    resaved = str(tmp_path / "same.pt")
    torch.save(s, resaved)
    assert read_checkpoint(resaved)["step"] == 2


# ---------------------------------------------------------------------------------------------
# 3. Temporary files of killed writes


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_are_those_of_dead_or_newer_processes(tmp_path):
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import time

        time.sleep(0.2)
        dead = _dead_pid()
        names = {
            f"step-00000004.pt.tmp.{host}.{dead}": "stale",  # its writer was killed
            f"step-00000002.pt.tmp.{dead}": "stale",  # the name before the host was part of it
            f"step-00000006.pt.tmp.{host}.{live.pid}": "kept",  # its writer is alive
            f"step-00000008.pt.tmp.other-host.{dead}": "kept",  # cannot tell from here
            f"final.tmp.{host}.{dead}": "stale",  # a folder
            f"step-00000010.pt.tmp.{host}.{os.getpid()}": "stale",  # this process has not written yet
            "step-00000012.pt": "kept",
            "notes.tmp.txt": "kept",
        }
        for name in names:
            if name.startswith("final"):
                os.makedirs(tmp_path / name / "sub")
            else:
                (tmp_path / name).write_bytes(b"x")
        # A live process that started after the file was last written is a reused PID, not the owner.
        old = tmp_path / f"step-00000014.pt.tmp.{host}.{live.pid}"
        old.write_bytes(b"x")
        os.utime(old, (1_000_000_000, 1_000_000_000))
        names[old.name] = "stale"
        removed = storage.remove_stale(str(tmp_path))
        assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, v in names.items() if v == "stale")
        assert sorted(os.listdir(tmp_path)) == sorted(n for n, v in names.items() if v == "kept")
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("resume", [False, True])
def test_start_and_resume_remove_stale_temporaries(tiny, tmp_path, capsys, resume):
    host, dead = socket.gethostname(), _dead_pid()
    if resume:
        stopped_run(tiny, tmp_path)
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    stale = [ckdir / f"step-00000005.pt.tmp.{host}.{dead}", tmp_path / f"metrics.jsonl.tmp.{host}.{dead}"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    capsys.readouterr()
    assert distill(tiny, tmp_path, "kd", *RUN, *(["--resume"] if resume else [])) == 0
    err = capsys.readouterr().err
    assert "removed 2 temporary file(s) of interrupted writes" in err
    assert not any(p.exists() for p in stale)
    assert not [n for n in os.listdir(ckdir) if ".tmp." in n]


# ---------------------------------------------------------------------------------------------
# 4. A read-only or full disk


def _no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    import kdext.train.step as step

    monkeypatch.setattr(step, "load_model", refuse)


def _failing_open(monkeypatch, err: int, match: str):
    real = storage.open_for_write

    def fake(path, mode="wb"):
        if match in os.path.basename(path):
            raise OSError(err, os.strerror(err), path)
        return real(path, mode)

    monkeypatch.setattr(storage, "open_for_write", fake)


def test_read_only_out_is_refused_before_anything_is_loaded(tiny, tmp_path, monkeypatch, capsys):
    _no_model_loading(monkeypatch)
    _failing_open(monkeypatch, errno.EROFS, ".write-probe")
    assert distill(tiny, tmp_path / "o", "kd", *RUN) == cli.EXIT_ERROR
    one_line_error(capsys.readouterr().err, f"--out {tmp_path / 'o'} is not writable: read-only file system")
    assert os.listdir(tmp_path / "o") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions (the injected EROFS test covers it)")
def test_unwritable_out_folder_is_refused(tiny, tmp_path, monkeypatch, capsys):
    _no_model_loading(monkeypatch)
    out = tmp_path / "o"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert distill(tiny, out, "kd", *RUN) == cli.EXIT_ERROR
        one_line_error(capsys.readouterr().err, "is not writable: permission denied")
    finally:
        out.chmod(0o755)


def _full_disk_for(monkeypatch, match: str):
    """Writes of files whose name contains ``match`` go to /dev/full: a real ENOSPC."""
    real = storage.open_for_write

    def fake(path, mode="wb"):
        if match in os.path.basename(path):
            return open("/dev/full", mode.replace("a", "w"))
        return real(path, mode)

    monkeypatch.setattr(storage, "open_for_write", fake)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, reference, monkeypatch, capsys):
    _full_disk_for(monkeypatch, "step-00000004.pt.tmp.")
    assert distill(tiny, tmp_path, "kd", *RUN) == cli.EXIT_ERROR
    ckdir = tmp_path / "checkpoints"
    one_line_error(capsys.readouterr().err,
                   f"no space left on device writing {ckdir / 'step-00000004.pt'}; "
                   f"the previous checkpoint {ckdir / 'step-00000002.pt'} is intact")
    assert os.listdir(ckdir) == ["step-00000002.pt"]  # no temporary file keeps the disk full
    assert read_checkpoint(str(ckdir / "step-00000002.pt"))["step"] == 2
    monkeypatch.undo()
    assert distill(tiny, tmp_path, "kd", *RUN, "--resume") == 0
    same_as(reference, tmp_path)


class _HalfWrite(WrappedFile):
    """A file whose next write stores half its bytes, then fails with ENOSPC."""

    def write(self, b):
        self.f.write(b[: len(b) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_writing_metrics_leaves_whole_lines(tiny, tmp_path, monkeypatch, capsys):
    real, calls = storage.open_for_write, []

    def fake(path, mode="wb"):
        f = real(path, mode)
        if path.endswith("metrics.jsonl"):
            calls.append(path)
            if len(calls) == 3:
                return _HalfWrite(f)
        return f

    monkeypatch.setattr(storage, "open_for_write", fake)
    assert distill(tiny, tmp_path, "kd", *RUN) == cli.EXIT_ERROR
    one_line_error(capsys.readouterr().err, f"no space left on device writing {tmp_path / 'metrics.jsonl'}; "
                   f"the previous checkpoint {tmp_path / 'checkpoints' / 'step-00000002.pt'} is intact")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]  # step 3's half line was cut off again


def test_full_disk_writing_the_final_model(tiny, tmp_path, reference, monkeypatch, capsys):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def full(self, folder, *a, **k):
        real(self, folder, *a, **k)  # writes, then the disk "fills"
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    assert distill(tiny, tmp_path, "kd", *RUN) == cli.EXIT_ERROR
    one_line_error(capsys.readouterr().err, f"no space left on device writing {tmp_path / 'final'}; "
                   f"the previous checkpoint {tmp_path / 'checkpoints' / 'step-00000006.pt'} is intact")
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n or n == "final"]
    monkeypatch.undo()
    assert distill(tiny, tmp_path, "kd", *RUN, "--resume") == 0  # writes final/ again
    same_as(reference, tmp_path)


def test_a_small_disk_is_warned_about_after_loading(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 10_000)
    assert distill(tiny, tmp_path, "kd", "--max-steps", "1") == 0
    err = capsys.readouterr().err
    assert f"warning: --out {tmp_path} has 10 KB free; this run needs about " in err
    assert "(3 checkpoints of about " in err


def test_eval_checks_its_out_folder_before_loading(tiny, tmp_path, monkeypatch, capsys):
    _no_model_loading(monkeypatch)  # (evaluate_folder imports load_model from models when it runs)
    _failing_open(monkeypatch, errno.EROFS, ".write-probe")
    rc = cli.main(["eval", "--model", tiny["llama_teacher"], "--data", tiny["eval"], "--out", str(tmp_path / "s.json")])
    assert rc == cli.EXIT_ERROR
    one_line_error(capsys.readouterr().err, f"--out {tmp_path} is not writable: read-only file system")


def test_write_errors_in_words():
    for code, words in ((errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system"),
                        (errno.EACCES, "permission denied"), (errno.EDQUOT, "disk quota exceeded")):
        assert str(storage.write_error("o/x", OSError(code, os.strerror(code)))) == f"{words} writing o/x"


# ---------------------------------------------------------------------------------------------
# 5. Settings on resume: the run's meaning is refused, run control applied and said


@pytest.fixture(scope="module")
def stopped_distillm(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("distillm")
    assert distill(tiny, out, "distillm", *RUN, *DISTILLM, "--stop-after", 2) == 0
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change, flag", [
    (["--lr", "2e-3"], "--lr"),
    (["--alpha", "0.3"], "--alpha"),
    (["--teacher", "llama_teacher"], "--teacher"),
    (["--template", "Q: {prompt}\n"], "--template"),
    (["--max-steps", "8"], "--max-steps"),
    (["--seed", "1"], "--seed"),
    (["--batch-size", "2"], "--batch-size"),
])
def test_resume_refuses_a_setting_that_changes_the_run(tiny, tmp_path, stopped_distillm, capsys, change, flag):
    out = _copy(stopped_distillm, tmp_path)
    teacher = "gpt2_teacher"
    if change[0] == "--teacher":
        teacher, change = change[1], []
    capsys.readouterr()
    assert distill(tiny, out, "distillm", *RUN, *DISTILLM, "--resume", *change, teacher=teacher) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    one_line_error(err, f"error: {flag}", "differs from the checkpoint")
    if flag == "--max-steps":
        assert "--schedule cosine depends on it" in err
    if flag == "--teacher":
        assert "is not the content the run was started with" in err


def test_resume_refuses_changed_data_under_the_same_path(tiny, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(tiny["data"], data)
    assert distill(tiny, tmp_path / "o", "kd", *RUN, "--stop-after", 2, data=str(data)) == 0
    with open(data, "a") as f:
        f.write('{"prompt": "one more", "response": "line"}\n')
    capsys.readouterr()
    assert distill(tiny, tmp_path / "o", "kd", *RUN, "--resume", data=str(data)) == cli.EXIT_USAGE
    one_line_error(capsys.readouterr().err, "--data differs from the checkpoint",
                   f"{data} is not the content the run was started with")


def test_resume_accepts_moved_inputs_with_the_same_content(tiny, tmp_path, reference, capsys):
    assert distill(tiny, tmp_path / "o", "kd", *RUN, "--stop-after", 4) == 0
    moved = tmp_path / "moved.jsonl"
    shutil.copy(tiny["data"], moved)
    capsys.readouterr()
    assert distill(tiny, tmp_path / "o", "kd", *RUN, "--resume", data=str(moved)) == 0
    assert f"resume: --data now names {moved} (was {tiny['data']}; same content)" in capsys.readouterr().err
    same_as(reference, tmp_path / "o")


def test_resume_applies_run_control_and_says_so(tiny, tmp_path, reference, capsys):
    assert distill(tiny, tmp_path, "kd", *RUN, "--stop-after", 2) == 0
    capsys.readouterr()
    assert distill(tiny, tmp_path, "kd", *RUN[:-2], "--keep-checkpoints", "5", "--resume", "--eval-every", "2",
                   "--eval-data", tiny["eval"], "--no-bf16") == 0
    err = capsys.readouterr().err
    assert "resume: --eval-every: 2 (was 0)" in err and "resume: --keep-checkpoints: 5 (was 3)" in err
    assert "resume: --no-bf16: given (was not given)" in err
    assert [r["step"] for r in metrics(tmp_path) if "eval/rougeL" in r] == [4, 6]  # applied (6: the end)
    same_as(reference, tmp_path)  # and the run's result did not change


def test_max_steps_may_grow_under_a_constant_schedule(tiny, tmp_path, capsys):
    const = ["--schedule", "constant", "--save-every", "2"]
    assert distill(tiny, tmp_path / "long", "kd", *const, "--max-steps", "6") == 0
    assert distill(tiny, tmp_path / "o", "kd", *const, "--max-steps", "4") == 0
    capsys.readouterr()
    assert distill(tiny, tmp_path / "o", "kd", *const, "--max-steps", "6", "--resume") == 0
    assert "resume: --max-steps: 6 (was 4)" in capsys.readouterr().err
    assert fixtures.max_param_diff(final_state(tmp_path / "long"), final_state(tmp_path / "o")) == 0.0
    assert distill(tiny, tmp_path / "o", "kd", *const, "--max-steps", "3", "--resume") == cli.EXIT_USAGE
    one_line_error(capsys.readouterr().err, "--max-steps", "already at step 6")


def test_every_option_has_a_resume_policy_and_new_ones_are_refused():
    from kdext.train.options import option_fields

    apply = {f.name for f, _, _ in option_fields(TrainConfig) if resume_policy(f) == APPLY}
    assert apply == {"out", "eval_data", "save_every", "keep_checkpoints", "eval_every", "eval_max_examples",
                     "resume", "stop_after", "device", "bf16", "progress", "log_every", "save_final",
                     "collective_timeout", "fsdp_offload_teacher", "fused_linear"}
    assert {f.name for f, _, _ in option_fields(TrainConfig) if resume_policy(f) == INPUT} == {
        "student", "data", "teacher", "teacher_cache"}

    @dataclasses.dataclass
    class Later(TrainConfig):  # an option added by later work, without a resume policy
        fused_head: bool = option(False, help="a later option")

    (f,) = [f for f in dataclasses.fields(Later) if f.name == "fused_head"]
    assert resume_policy(f) == REFUSE
    cfg = Later(method="kd", student="s", data="d", out="o", fused_head=True)
    saved = dataclasses.asdict(TrainConfig(method="kd", student="s", data="d", out="o"))  # before the option
    with pytest.raises(ConfigError, match="--fused-head differs from the checkpoint c.pt"):
        check_resume("c.pt", 2, saved, {}, cfg, cfg.method_cfg, {})
    assert check_resume("c.pt", 2, saved, {}, dataclasses.replace(cfg, fused_head=False), cfg.method_cfg, {}) == []


# ---------------------------------------------------------------------------------------------
# 7. Records: every error names file:line and the field


@pytest.mark.parametrize("line, template, message", [
    (b'{"prompt": null, "response": "b"}\n', None, "field 'prompt' is null"),
    (b'{"instruction": null, "response": "b"}\n', None, "field 'instruction' is null"),
    (b'{"prompt": "a", "response": null}\n', None, "field 'response' is null"),
    (b'{"prompt": "caf\xe9", "response": "b"}\n', None, "field 'prompt' is not UTF-8 text (byte 0xe9"),
    (b'{"prompt": "a", "response": ["ok", "caf\xe9"]}\n', None, "field 'response' is not UTF-8 text"),
    (b'{"prompt": "a", \xe9"response": "b"}\n', None, "the line is not UTF-8 text (byte 0xe9"),
    (b'{"prompt": "", "response": "b"}\n', "{prompt}", "field 'prompt' is empty"),
    (b'{"instruction": "", "context": "", "response": "b"}\n', "{prompt}", "field 'instruction' is empty"),
])
def test_bad_records_name_file_line_and_field(tiny, tmp_path, monkeypatch, capsys, line, template, message):
    _no_model_loading(monkeypatch)  # the data is read before any model
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "x", "response": "y"}\n\n{"instruction": "i", "context": "c", "response": "r"}\n'
                    + line)
    extra = ["--template", template] if template else []
    rc = distill(tiny, tmp_path / "out", "sft", "--max-steps", "1", *extra, teacher=None, student="gpt2_student",
                 data=str(bad))
    assert rc == cli.EXIT_ERROR
    one_line_error(capsys.readouterr().err, f"{bad}:4: ", message)


def test_byte_order_mark_and_null_context_are_fine(tmp_path):
    from kdext.train.data import load_jsonl

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n'
                  b'{"instruction": "i", "context": null, "response": "r"}\n')
    ex = load_jsonl(str(p))
    assert [e.prompt for e in ex] == ["a\n", "i\n"] and ex[1].where == f"{p}:2"


# ---------------------------------------------------------------------------------------------
# 8. Sequences past a model's context


def _long_prompt_data(tmp_path, words=600):
    p = tmp_path / "long.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps({"prompt": "pick one: " + " ".join(["apple"] * words), "response": "apple"}) + "\n")
        f.write(json.dumps({"prompt": "pick one: cat dog", "response": "cat"}) + "\n")
    return str(p)


def test_prompt_past_the_context_is_refused_naming_the_flags(tiny, tmp_path, monkeypatch, capsys):
    data = _long_prompt_data(tmp_path)
    _no_model_loading(monkeypatch)
    rc = distill(tiny, tmp_path / "o", "sft", "--max-steps", "2", teacher=None, student="gpt2_student_short",
                 data=data)
    assert rc == cli.EXIT_USAGE
    one_line_error(capsys.readouterr().err, "--max-prompt-len 256 + --max-response-len 128 = 384 tokens",
                   "128 positions of --student (n_positions in its config.json)")
    monkeypatch.undo()
    # Within the limit, the 600-token prompt keeps its last --max-prompt-len tokens and trains,
    # and a line says so once.
    assert distill(tiny, tmp_path / "o", "sft", "--max-steps", "2", "--max-prompt-len", "96",
                   "--max-response-len", "32", teacher=None, student="gpt2_student_short", data=data) == 0
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and f"note: {data}:1: the prompt has " in err
    assert "more than --max-prompt-len 96; it keeps its last 96" in err


def test_rollouts_past_the_context_are_refused(tiny, tmp_path, capsys):
    rc = distill(tiny, tmp_path, "gkd", "--max-steps", "1", "--max-prompt-len", "64", "--max-response-len", "32",
                 "--max-new-tokens", "100", "--lam", "1", teacher="gpt2_teacher", student="gpt2_student_short")
    assert rc == cli.EXIT_USAGE
    one_line_error(capsys.readouterr().err, "--max-prompt-len 64 + --max-new-tokens 100 = 164 tokens",
                   "128 positions of --student")
    # A method that never samples does not use --max-new-tokens.
    assert distill(tiny, tmp_path / "kd", "kd", "--max-steps", "1", "--max-prompt-len", "64", "--max-response-len",
                   "32", "--max-new-tokens", "100", student="gpt2_student_short") == 0


def test_eval_past_the_context_is_refused(tiny, tmp_path, capsys):
    rc = cli.main(["eval", "--model", tiny["gpt2_student_short"], "--data", tiny["eval"],
                   "--out", str(tmp_path / "s.json")])
    assert rc == cli.EXIT_USAGE
    one_line_error(capsys.readouterr().err, "--max-prompt-len 256 + --max-new-tokens 64 = 320 tokens",
                   "128 positions of --model")


# ---------------------------------------------------------------------------------------------
# 9. Damaged model files


@pytest.mark.parametrize("how, words", [("truncate", "is truncated: its header describes"),
                                        ("header", "is damaged or truncated")])
def test_damaged_teacher_weights_name_the_flag_and_file(tiny, tmp_path, capsys, how, words):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny["gpt2_teacher"], folder)
    weights = folder / "model.safetensors"
    if how == "truncate":
        _truncate(weights)
    else:
        with open(weights, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage")
    args = ["distill", "--method", "kd", "--teacher", str(folder), "--student", tiny["llama_student"],
            "--data", tiny["data"], "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    assert cli.main(args) == cli.EXIT_ERROR
    one_line_error(capsys.readouterr().err, f"--teacher: {weights} {words}")


def test_a_weight_file_safetensors_cannot_read_is_a_model_error(tiny, tmp_path, monkeypatch):
    """Whatever from_pretrained raises for a folder becomes the ModelError naming the flag."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    def broken(*a, **k):
        raise SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(models.ModelError, match=r"--teacher: cannot load a causal LM from .*SafetensorError"):
        models.load_model(tiny["gpt2_teacher"], "--teacher", torch.device("cpu"), trainable=False)


def test_collective_failures_are_told_from_bugs():
    from kdext.train.distributed import collective_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:5")
    assert collective_failure(gloo) == "Connection closed by peer [::1]:5"
    assert collective_failure(torch.distributed.DistBackendError("NCCL watchdog timeout")) == "NCCL watchdog timeout"
    assert collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
