"""``kdext distill --teacher-cache CACHE``: distil from a captured teacher instead of a live one.

Which runs a cache serves (:func:`check_cache_config`, before anything is loaded): the
off-policy methods, whose teacher only ever reads the data's responses — ``kd``, ``rkl``,
``gkd --lam 0`` and ``distillm --sgo off`` (DistiLLM's skew KL on the data; its adaptive SGO
trains on student samples, which a cache cannot score). On-policy methods (``minillm``,
``seqkd``, ``gkd --lam > 0``, ``distillm --sgo adaptive``), feature distillation
(``--hidden-coef``) and the LM term's teacher cross-entropy (``--kd-ratio``) need the live
teacher and are refused with a message that says so.

Whether the cache fits the run (:func:`open_for_run`, once the student's tokenizer is loaded):
its manifest must name the run's data (sha256), tokenizer (vocabulary hash), template, length
limits and temperature; every field that differs is named in one usage error (exit code 2).

The loss: each main micro-batch's rows are looked up in the cache by their tokens (the digest of
cache_format.py), so every process reads exactly the examples of its own batches (DDP), a
resumed run reads what the uninterrupted one would, and a row whose tokens were not captured
(another tokenizer's split) is an error, not a silently wrong teacher. The method's divergence
is then ``kdext.sparse_distill_loss`` of the same kind with ``--sparse-tail``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

import kdext

from . import cache_format as F
from .options import ConfigError

OPEN_SHARDS = 64  # shard files kept open (memory-mapped) at once


def _refusal(cfg) -> Optional[str]:
    """Why --method (with its options) cannot use a cache; None when it can."""
    m, mc = cfg.method, cfg.method_cfg
    if m in ("kd", "rkl"):
        return None
    if m == "gkd":
        return None if mc.lam == 0 else (f"--lam {mc.lam:g} trains on student samples, which need the live "
                                          "--teacher; use --lam 0 (off-policy GKD) with a cache")
    if m == "distillm":
        return None if mc.sgo == "off" else ("--sgo adaptive trains on student samples (fresh and replayed), "
                                             "which need the live --teacher; pass --sgo off for its off-policy "
                                             "part (the skew KL on the data's responses)")
    if m == "sft":
        return "has no teacher"
    live = {"minillm": "is on-policy (the teacher scores the student's samples and mixes into its sampling)",
            "seqkd": "is on-policy (the teacher writes the responses)"}
    return (live.get(m, "is not one of the off-policy methods a cache serves (kd, rkl, gkd --lam 0, distillm "
                        "--sgo off)") + "; it needs the live --teacher")


def check_cache_config(cfg) -> None:
    """The rules of --teacher-cache on a TrainConfig (ConfigError naming the flag)."""
    if cfg.teacher:
        raise ConfigError("--teacher and --teacher-cache: give one of them (the cache replaces the live teacher)")
    why = _refusal(cfg)
    if why:
        raise ConfigError(f"--teacher-cache: --method {cfg.method} {why}")
    mc = cfg.method_cfg
    if mc.hidden_coef > 0:
        raise ConfigError("--teacher-cache with --hidden-coef > 0: feature distillation needs the live --teacher's "
                          "hidden states; a cache holds its top-k log-probs only")
    lm_coef = mc.lm_coef if mc.lm_coef is not None else (1.0 if cfg.lm_data else 0.0)
    if lm_coef > 0 and (mc.kd_ratio or 0) > 0:
        raise ConfigError("--teacher-cache with --kd-ratio > 0: the LM term's H(p, q) needs the teacher's full "
                          "distribution at T = 1 on the LM rows; use --kd-ratio 0 with a cache")


# ---------------------------------------------------------------------------------------------
# The manifest against the run


def run_values(cfg, method_cfg, tokenizer, data_fingerprint: str) -> dict:
    """The run's value of each cache_format.RUN_FIELDS field, as the manifest writes it."""
    return {
        "data": data_fingerprint,
        "tokenizer": F.vocab_hash(tokenizer),
        "template": cfg.template,
        "max_prompt_len": cfg.max_prompt_len,
        "max_response_len": cfg.max_response_len,
        "temperature": method_cfg.temperature,
    }


def cache_values(manifest: dict) -> dict:
    return {
        "data": manifest["data"]["sha256"],
        "tokenizer": manifest["tokenizer"]["vocab_hash"],
        **{k: manifest[k] for k in ("template", "max_prompt_len", "max_response_len", "temperature")},
    }


def _differs(field: str, cached, run) -> bool:
    if field == "temperature":
        return float(cached) != float(run)
    return cached != run


def check_manifest(folder: str, manifest: dict, run: dict) -> None:
    """ConfigError naming every field of the manifest that does not fit the run."""
    cached = cache_values(manifest)
    bad = []
    for field, flag in F.RUN_FIELDS.items():
        if _differs(field, cached[field], run[field]):
            if field == "data":
                what = (f"the cache's --data was {manifest['data']['path']} ({cached[field][:19]}...), "
                        "this run's file differs")
            elif field == "tokenizer":
                what = "the cache's tokenizer vocabulary differs from the --student tokenizer's"
            else:
                what = f"cache {cached[field]!r}, run {run[field]!r}"
            bad.append(f"{field} ({flag}: {what})")
    if bad:
        raise ConfigError(f"--teacher-cache {folder} was captured for another run: {'; '.join(bad)}. Capture a "
                          "cache with this run's settings (kdext teacher-cache), or run with the cache's")


