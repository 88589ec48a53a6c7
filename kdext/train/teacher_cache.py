"""``kdext teacher-cache``: run the teacher once over the data and store its top-k log-probs.

Every example is read, templated, tokenised and truncated by the trainer's own code
(data.load_jsonl, data.encode, data.collate), the teacher's logits predicting its response
tokens come from models.response_logits, restricted to the tokenizer's vocabulary as
models.VocabAligner does, and ``kdext.topk_logprobs`` keeps the k most probable ids and their
log-probabilities at ``--temperature``. The format is cache_format.py's.

Shards are written whole under a temporary name and renamed (storage.atomic_write), so a kill
at any moment leaves complete shards and at most a temporary file, which the next start
removes; ``--resume`` skips the complete shards and captures the rest with the same batches, so
it writes the same bytes as an uninterrupted run. Under torchrun process r captures shards r,
r + W, r + 2W, ...; once every process is done, process 0 writes the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time

import torch

import kdext

from . import cache_format as F
from . import storage
from .data import collate, encode, load_jsonl
from .distributed import setup_distributed
from .models import (VocabAligner, check_context, check_vocab, has_tokenizer, head_width, load_model, load_tokenizer,
                     response_logits)
from .options import ConfigError
from .reporting import _is_terminal
from .resume import fingerprint


def say(text: str, enabled: bool = True) -> None:
    if enabled:
        print(f"kdext teacher-cache: {text}", file=sys.stderr, flush=True)


def capture_tokenizer(cfg):
    """The tokenizer the students will use: --tokenizer when given (checked against the
    teacher's, when the teacher folder has one), else the teacher's."""
    teacher_tok = load_tokenizer(cfg.teacher, "--teacher") if has_tokenizer(cfg.teacher) else None
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, "--tokenizer")
        if teacher_tok is not None:
            check_vocab(tok, teacher_tok)
        return tok, os.path.abspath(cfg.tokenizer)
    if teacher_tok is None:
        raise ConfigError(f"--tokenizer is required: the --teacher folder {cfg.teacher} has no tokenizer files "
                          "(give the students' tokenizer folder)")
    return teacher_tok, os.path.abspath(cfg.teacher)


def capture_plan(cfg, tok, tok_path: str, n_examples: int, device: torch.device, autocast: bool) -> dict:
    """What the cache is valid for and how it is captured (capture.json; the manifest adds the results)."""
    return {
        "format": F.FORMAT,
        "version": F.VERSION,
        "teacher": {"path": os.path.abspath(cfg.teacher), "hash": F.teacher_hash(cfg.teacher)},
        "tokenizer": {"path": tok_path, "vocab_hash": F.vocab_hash(tok), "vocab_size": len(tok)},
        "data": {"path": os.path.abspath(cfg.data), "sha256": fingerprint(cfg.data)},
        "template": cfg.template,
        "max_prompt_len": cfg.max_prompt_len,
        "max_response_len": cfg.max_response_len,
        "k": cfg.k,
        "temperature": cfg.temperature,
        "dtype": cfg.dtype,
        "examples": n_examples,
        "shard_examples": cfg.shard_examples,
        "batch_size": cfg.batch_size,
        "device": device.type,
        "autocast": "bf16" if autocast else "off",
    }


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(F.dumps(plan)).hexdigest()[:16]


def plan_differences(old: dict, new: dict) -> list[str]:
    """The fields (``data.sha256``, ``k``, ...) in which two plans differ; paths may change."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{sub}" for sub in sorted(set(a) | set(b)) if sub != "path" and a.get(sub) != b.get(sub)]
        elif a != b:
            out.append(key)
    return out


def prepare_out(cfg, plan: dict) -> None:
    """Main process: --out writable, stale temporaries removed, capture.json checked (--resume) or written."""
    storage.check_writable(cfg.out, "--out")
    removed = storage.remove_stale(cfg.out)
    if removed:
        say(f"removed {len(removed)} temporary file(s) of interrupted writes: {', '.join(removed)}")
    old = F.read_json(os.path.join(cfg.out, F.CAPTURE_FILE), "capture settings")
    shards = [n for n in os.listdir(cfg.out) if n.startswith("shard-")]
    if old is None and (shards or os.path.exists(os.path.join(cfg.out, F.MANIFEST_FILE))):
        raise ConfigError(f"--out {cfg.out} holds cache files but no {F.CAPTURE_FILE}; choose another --out")
    if old is not None and not cfg.resume:
        state = "a complete" if os.path.exists(os.path.join(cfg.out, F.MANIFEST_FILE)) else "a partial"
        raise ConfigError(f"--out {cfg.out} already holds {state} teacher cache; pass --resume to continue it "
                          "or choose another --out")
    if old is not None:
        diff = plan_differences(old, plan)
        if diff:
            raise ConfigError(f"--resume: the cache in {cfg.out} was captured with other settings ({', '.join(diff)} "
                              "differ); resume with its own settings or choose another --out")
        return
    if cfg.resume:
        say(f"note: --resume: {cfg.out} has no capture yet; starting from the first shard")
    data = F.dumps(plan)
    storage.atomic_write(os.path.join(cfg.out, F.CAPTURE_FILE), lambda f: f.write(data))


