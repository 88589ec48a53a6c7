"""The LM data stream (``--lm-data``): plain documents for the LM term, apart from ``--data``.

LMOps' MiniLLM and DistiLLM add an LM loss on a pre-training corpus (``--lm-data-dir``:
OpenWebText, ...) beside the distillation data. ``--lm-data FILE`` is that corpus for kdext: a
JSONL file of ``{"text": ...}`` records, one document per line. A document is tokenised (with
the tokenizer's special tokens), cut to ``--max-prompt-len + --max-response-len`` tokens (LMOps:
``--max-length`` 512 = 256 + 256) and every token but the first is predicted, as LMOps'
``LMPipeline`` does: in the batch layout its first token is the "prompt" and the rest the
"response". The stream has its own :class:`~kdext.train.data.DataSchedule` (its own
permutation per pass, seeded from ``--seed`` by :mod:`kdext.train.seeds`), ``--batch-size``
documents per micro-batch like LMOps, so a step's LM rows are a function of the step.
"""

from __future__ import annotations

import json
import os

from .data import DataError, DataSchedule, Encoded, collate
from .seeds import Stream, stream_seed


def load_documents(path: str) -> list[str]:
    """The ``text`` of every record of a JSONL file (blank lines skipped); DataError naming file:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: LM data file not found")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
            if not obj["text"].strip():
                raise DataError(f"{path}:{lineno}: 'text' is empty")
            docs.append(obj["text"])
    if not docs:
        raise DataError(f"{path}: no records")
    return docs


def encode_document(tokenizer, text: str, max_len: int) -> Encoded:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_len]
    if not ids:
        raise DataError(f"LM document {text[:40]!r} tokenises to nothing")
    return Encoded(ids[:1], ids[1:])


class LMStream:
    """``--lm-data``'s micro-batches: ``batch(step, rank, micro)``, deterministic in (seed, step)."""

    def __init__(self, path: str, tokenizer, max_len: int, batch_size: int, grad_accum: int, world: int, seed: int):
        self.docs = load_documents(path)
        self.tokenizer, self.max_len = tokenizer, max_len
        self.schedule = DataSchedule(len(self.docs), batch_size, grad_accum, world, stream_seed(seed, Stream.LM_DATA))
        self._encoded: dict[int, Encoded] = {}

    def batch(self, step: int, rank: int, micro: int, device):
        idx, pos = self.schedule.rows(step, rank, micro)
        for i in idx:
            if i not in self._encoded:
                self._encoded[i] = encode_document(self.tokenizer, self.docs[i], self.max_len)
        return collate([self._encoded[i] for i in idx], self.tokenizer.pad_token_id, pos).to(device)
