"""Instruction data: JSONL loading, prompt templating, tokenisation and batching.

Two record shapes are accepted, one JSON object per line:

* ``{"prompt": ..., "response": ...}``
* Dolly style ``{"instruction": ..., "context": ..., "response": ...}`` (``context`` optional)

``response`` may also be a list of strings: every entry is a valid reference (used by
evaluation: Rouge-L takes the best reference, exact match accepts any). Training uses the first.

Every batch has one layout, shared by all methods so the trainer needs a single code path::

    [ pad pad p0 p1 p2 | r0 r1 r2 eos pad ]
      prompt block P     response block R
      (left padded)      (right padded)

Left-padded prompts let a KV-cached sampler append tokens to every row at the same column;
right-padded responses keep response token ``j`` at column ``P + j`` for every row, so
rollouts and reference data can be concatenated along the batch dimension.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .seeds import data_order_seed

# The prompt template: ``{prompt}`` is replaced by the record's prompt (for Dolly records, the
# instruction followed by the context when there is one).
DEFAULT_TEMPLATE = "{prompt}\n"
DOLLY_CONTEXT_JOIN = "\n\n"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


@dataclass
class Example:
    prompt: str  # already templated
    references: list[str]  # one or more valid responses; training uses references[0]
    where: str = ""  # "file:line" of the record, for messages

    @property
    def response(self) -> str:
        return self.references[0]


def format_prompt(record: dict, template: str = DEFAULT_TEMPLATE) -> str:
    """Turn a record's prompt fields into the model's prompt text."""
    if "prompt" in record:
        body = record["prompt"]
    else:
        body = record["instruction"]
        context = record.get("context") or ""
        if context.strip():
            body = body + DOLLY_CONTEXT_JOIN + context
    return template.replace("{prompt}", body)


def _parse_record(obj, path: str, lineno: int, template: str, need_response: bool) -> Example:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj and "instruction" not in obj:
        raise DataError(f"{where}: record has neither 'prompt' nor 'instruction' (keys: {sorted(obj)})")
    main = "prompt" if "prompt" in obj else "instruction"
    if obj[main] is None:
        raise DataError(f"{where}: field '{main}' is null; expected a string")
    for key in ("prompt", "instruction", "context"):  # a null context is no context
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    refs = obj.get("response")
    if refs is None:
        if need_response:
            raise DataError(f"{where}: record has no 'response'" if "response" not in obj
                            else f"{where}: field 'response' is null; expected a string")
        refs = [""]
    elif isinstance(refs, str):
        refs = [refs]
    elif isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs):
        refs = list(refs)
    else:
        raise DataError(f"{where}: field 'response' must be a string or a non-empty list of strings")
    for key in ("prompt", "instruction", "context"):
        if isinstance(obj.get(key), str):
            _check_utf8(where, f"field '{key}'", obj[key])
    for r in refs:
        _check_utf8(where, "field 'response'", r)
    prompt = format_prompt(obj, template)
    if not prompt:  # nothing to tokenise (a prompt of whitespace is the tokenizer's to judge: encode())
        raise DataError(f"{where}: field '{main}' is empty; under --template {template!r} the model gets no prompt")
    return Example(prompt=prompt, references=refs, where=where)


def _lines(path: str):
    """(line number, text) of a file of UTF-8 text (a byte order mark is allowed). Bytes that are
    not UTF-8 come through as lone surrogates (``surrogateescape``), so the record's check can
    name the field that holds them (:func:`_check_utf8`)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield lineno, raw.decode("utf-8", errors="surrogateescape")


def _check_utf8(where: str, what: str, value: str) -> None:
    """DataError unless ``value`` came from UTF-8 bytes; ``what``: "field 'prompt'", "the line"."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(value[e.start]) - 0xDC00 if 0xDC80 <= ord(value[e.start]) <= 0xDCFF else None
        bad = f"byte 0x{byte:02x}" if byte is not None else f"character {value[e.start]!r}"
        raise DataError(f"{where}: {what} is not UTF-8 text ({bad} at character {e.start + 1}); "
                        "save the file as UTF-8") from None


def load_jsonl(path: str, template: str = DEFAULT_TEMPLATE, need_response: bool = True) -> list[Example]:
    """Read a JSONL file of prompt/response or instruction/context/response records.

    Blank lines are skipped. Any other line that is not a usable record raises DataError naming
    ``path:line``.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    if "{prompt}" not in template:
        raise DataError(f"prompt template {template!r} has no '{{prompt}}' field to put the prompt in")
    examples = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            _check_utf8(f"{path}:{lineno}", "the line", line)  # a stray byte outside any string
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        examples.append(_parse_record(obj, path, lineno, template, need_response))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenisation and batching


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated
    prompt_cut: int = 0  # tokens dropped from the prompt's start (--max-prompt-len)
    response_cut: int = 0  # tokens dropped from the response's end, EOS included (--max-response-len)


