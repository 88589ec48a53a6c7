"""Evaluation: generate responses and score them.

* Rouge-L F1 (the ``rouge-score`` package, the MiniLLM paper's metric), best over the references,
  in percent.
* Exact match: the response equals one of the references after whitespace normalisation, in
  percent. With every valid answer listed as a reference, this is "the answer is valid".
* Expected calibration error of the model's next-token predictions on the first reference
  (teacher forcing): confidence = the top token's probability, correct = it is the reference
  token; 10 equal-width confidence bins; a fraction in [0, 1].
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Sequence

import torch

import kdext

from . import generation
from .data import Example, collate, encode, pad_prompts
from .models import VocabAligner, head_width, response_labels, response_logits
from .seeds import Stream, stream_seed


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def rouge_l(prediction: str, references: Sequence[str], scorer=None) -> float:
    from rouge_score import rouge_scorer

    scorer = scorer or rouge_scorer.RougeScorer(["rougeL"])
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """sum_b |accuracy_b - confidence_b| * n_b / n over equal-width bins of confidence."""
    conf = conf.double().flatten()
    correct = correct.double().flatten()
    if conf.numel() == 0:
        return float("nan")
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        n = int(sel.sum())
        if n:
            ece += abs(float(correct[sel].mean()) - float(conf[sel].mean())) * n / conf.numel()
    return ece


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_len: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    autocast=contextlib.nullcontext,
    sync=None,
) -> list[str]:
    """Sampled (or greedy: top-k = 1) responses, decoded without special tokens. ``sync``: see
    generation.sample (an FSDP-sharded model: every process generates, in lockstep)."""
    model.eval()
    device = next(model.parameters()).device
    aligner = VocabAligner(len(tokenizer), head_width(model))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_prompt_len:] for p in chunk]
        p_ids, p_mask = pad_prompts(ids, tokenizer.pad_token_id)
        with autocast():
            ro = generation.sample(
                model,
                p_ids.to(device),
                p_mask.to(device),
                aligner=aligner,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
                seed=stream_seed(seed, Stream.EVAL_SAMPLING),
                row_ids=torch.arange(start, start + len(chunk)),
                top_p=top_p,
                top_k=1 if greedy else 0,
                temperature=temperature,
                sync=sync,
            )
        for row, m in zip(ro.response_ids.cpu(), ro.response_mask.cpu()):
            toks = [t for t in row[m].tolist() if t != tokenizer.eos_token_id]
            out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def calibration(
    model, tokenizer, examples: Sequence[Example], *, max_prompt_len=256, max_response_len=128, batch_size=64,
    autocast=contextlib.nullcontext, n_bins: int = 10
) -> float:
    """Token-level ECE of next-token predictions along the first reference of each example."""
    model.eval()
    device = next(model.parameters()).device
    aligner = VocabAligner(len(tokenizer), head_width(model))
    confs, hits = [], []
    for start in range(0, len(examples), batch_size):
        enc = [encode(tokenizer, e, max_prompt_len, max_response_len) for e in examples[start : start + batch_size]]
        batch = collate(enc, tokenizer.pad_token_id, range(len(enc))).to(device)
        with autocast():
            rows = aligner(response_logits(model, batch))
        top = rows.argmax(dim=-1)
        confs.append(kdext.logprobs(rows, top).float().exp().cpu())
        hits.append((top == response_labels(batch)).cpu())
    return expected_calibration_error(torch.cat(confs), torch.cat(hits), n_bins)


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    max_prompt_len: int = 256,
    max_response_len: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    autocast=contextlib.nullcontext,
    keep_samples: int = 20,
    sync=None,
) -> dict:
    from rouge_score import rouge_scorer

    preds = generate(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        seed=seed,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        autocast=autocast,
        sync=sync,
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [rouge_l(p, e.references, scorer) for p, e in zip(preds, examples)]
    exact = [normalize(p) in {normalize(r) for r in e.references} for p, e in zip(preds, examples)]
    ece = calibration(
        model, tokenizer, examples, max_prompt_len=max_prompt_len, max_response_len=max_response_len,
        batch_size=batch_size, autocast=autocast,
    )
    n = len(examples)
    return {
        "rougeL": 100.0 * sum(rouge) / n,
        "exact_match": 100.0 * sum(exact) / n,
        "ece": ece,
        "n": n,
        "samples": [
            {"prompt": e.prompt, "response": p, "references": e.references}
            for p, e in list(zip(preds, examples))[:keep_samples]
        ],
    }


def evaluate_folder(model_dir: str, data: str, out: str, *, template: str, device: str = "auto", **kw) -> dict:
    """``kdext eval``: load a saved model folder, score it on a JSONL file, write JSON to ``out``."""
    from . import storage
    from .data import load_jsonl
    from .distributed import use_cuda
    from .models import check_context, load_model, load_tokenizer

    # Everything that can fail without the weights fails first: the output folder, the data,
    # the lengths against the model's context.
    storage.check_writable(os.path.dirname(os.path.abspath(out)), "--out")
    examples = load_jsonl(data, template)
    P, N, R = kw.get("max_prompt_len", 256), kw.get("max_new_tokens", 64), kw.get("max_response_len", 128)
    check_context([("--model", model_dir)], [(f"--max-prompt-len {P} + --max-new-tokens {N}", P + N),
                                             (f"--max-prompt-len {P} + --max-response-len {R}", P + R)])
    dev = torch.device("cuda" if use_cuda(device) else "cpu")
    tok = load_tokenizer(model_dir, "--model")
    model = load_model(model_dir, "--model", dev, trainable=False)
    res = evaluate_model(model, tok, examples, **kw)
    res["model"] = model_dir
    res["data"] = data
    storage.atomic_write(out, lambda f: f.write(json.dumps(res, indent=2).encode("utf-8")))
    return res