def open_for_run(cfg, method_cfg, tokenizer, inputs: dict) -> "TeacherCache":
    """The run's cache, checked against the run (ConfigError) and opened (CacheError if damaged)."""
    folder = cfg.teacher_cache
    manifest = F.read_manifest(folder)
    check_manifest(folder, manifest, run_values(cfg, method_cfg, tokenizer, inputs["data"]["fingerprint"]))
    return TeacherCache(folder, manifest)


# ---------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class SparseRows:
    """The cached teacher rows of a batch (in response_logits' row order), in place of its logits."""

    ids: torch.Tensor  # [N, k] int32
    logprobs: torch.Tensor  # [N, k] fp16 / bf16 / fp32
    tail: str  # --sparse-tail
    vocab: int  # the tokenizer's size: the ids are below it

    def divergence_sum(self, s_rows: torch.Tensor, kind: str, cfg) -> torch.Tensor:
        """sum over rows of the divergence ``kind`` between the student and the cached teacher."""
        if s_rows.shape[-1] > self.vocab:
            # The student's columns past the tokenizer are -inf (VocabAligner): the same
            # distribution without them, and at k = vocab no tail outcome at all (exact).
            s_rows = s_rows[..., : self.vocab]
        return kdext.sparse_distill_loss(s_rows, self.ids, self.logprobs, kind=kind, tail=self.tail,
                                         temperature=cfg.temperature, reduction="sum", beta=cfg.beta,
                                         alpha=cfg.alpha)


class TeacherCache:
    """A complete cache folder, its examples found by the digest of their tokens."""

    def __init__(self, folder: str, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.k, self.vocab = manifest["k"], manifest["tokenizer"]["vocab_size"]
        self.offsets = torch.tensor(manifest["offsets"], dtype=torch.int64)
        self.shard_examples = manifest["shard_examples"]
        self._open: OrderedDict = OrderedDict()
        digests = []
        for i, shard in enumerate(manifest["shards"]):
            path = os.path.join(folder, shard["file"])
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != shard["bytes"]:
                have = "missing" if size is None else f"{size} bytes, the manifest says {shard['bytes']}"
                raise F.CacheError(f"--teacher-cache {folder}: {shard['file']} is {have}: the cache is damaged; "
                                   "capture it again")
            f = self._shard(i)
            lengths = f.get_tensor("lengths").to(torch.int64)
            first = shard["first"]
            expect = self.offsets[first + 1 : first + 1 + len(lengths)] - self.offsets[first : first + len(lengths)]
            if not torch.equal(lengths, expect):
                raise F.CacheError(f"--teacher-cache {folder}: {shard['file']} does not match the manifest's offsets")
            digests.append(f.get_tensor("digest"))
        self.digests, self.order = torch.sort(torch.cat(digests))

    def _shard(self, i: int):
        from safetensors import safe_open

        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        if len(self._open) >= OPEN_SHARDS:
            self._open.popitem(last=False)
        f = safe_open(os.path.join(self.folder, self.manifest["shards"][i]["file"]), framework="pt")
        self._open[i] = f
        return f

    def example_of(self, digest: int) -> Optional[int]:
        """The first cached example with these tokens (duplicates share their teacher rows)."""
        j = int(torch.searchsorted(self.digests, torch.tensor(digest, dtype=torch.int64)))
        if j < len(self.digests) and int(self.digests[j]) == digest:
            return int(self.order[j])
        return None

    def example_rows(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard = e // self.shard_examples
        base = int(self.offsets[shard * self.shard_examples])
        a, b = int(self.offsets[e]) - base, int(self.offsets[e + 1]) - base
        f = self._shard(shard)
        return f.get_slice("ids")[a:b], f.get_slice("logprobs")[a:b]

    def rows(self, batch, tail: str) -> SparseRows:
        """The teacher rows of every real response token of ``batch``, as response_logits orders them."""
        ids, logprobs = [], []
        for b in range(batch.prompt_ids.shape[0]):
            prompt = batch.prompt_ids[b][batch.prompt_mask[b]].tolist()
            response = batch.response_ids[b][batch.response_mask[b]].tolist()
            e = self.example_of(F.token_digest(prompt, response))
            if e is None:
                raise F.CacheError(
                    f"--teacher-cache {self.folder}: a row of the batch ({len(prompt)} prompt and {len(response)} "
                    "response tokens) is not in the cache: its tokens are not those of any captured example (was "
                    "the cache captured with this tokenizer, template and data?)")
            i, lp = self.example_rows(e)
            ids.append(i)
            logprobs.append(lp)
        device = batch.response_ids.device
        return SparseRows(torch.cat(ids).to(device), torch.cat(logprobs).to(device), tail, self.vocab)