def shard_is_complete(out: str, index: int, plan: dict, digest: str) -> bool:
    path = os.path.join(out, F.shard_name(index))
    if not os.path.isfile(path):
        return False
    first, end = F.shard_range(index, plan["examples"], plan["shard_examples"])
    try:
        meta = F.shard_header(path)
    except F.CacheError:
        return False  # damaged (not by kdext: its writes are atomic); captured again
    return meta.get("plan") == digest and meta.get("first") == first and meta.get("examples") == end - first


class Capture:
    """The teacher and everything a shard needs."""

    def __init__(self, cfg, examples, tok, teacher, device, autocast: bool, plan: dict, main: bool):
        self.cfg, self.examples, self.tok, self.teacher, self.device = cfg, examples, tok, teacher, device
        self.autocast = autocast
        self.plan, self.digest, self.main = plan, plan_digest(plan), main
        self.aligner = VocabAligner(len(tok), head_width(teacher), names=("--teacher",))
        self.noted: set = set()

    def _encode(self, i: int):
        cfg, ex = self.cfg, self.examples[i]
        enc = encode(self.tok, ex, cfg.max_prompt_len, cfg.max_response_len)
        for what, n, flag, limit in (("prompt", enc.prompt_cut, "--max-prompt-len", cfg.max_prompt_len),
                                     ("response", enc.response_cut, "--max-response-len", cfg.max_response_len)):
            if n and what not in self.noted:  # as the trainer: a cut is never silent
                self.noted.add(what)
                say(f"note: {ex.where}: the {what} has {n + limit} tokens, more than {flag} {limit}; it is cut as "
                    f"the trainer cuts it, as is every longer {what} (said once)", self.main)
        return enc

    @torch.no_grad()
    def rows(self, first: int, end: int):
        """(ids [N, k] int32, log-probs [N, k] float32, lengths, digests) of examples [first, end)."""
        enc = [self._encode(i) for i in range(first, end)]
        batch = collate(enc, self.tok.pad_token_id, range(len(enc))).to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            logits = response_logits(self.teacher, batch)
        rows = self.aligner(logits)[:, : self.aligner.n_tokens]  # ids past the tokenizer carry no mass
        ids, logprobs, _ = kdext.topk_logprobs(rows, self.cfg.k, temperature=self.cfg.temperature)
        bad = ~torch.isfinite(logprobs[:, 0])
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            ex = next(first + b for b, e in enumerate(enc) if row < sum(len(x.response_ids) for x in enc[: b + 1]))
            raise F.CacheError(f"--teacher produced non-finite logits on {self.examples[ex].where}; "
                               "the teacher cannot be cached")
        lengths = [len(e.response_ids) for e in enc]
        digests = [F.token_digest(e.prompt_ids, e.response_ids) for e in enc]
        return ids.cpu(), logprobs.float().cpu(), lengths, digests

    def shard(self, index: int) -> int:
        """Capture shard ``index`` and write it atomically; returns its positions."""
        from safetensors.torch import save

        first, end = F.shard_range(index, self.plan["examples"], self.plan["shard_examples"])
        parts = [self.rows(a, min(end, a + self.cfg.batch_size)) for a in range(first, end, self.cfg.batch_size)]
        tensors = {
            "ids": torch.cat([p[0] for p in parts]).to(torch.int32).contiguous(),
            "logprobs": F.stored_logprobs(torch.cat([p[1] for p in parts]), self.cfg.dtype).contiguous(),
            "lengths": torch.tensor([n for p in parts for n in p[2]], dtype=torch.int32),
            "digest": torch.tensor([d for p in parts for d in p[3]], dtype=torch.int64),
        }
        tokens = tensors["ids"].shape[0]
        meta = {"format": F.FORMAT, "plan": self.digest, "shard": index, "first": first, "examples": end - first,
                "tokens": tokens}
        data = save(tensors, metadata=F.shard_metadata(meta))
        storage.atomic_write(os.path.join(self.cfg.out, F.shard_name(index)), lambda f: f.write(data))
        return tokens


