"""Tiny Hugging Face models, a tokenizer and data for the trainer tests (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

from kdext.train import task
from kdext.train.data import write_jsonl
from kdext.train.demo import gpt2_config, llama_config, save_new_model, train_tokenizer

VOCAB = 300
# Positions of every tiny model: room for the trainer's default --max-prompt-len 256 +
# --max-response-len 128 (the trainer refuses lengths beyond a model's context).
POSITIONS = 512


def build(root: str) -> dict:
    """Write tokenizer, GPT-2 and Llama models (teacher-sized and student-sized) and data under root."""
    tok = train_tokenizer(task.corpus(), VOCAB, os.path.join(root, "tok"))
    V = len(tok)
    paths = {"root": root, "tok": os.path.join(root, "tok")}
    specs = {
        "gpt2_teacher": gpt2_config(V, hidden=32, layers=2, heads=2, max_pos=POSITIONS),
        "gpt2_student": gpt2_config(V, hidden=16, layers=1, heads=2, max_pos=POSITIONS),
        "llama_teacher": llama_config(V, hidden=32, layers=2, heads=2, ffn=64, max_pos=POSITIONS),
        "llama_student": llama_config(V, hidden=16, layers=1, heads=2, ffn=32, max_pos=POSITIONS),
        # A student whose LM head is padded past the tokenizer (as many checkpoints are).
        "llama_student_padded": llama_config(V + 13, hidden=16, layers=1, heads=2, ffn=32, max_pos=POSITIONS),
        # A model of 128 positions (GPT-2's learned position table fails past it).
        "gpt2_student_short": gpt2_config(V, hidden=16, layers=1, heads=2, max_pos=128),
    }
    for i, (name, cfg) in enumerate(specs.items()):
        paths[name] = os.path.join(root, name)
        save_new_model(cfg, tok, paths[name], seed=100 + i)
    # Dropout on, so a resumed run only matches if the RNG state was restored.
    drop = gpt2_config(V, hidden=16, layers=1, heads=2, max_pos=POSITIONS)
    drop.resid_pdrop = drop.embd_pdrop = drop.attn_pdrop = 0.1
    paths["gpt2_student_dropout"] = os.path.join(root, "gpt2_student_dropout")
    save_new_model(drop, tok, paths["gpt2_student_dropout"], seed=7)
    # A teacher with another tokenizer (different merges, so different ids).
    other = train_tokenizer(task.corpus()[:300], VOCAB - 20, os.path.join(root, "tok_other"))
    paths["gpt2_teacher_other_vocab"] = os.path.join(root, "gpt2_teacher_other_vocab")
    save_new_model(gpt2_config(len(other), hidden=32, layers=2, heads=2, max_pos=POSITIONS), other, paths["gpt2_teacher_other_vocab"], 8)
    train, evals = task.make_task(48, 8, seed=3)
    paths["data"] = os.path.join(root, "train.jsonl")
    paths["eval"] = os.path.join(root, "eval.jsonl")
    write_jsonl(paths["data"], train)
    write_jsonl(paths["eval"], evals)
    # An LM corpus (--lm-data): plain documents, unlike the prompt/response data.
    paths["lm"] = os.path.join(root, "lm.jsonl")
    write_jsonl(paths["lm"], [{"text": f"{r['prompt']} {r['response']} " * (1 + i % 3)} for i, r in enumerate(train)])
    return paths


_CACHE: dict = {}


def get(tmp_path_factory) -> dict:
    """The tiny models, built once per test session."""
    if "paths" not in _CACHE:
        _CACHE["paths"] = build(str(tmp_path_factory.mktemp("tiny")))
    return _CACHE["paths"]


def load_state(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def repo_root() -> str:
    import kdext

    return os.path.dirname(os.path.dirname(os.path.abspath(kdext.__file__)))


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root() + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def one_thread():
    """A fixture body: these models are tiny, so intra-op threads only add synchronisation
    (and, on a busy machine, spinning); run the trainer tests single-threaded, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The two fixtures every trainer test module uses: `from train_fixtures.tiny import single_thread, tiny`.
@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny models and data of this module's tests (built once per session, see get)."""
    return get(tmp_path_factory)
