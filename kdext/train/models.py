"""Loading Hugging Face models and tokenizers from local folders, and the vocabulary contract.

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``
and the Hub is switched to offline mode before transformers is imported by the CLI.

Teacher and student must share a vocabulary (same token -> id map). Their LM heads may still be
of different widths because checkpoints often pad the embedding matrix (to a multiple of 64,
say). Ids at or beyond the tokenizer's size are not tokens: :class:`VocabAligner` gives both
sides the same width and sets those ids' logits to -inf, so they carry no probability.
"""

from __future__ import annotations

import os

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


def load_tokenizer(path: str, arg: str = "--student"):
    """AutoTokenizer from a local folder; a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ModelError(f"{arg}: {path!r} is not a folder")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{arg}: cannot load a tokenizer from {path!r}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{arg}: the tokenizer in {path!r} has no EOS token; generation could never stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def load_model(path: str, arg: str, device: torch.device, trainable: bool):
    """AutoModelForCausalLM in float32 on ``device``. Frozen models are put in eval mode."""
    from transformers import AutoModelForCausalLM

    _check_dir(path, arg)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"{arg}: cannot load a causal LM from {path!r}: {e}") from None
    model.to(device)
    if trainable:
        model.train()
    else:
        # The teacher: eval mode (no dropout) and no gradients, ever.
        model.eval()
        model.requires_grad_(False)
    return model


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
    if _bool_keep_supported():
        out = model(**kwargs, logits_to_keep=keep)
        logits = out.logits
    else:
        out = model(**kwargs)
        logits = out.logits[keep]
    if not hidden_states:
        return logits
    return logits, tuple(h[keep] for h in out.hidden_states)


def response_labels(batch: Batch) -> torch.Tensor:
    """The response tokens matching :func:`response_logits` rows, [N] int64."""
    return batch.response_ids[batch.response_mask]


def unwrap(model):
    """The underlying model of a DDP wrapper (generation and saving bypass DDP)."""
    return model.module if hasattr(model, "module") else model
