"""The offline teacher's cache on disk: what ``kdext teacher-cache`` writes and ``kdext distill
--teacher-cache`` reads (docs/TRAINER.md, "The offline teacher").

A cache is a folder::

    CACHE/capture.json               the capture's settings (written first; --resume checks them)
    CACHE/shard-00000.safetensors    examples [0, E), shard-00001: [E, 2E), ...
    CACHE/manifest.json              written last, once every shard is there: the cache is complete

Each shard holds, for its examples in file order, one row per response position (the logits
that predict response token j of an example, j = 0 .. its response length - 1)::

    ids       [tokens, k] int32     the teacher's k most probable ids, by descending probability
    logprobs  [tokens, k] fp16 / bf16 / fp32: their log-probabilities under softmax(teacher / T)
    lengths   [examples] int32      response positions of each example
    digest    [examples] int64      a digest of each example's prompt and response token ids

so a position costs 6k bytes (fp16, bf16; 8k with fp32) plus 12 bytes per example and a
header of a few hundred bytes per shard. The digest is how the trainer finds an example's rows
(a batch's rows are looked up by their tokens, so they can only get the rows of the very tokens
they hold) and how a student tokenizer that splits the text differently is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

import torch

from .data import DataError

FORMAT = "kdext-teacher-cache"
VERSION = 1
CAPTURE_FILE = "capture.json"
MANIFEST_FILE = "manifest.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ID_BYTES = 4  # int32 ids

# The fields of the capture settings that say which runs the cache is valid for, with the
# kdext distill flag each must match (checked by cached_teacher.check_manifest).
RUN_FIELDS = {
    "data": "--data",
    "tokenizer": "--student",
    "template": "--template",
    "max_prompt_len": "--max-prompt-len",
    "max_response_len": "--max-response-len",
    "temperature": "--temperature",
}


class CacheError(DataError):
    """A cache folder that cannot be used (missing, incomplete, damaged); names the folder."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_count(examples: int, shard_examples: int) -> int:
    return -(-examples // shard_examples)


def shard_range(index: int, examples: int, shard_examples: int) -> tuple[int, int]:
    """[first, end) examples of shard ``index``."""
    first = index * shard_examples
    return first, min(examples, first + shard_examples)


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards process ``rank`` of ``world`` captures: rank, rank + world, ... (disjoint)."""
    return list(range(rank, n_shards, world))


def bytes_per_position_bound(k: int, dtype: str) -> int:
    """The format's budget per stored position: 6k + 16 bytes for fp16 / bf16 (8k + 16 for fp32)."""
    return (ID_BYTES + DTYPES[dtype].itemsize) * k + 16


def stored_logprobs(logprobs: torch.Tensor, dtype: str) -> torch.Tensor:
    """Log-probs (float32, <= 0) in the cache's dtype, rounded toward -inf (fp16 / bf16): a stored
    probability never exceeds the captured one, so the stored mass S of a row stays at most its
    float32 value and the bucket's teacher tail 1 - S is not lost to rounding up (docs/DESIGN.md
    §2.10: with S >= 1 the tail has no teacher mass and reverse KL is +inf where the student has
    some). Each value moves by less than one unit in the last place, as round-to-nearest would."""
    out = logprobs.to(DTYPES[dtype])
    if out.dtype == torch.float32:
        return out
    up = out.float() > logprobs  # NaN compares False
    if bool(up.any()):
        bits = out.view(torch.int16)
        # a negative value's bit pattern + 1 is the next value toward -inf; 0 goes to -(the
        # smallest subnormal), 0x8001
        lower = torch.where(out == 0, torch.full_like(bits, -32767), bits + 1)
        out = torch.where(up, lower, bits).view(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Digests of what a cache is valid for


def token_digest(prompt_ids, response_ids) -> int:
    """A signed 64-bit digest of one example's token ids (prompt, then response)."""
    h = hashlib.sha256()
    h.update(struct.pack(f"<{len(prompt_ids)}q", *prompt_ids))
    h.update(b"|")
    h.update(struct.pack(f"<{len(response_ids)}q", *response_ids))
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def vocab_hash(tokenizer) -> str:
    """sha256 over the tokenizer's token -> id map (sorted), with its size and EOS id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps({"vocab": vocab, "size": len(tokenizer), "eos": tokenizer.eos_token_id}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


def teacher_hash(folder: str) -> str:
    """sha256 over the teacher's config.json bytes and its weight files' names and sizes (the
    weights themselves are not read: they may be many GB)."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(full):
            h.update(f"\0{name}\0{os.path.getsize(full)}".encode())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------
# JSON files


def dumps(obj: dict) -> bytes:
    """The one serialisation of capture.json and manifest.json (sorted keys: a resumed capture
    writes the same bytes)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def read_json(path: str, what: str) -> Optional[dict]:
    """The JSON object of ``path``; None when the file does not exist; CacheError when damaged."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: the {what} cannot be read ({e}); capture the cache again") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CacheError(f"{path}: not a kdext teacher cache {what}")
    if obj.get("version") != VERSION:
        raise CacheError(f"{path}: cache format version {obj.get('version')}, this kdext reads {VERSION}")
    return obj


def read_manifest(folder: str, flag: str = "--teacher-cache") -> dict:
    """The manifest of a complete cache (CacheError naming ``flag`` otherwise)."""
    if not os.path.isdir(folder):
        raise CacheError(f"{flag} {folder}: not a folder")
    manifest = read_json(os.path.join(folder, MANIFEST_FILE), "manifest")
    if manifest is None:
        partial = os.path.isfile(os.path.join(folder, CAPTURE_FILE))
        why = ("the capture did not finish (rerun kdext teacher-cache with --resume)" if partial
               else "no manifest.json: not a teacher cache")
        raise CacheError(f"{flag} {folder}: {why}")
    return manifest


_META_KEY = "kdext"


def shard_metadata(meta: dict) -> dict:
    """A shard's safetensors metadata: one key holding ``meta`` as sorted JSON (safetensors
    writes several metadata keys in a hash map's order, which differs between processes; one
    key keeps a resumed capture's bytes those of an uninterrupted one)."""
    return {_META_KEY: json.dumps(meta, sort_keys=True)}


def shard_header(path: str) -> dict:
    """The metadata of a shard file (CacheError if it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {})[_META_KEY])
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise CacheError(f"{path}: the shard cannot be read ({e}); capture it again (--resume)") from None