def encode(tokenizer, ex: Example, max_prompt_len: int, max_response_len: int) -> Encoded:
    """Tokenise one example. Long prompts keep their end (the part next to the response)."""
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
    prompt_cut = max(0, len(prompt_ids) - max_prompt_len)
    prompt_ids = prompt_ids[prompt_cut:]
    if not prompt_ids:
        raise DataError(f"{ex.where or 'a record'}: the prompt {ex.prompt!r} tokenises to nothing")
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_cut = max(0, len(response_ids) - max_response_len)
    return Encoded(prompt_ids, response_ids[:max_response_len], prompt_cut, response_cut)


@dataclass
class Batch:
    """One micro-batch in the shared layout (see module docstring).

    ``response_ids[b, j]`` sits at column ``P + j`` of ``input_ids``; its predicting logits come
    from column ``P + j - 1``. ``response_mask`` marks real response tokens (EOS included).
    """

    prompt_ids: torch.Tensor  # [B, P] int64, left padded
    prompt_mask: torch.Tensor  # [B, P] bool
    response_ids: torch.Tensor  # [B, R] int64, right padded
    response_mask: torch.Tensor  # [B, R] bool
    index: torch.Tensor  # [B] int64: position of each row in the global batch (for seeds)
    extras: dict = field(default_factory=dict)  # per-method tensors, e.g. a rollout's log-probs

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def to(self, device) -> "Batch":
        ex = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.extras.items()}
        return Batch(
            self.prompt_ids.to(device),
            self.prompt_mask.to(device),
            self.response_ids.to(device),
            self.response_mask.to(device),
            self.index.to(device),
            ex,
        )


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ([B, P] ids, [B, P] mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = True
    return ids, mask


def pad_responses(responses: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ([B, R] ids, [B, R] mask); R >= 1 so the block is never empty."""
    width = max(1, max(len(r) for r in responses))
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, r in enumerate(responses):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
    return ids, mask


def collate(encoded: Sequence[Encoded], pad_id: int, index: Sequence[int]) -> Batch:
    p_ids, p_mask = pad_prompts([e.prompt_ids for e in encoded], pad_id)
    r_ids, r_mask = pad_responses([e.response_ids for e in encoded], pad_id)
    return Batch(p_ids, p_mask, r_ids, r_mask, torch.tensor(list(index), dtype=torch.long))


def concat_batches(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Stack two batches along the batch dimension, re-padding both blocks to a common width.

    Used so a method that needs two kinds of rows (MiniLLM: rollouts and reference data) runs
    one student forward per micro-batch, which DDP requires.
    """
    P = max(a.prompt_ids.shape[1], b.prompt_ids.shape[1])
    R = max(a.response_ids.shape[1], b.response_ids.shape[1])

    def lpad(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def rpad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Batch(
        torch.cat([lpad(a.prompt_ids, P, pad_id), lpad(b.prompt_ids, P, pad_id)]),
        torch.cat([lpad(a.prompt_mask, P, False), lpad(b.prompt_mask, P, False)]),
        torch.cat([rpad(a.response_ids, R, pad_id), rpad(b.response_ids, R, pad_id)]),
        torch.cat([rpad(a.response_mask, R, False), rpad(b.response_mask, R, False)]),
        torch.cat([a.index, b.index]),
    )


class DataSchedule:
    """Which examples each (step, rank, micro-batch) gets: deterministic and layout independent.

    The data are visited in a fresh permutation per epoch (seeded by ``data_order_seed(seed, epoch)``). Step ``k``
    takes the next ``global_batch`` positions; rank ``r`` micro-batch ``a`` takes rows
    ``r * accum * B + a * B ... + B`` of them. So one process with batch 4 sees exactly the
    examples that two processes with batch 2 see together, and a resumed run sees exactly what
    an uninterrupted one would: the data position is a function of the step alone.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        if n <= 0:
            raise DataError("the training data has no examples")
        self.n, self.B, self.accum, self.world, self.seed = n, batch_size, grad_accum, world_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.B * self.accum * self.world

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(data_order_seed(self.seed, epoch))
            if len(self._perms) >= 2:  # a step spans at most two epochs; keep those cached
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def rows(self, step: int, rank: int, micro: int) -> tuple[list[int], list[int]]:
        """(example indices, positions within the global batch) for one micro-batch."""
        first = rank * self.accum * self.B + micro * self.B
        positions = list(range(first, first + self.B))
        idx = []
        for j in positions:
            pos = step * self.global_batch + j
            idx.append(int(self._perm(pos // self.n)[pos % self.n]))
        return idx, positions

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n