class CaptureProgress:
    """A tqdm bar over this process's examples on a terminal, else a line per shard."""

    def __init__(self, total_examples: int, enabled: bool):
        self.enabled, self.total = enabled, total_examples
        self.bar = None
        if enabled and _is_terminal(sys.stderr):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_examples, desc="teacher-cache", unit="ex", dynamic_ncols=True)
        self.t0 = time.time()
        self.examples = self.tokens = 0

    def update(self, examples: int, tokens: int, shard: int, shards: int) -> None:
        self.examples += examples
        self.tokens += tokens
        dt = max(time.time() - self.t0, 1e-9)
        rates = f"{self.examples / dt:.3g} examples/s | {self.tokens / dt:.3g} tokens/s"
        if self.bar is not None:
            self.bar.update(examples)
            self.bar.set_postfix_str(rates)
        elif self.enabled:
            say(f"shard {shard}/{shards} | {self.examples}/{self.total} examples | {rates} | {dt:.0f}s elapsed")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_manifest(out: str, plan: dict) -> dict:
    """The manifest from the plan and the complete shards (read back: sizes, sha256, lengths)."""
    from safetensors import safe_open

    n = F.shard_count(plan["examples"], plan["shard_examples"])
    offsets, shards, total_bytes = [0], [], 0
    for i in range(n):
        path = os.path.join(out, F.shard_name(i))
        meta = F.shard_header(path)
        with safe_open(path, framework="pt") as f:
            lengths = f.get_tensor("lengths").tolist()
        for length in lengths:
            offsets.append(offsets[-1] + length)
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        size = os.path.getsize(path)
        total_bytes += size
        shards.append({"file": F.shard_name(i), "first": int(meta["first"]), "examples": int(meta["examples"]),
                       "tokens": int(meta["tokens"]), "bytes": size, "sha256": sha})
    tokens = offsets[-1]
    return {**plan, "tokens": tokens, "offsets": offsets, "shards": shards, "bytes": total_bytes,
            "bytes_per_position": round(total_bytes / max(1, tokens), 3)}


def capture(cfg) -> dict:
    """``kdext teacher-cache`` (a validated CacheConfig); returns a summary."""
    cfg.validate()
    examples = load_jsonl(cfg.data, cfg.template)
    P, R = cfg.max_prompt_len, cfg.max_response_len
    check_context([("--teacher", cfg.teacher)], [(f"--max-prompt-len {P} + --max-response-len {R}", P + R)])
    tok, tok_path = capture_tokenizer(cfg)
    if cfg.k > len(tok):
        raise ConfigError(f"--k {cfg.k} exceeds the vocabulary ({len(tok)} tokens)")
    dd, device = setup_distributed(cfg.device, cfg.collective_timeout)
    autocast = cfg.bf16 and device.type == "cuda"  # as the trainer runs its teacher
    plan = capture_plan(cfg, tok, tok_path, len(examples), device, autocast)
    dd.on_main(lambda: prepare_out(cfg, plan), "preparing --out")
    teacher = load_model(cfg.teacher, "--teacher", device, trainable=False)
    cap = Capture(cfg, examples, tok, teacher, device, autocast, plan, dd.main)

    n_shards = F.shard_count(len(examples), cfg.shard_examples)
    mine = F.rank_shards(n_shards, dd.rank, dd.world)
    todo = [i for i in mine if not shard_is_complete(cfg.out, i, plan, cap.digest)]
    if len(todo) < len(mine):
        say(f"resume: {len(mine) - len(todo)} of {len(mine)} shards are complete; capturing the other {len(todo)}",
            dd.main)
    todo_examples = sum(e - f for f, e in (F.shard_range(i, len(examples), cfg.shard_examples) for i in todo))
    progress = CaptureProgress(todo_examples, enabled=dd.main and cfg.progress)
    t0, written, stopped = time.time(), 0, False
    try:
        for j, i in enumerate(todo):
            if cfg.stop_after_shards is not None and written >= cfg.stop_after_shards:
                stopped = True
                break
            tokens = cap.shard(i)
            written += 1
            first, end = F.shard_range(i, len(examples), cfg.shard_examples)
            progress.update(end - first, tokens, j + 1, len(todo))
    finally:
        progress.close()
    stopped = dd.any_of([stopped], device)[0]
    summary = {"out": cfg.out, "examples": len(examples), "shards": n_shards, "shards_written": written,
               "seconds": round(time.time() - t0, 3), "complete": not stopped}
    if stopped:
        say(f"stopped after {written} shard(s) (--stop-after-shards); --resume continues", dd.main)
        dd.barrier()
        return summary

    def write_manifest():
        manifest = build_manifest(cfg.out, plan)
        data = F.dumps(manifest)
        storage.atomic_write(os.path.join(cfg.out, F.MANIFEST_FILE), lambda f: f.write(data))
        return {k: manifest[k] for k in ("tokens", "bytes", "bytes_per_position")}

    summary.update(dd.on_main(write_manifest, "writing the manifest"))
    return summary
