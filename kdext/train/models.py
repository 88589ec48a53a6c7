"""Loading Hugging Face models and tokenizers from local folders, and the vocabulary contract.

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``
and the Hub is switched to offline mode before transformers is imported by the CLI.

Teacher and student must share a vocabulary (same token -> id map). Their LM heads may still be
of different widths because checkpoints often pad the embedding matrix (to a multiple of 64,
say). Ids at or beyond the tokenizer's size are not tokens: :class:`VocabAligner` gives both
sides the same width and sets those ids' logits to -inf, so they carry no probability.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

# Loading a few small checkpoints should not print progress bars.
transformers.utils.logging.disable_progress_bar()

from .data import Batch  # noqa: E402


class ModelError(ValueError):
    """A model or tokenizer folder that cannot be used; the message names the argument."""


class VocabMismatchError(ModelError):
    pass


def _check_dir(path: str, arg: str) -> None:
    if not path:
        raise ModelError(f"{arg}: no model folder given")
    if not os.path.isdir(path):
        raise ModelError(f"{arg}: {path!r} is not a folder (models are loaded from local folders only)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{arg}: {path!r} has no config.json; expected a save_pretrained() folder")


def _load_errors() -> tuple:
    """What ``from_pretrained`` raises for a folder it cannot use (a truncated safetensors file,
    an unpicklable .bin, a broken tokenizer.json, ...), as opposed to a bug."""
    from safetensors import SafetensorError

    # RuntimeError: torch.load of a damaged pytorch_model.bin ("PytorchStreamReader failed ...").
    return (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_tokenizer(path: str, arg: str = "--student"):
    """AutoTokenizer from a local folder; a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ModelError(f"{arg}: {path!r} is not a folder")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except _load_errors() as e:
        raise ModelError(f"{arg}: cannot load a tokenizer from {path!r}: {_one_line(e)}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{arg}: the tokenizer in {path!r} has no EOS token; generation could never stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def check_weight_files(path: str, arg: str) -> None:
    """Each ``*.safetensors`` file of the folder must hold what its header describes: a truncated
    copy is named here, not by a SafetensorError from deep inside from_pretrained."""
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        with open(full, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                header = None
        if header is None:
            raise ModelError(f"{arg}: {full} is damaged or truncated ({size} bytes; its header cannot be read); "
                             "copy or save the model again")
        if 8 + n + end > size:
            raise ModelError(f"{arg}: {full} is truncated: its header describes {8 + n + end} bytes, the file has "
                             f"{size}; copy or save the model again")


def load_model(path: str, arg: str, device: torch.device, trainable: bool, dtype: torch.dtype = torch.float32):
    """AutoModelForCausalLM in ``dtype`` (float32) on ``device``. Frozen models are put in eval mode."""
    from transformers import AutoModelForCausalLM

    _check_dir(path, arg)
    check_weight_files(path, arg)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except _load_errors() as e:
        raise ModelError(f"{arg}: cannot load a causal LM from {path!r}: {_one_line(e)}") from None
    model.to(device)
    if trainable:
        model.train()
    else:
        # The teacher: eval mode (no dropout) and no gradients, ever.
        model.eval()
        model.requires_grad_(False)
    return model


# Config keys that bound the positions a model can take (learned position tables index with
# them: GPT-2 fails with an IndexError beyond n_positions); the first one present is used.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def context_limit(path: str, arg: str) -> tuple[Optional[int], Optional[str]]:
    """(positions, the config.json key it comes from) of the model folder; (None, None) when its
    config gives none. Reads config.json only."""
    from transformers import AutoConfig

    _check_dir(path, arg)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except _load_errors() as e:
        raise ModelError(f"{arg}: cannot read {os.path.join(path, 'config.json')}: {_one_line(e)}") from None
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key], key
    return None, None


def check_context(models: list[tuple[str, str]], needs: list[tuple[str, int]]) -> None:
    """Refuse (ConfigError naming the flags and the limit) sequence lengths a model cannot take.

    ``models``: (flag, folder); ``needs``: (what makes the length, e.g. "--max-prompt-len 256 +
    --max-response-len 128", the length)."""
    from .options import ConfigError

    for flag, path in models:
        limit, key = context_limit(path, flag)
        if limit is None:
            continue
        for what, n in needs:
            if n > limit:
                raise ConfigError(
                    f"{what} = {n} tokens, more than the {limit} positions of {flag} ({key} in its config.json); "
                    "lower them so that the sum is at most " + str(limit)
                )


def head_width(model) -> int:
    """Number of logits the model produces per position (its LM head rows, padding included)."""
    return model.get_output_embeddings().weight.shape[0]


def check_vocab(student_tok, teacher_tok) -> None:
    """Raise VocabMismatchError unless both tokenizers map the same tokens to the same ids."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    s_inv = {i: t for t, i in sv.items()}
    t_inv = {i: t for t, i in tv.items()}
    for i in range(max(len(s_inv), len(t_inv))):
        if s_inv.get(i) != t_inv.get(i):
            raise VocabMismatchError(
                f"--teacher and --student tokenizers differ ({len(tv)} vs {len(sv)} tokens; first difference at "
                f"id {i}: teacher {t_inv.get(i)!r}, student {s_inv.get(i)!r}). Token-level distillation "
                "needs a shared vocabulary; use a student built on the teacher's tokenizer."
            )
    raise VocabMismatchError("--teacher and --student tokenizers differ")


class VocabAligner:
    """Brings logits of (possibly differently padded) LM heads onto one vocabulary.

    ``n_tokens`` is the tokenizer's size; ``width`` the common logits width (the widest head).
    A narrower head is padded with -inf columns and every id >= n_tokens is set to -inf, so
    the extra ids have probability exactly zero for sampling, divergences and log-probs alike.
    When both heads are exactly ``n_tokens`` wide this is the identity (no copy).
    """

    def __init__(self, n_tokens: int, *head_widths: int, names: tuple[str, ...] = ()):
        for i, w in enumerate(head_widths):
            if w < n_tokens:
                who = names[i] if i < len(names) else f"model {i}"
                raise VocabMismatchError(
                    f"{who}: its LM head has {w} rows but the tokenizer has {n_tokens} tokens"
                )
        self.n_tokens = n_tokens
        self.width = max(head_widths)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        w = logits.shape[-1]
        if w == self.n_tokens == self.width:
            return logits
        if w < self.width:
            logits = torch.nn.functional.pad(logits, (0, self.width - w), value=float("-inf"))
        if self.width > self.n_tokens:
            extra = torch.arange(self.width, device=logits.device) >= self.n_tokens
            logits = logits.masked_fill(extra, float("-inf"))
        return logits


# ---------------------------------------------------------------------------------------------
# Forward passes in the shared batch layout


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same positions as unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def _bool_keep_supported() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def response_logits(model, batch: Batch, hidden_states: bool = False):
    """Logits predicting every real response token, as rows [N, V] in row-major (b, j) order.

    Only those rows go through the LM head (transformers' ``logits_to_keep`` with a boolean
    mask), which on a large vocabulary is most of the cost. With ``hidden_states`` it returns
    ``(logits, states)``: ``states[i]`` is transformers' ``hidden_states[i]`` (0: the
    embeddings, i: the output of block i) at the same positions, as rows [N, width].
    """
    P = batch.prompt_ids.shape[1]
    input_ids = batch.input_ids
    attn = batch.attention_mask
    keep = torch.zeros_like(attn)
    keep[:, P - 1 : -1] = batch.response_mask  # column c predicts the token at column c + 1
    kwargs = dict(input_ids=input_ids, attention_mask=attn.long(), position_ids=position_ids(attn), use_cache=False)
    if hidden_states:
        kwargs["output_hidden_states"] = True
    # Where the trainer gets the LM head: inside the model's forward, through logits_to_keep. A
    # fused LM-head loss would take the hidden states instead and the head's weight from the model;
    # under --fsdp that weight is a shard until its unit is gathered: sharding.head_unit says how.
    if _bool_keep_supported():
        out = model(**kwargs, logits_to_keep=keep)
        logits = out.logits
    else:
        out = model(**kwargs)
        logits = out.logits[keep]
    if not hidden_states:
        return logits
    return logits, tuple(h[keep] for h in out.hidden_states)


def final_hidden(model, logits_to_keep=None, **kwargs):
    """(the final hidden states [B, T, H], the model's output) of one forward of ``model``
    (possibly DDP-wrapped, so that DDP sees the forward). The hidden states are what the LM
    head takes: the output of the base model (``base_model``, after its final norm), caught by a
    forward hook. ``logits_to_keep``: the positions whose logits the model forms; by default
    none (an all-False mask, transformers >= 5; older versions the last position only), since
    the fused LM-head losses project the hidden states themselves."""
    if logits_to_keep is None:
        ids = kwargs["input_ids"]
        logits_to_keep = torch.zeros_like(ids, dtype=torch.bool) if _bool_keep_supported() else 1
    caught = {}

    def hook(module, args, output):
        caught["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = unwrap(model).base_model.register_forward_hook(hook)
    try:
        out = model(**kwargs, logits_to_keep=logits_to_keep)
    finally:
        handle.remove()
    return caught["h"], out


def response_hidden(model, batch: Batch, hidden_states: bool = False):
    """The final hidden states at the positions whose logits :func:`response_logits` returns,
    as rows [N, H] (the LM head's input; the fused LM-head losses project them). With
    ``hidden_states`` it returns ``(rows, states)`` as :func:`response_logits` does."""
    P = batch.prompt_ids.shape[1]
    attn = batch.attention_mask
    keep = torch.zeros_like(attn, dtype=torch.bool)
    keep[:, P - 1 : -1] = batch.response_mask  # column c predicts the token at column c + 1
    kwargs = dict(input_ids=batch.input_ids, attention_mask=attn.long(), position_ids=position_ids(attn),
                  use_cache=False)
    if hidden_states:
        kwargs["output_hidden_states"] = True
    h, out = final_hidden(model, **kwargs)
    if not hidden_states:
        return h[keep]
    return h[keep], tuple(x[keep] for x in out.hidden_states)


def response_labels(batch: Batch) -> torch.Tensor:
    """The response tokens matching :func:`response_logits` rows, [N] int64."""
    return batch.response_ids[batch.response_mask]


def unwrap(model):
    """The underlying model of a DDP wrapper (generation and saving bypass DDP). An FSDP-sharded
    model is its own module (FSDP2 shards in place) and is returned as it is."""
    return model.module if hasattr(model, "module") else model
