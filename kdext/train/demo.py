"""``kdext demo``: the whole pipeline on an embedded task, in minutes, with nothing downloaded.

1. build the synthetic instruction task (task.py) and write it as JSONL;
2. train a byte-level BPE tokenizer on it (``tokenizers``);
3. train a small Llama-style teacher from scratch (the trainer's ``sft`` method, no teacher);
4. give a student of under a quarter of the teacher's parameters a short SFT warm start (the
   usual starting point of MiniLLM and GKD), then continue it with each of the seven methods
   for the same number of steps (every method at its defaults, MiniLLM's and DistiLLM's being
   their official code's), plus MiniLLM in the paper's form (the options that give it, which is
   also what kdext ran before it followed LMOps), and then the best of those again with feature
   (hidden-state) distillation added;
5. score the teacher, the warm start and every distilled student on held-out prompts, and write
   ``report.json``, ``report.md`` and PNG plots; print the table.

Everything goes through the same code as ``kdext distill`` / ``kdext eval`` (in-process, to save
the start-up time of a subprocess per run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from . import task
from .data import write_jsonl
from .config import MethodConfig, TrainConfig
from .methods import METHODS

TEMPLATE = "{prompt}\n"


@dataclasses.dataclass
class Budget:
    """Sizes and step counts; the defaults fit the 10-minute target on 2 CPU cores."""

    n_train: int = 4000
    n_eval: int = 300
    n_dev: int = 100  # validation prompts (DistiLLM's schedule), apart from the scored ones
    vocab_size: int = 400
    teacher_steps: int = 1500
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    warmup_steps: int = 1000  # student SFT warm start
    method_steps: int = 400
    method_batch: int = 16
    method_lr: float = 1e-3
    max_new_tokens: int = 8

    @classmethod
    def quick(cls) -> "Budget":
        return cls(n_train=300, n_eval=24, n_dev=8, teacher_steps=30, warmup_steps=5, method_steps=4,
                   method_batch=8)


# ---------------------------------------------------------------------------------------------
# Building blocks, also used by the tests


def train_tokenizer(texts, vocab_size: int, out_dir: str):
    """A byte-level BPE tokenizer with <pad> and <eos>, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, ffn: int, max_pos: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )


def gpt2_config(vocab_size: int, hidden: int, layers: int, heads: int, max_pos: int = 128):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_pos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )


def save_new_model(config, tokenizer, out_dir: str, seed: int) -> int:
    """Randomly initialise a causal LM from ``config``, save it with the tokenizer; returns #params."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The demo


def _train(out, method, student, data, budget: Budget, steps, batch, lr, seed, device, teacher=None,
           progress=True, eval_data=None, **mkw):
    from .trainer import train

    mcfg = MethodConfig(max_new_tokens=budget.max_new_tokens, **mkw)
    cfg = TrainConfig(
        method=method, student=student, teacher=teacher, data=data, out=out, template=TEMPLATE, eval_data=eval_data,
        max_steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 20), max_grad_norm=1.0,
        max_prompt_len=32, max_response_len=16, seed=seed, device=device, method_cfg=mcfg, progress=progress,
    )
    return train(cfg)


def _read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _job(job: dict) -> dict:
    """One pool job: (optionally) distill a student with one method, then evaluate the model.

    Runs in a worker process on CPU (one thread each: these models are too small for
    intra-op threads to pay, and two single-threaded workers use two cores fully).
    """
    from .data import load_jsonl
    from .evaluate import evaluate_model
    from .models import load_model, load_tokenizer

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    b: Budget = job["budget"]
    seconds = job.get("seconds", 0.0)
    folder = job["model"]
    if job.get("method"):
        m = job["method"]
        # DistiLLM's schedule reads a validation loss: the dev prompts, never the scored ones.
        r = _train(os.path.join(job["runs"], job["name"]), m, job["model"], job["train_path"], b, b.method_steps,
                   b.method_batch, b.method_lr, job["seed"], job["device"],
                   teacher=None if m == "sft" else job["teacher"], progress=False,
                   eval_data=job["dev_path"] if m == "distillm" else None, **job.get("mkw", {}))
        folder, seconds = r["final"], r["train_seconds"]
    dev = torch.device("cuda" if job["device"] == "cuda" else "cpu")
    model = load_model(folder, job["name"], dev, trainable=False)
    tok = load_tokenizer(folder, job["name"])
    res = evaluate_model(model, tok, load_jsonl(job["eval_path"], TEMPLATE), max_new_tokens=b.max_new_tokens,
                         max_prompt_len=32, max_response_len=16, seed=job["seed"])
    os.makedirs(os.path.join(job["runs"], job["name"]), exist_ok=True)
    with open(os.path.join(job["runs"], job["name"], "eval_samples.json"), "w") as f:
        json.dump(res["samples"], f, indent=1)
    return {"name": job["name"], "rougeL": round(res["rougeL"], 2), "exact_match": round(res["exact_match"], 2),
            "ece": round(res["ece"], 4), "train_seconds": round(seconds, 1)}


# Rough relative cost of each run (sampling is the expensive part); the pool starts the
# slowest first so the two workers finish together.
_COST = {"minillm_paper": 6, "minillm": 5, "gkd": 3, "seqkd": 3, "kd": 2, "rkl": 2, "distillm": 2, "sft": 1}

# MiniLLM in the paper's form (Gu et al., section 2): returns R_{t+1} of the rewards after t,
# no discount or whitening, w_t outside PPO's clip and on the single-step term, unscaled
# rewards, one optimizer step per rollout batch, global token means. This is also what kdext's
# minillm computed before it followed LMOps' code.
MINILLM_PAPER = dict(returns="paper", whiten="off", pg_clip="ratio", single_step_weight=True, gamma=1.0,
                     reward_scaling=1.0, cliprange_reward=0.0, ppo_epochs=1, token_mean="global")

# The demo's runs: (row name, method, method options). Every method at its defaults, then the
# paper form of MiniLLM; the best of these is rerun with feature distillation (HIDDEN_KW).
RUNS: list[tuple[str, str, dict]] = [(m, m, {}) for m in METHODS] + [("minillm_paper", "minillm", MINILLM_PAPER)]
# Feature distillation added to the best run: student blocks 1, 2 to teacher blocks 2, 4 (the
# default layer map), mean squared error through the learned projection. The weight was chosen
# on the dev prompts (data/dev.jsonl, never the scored ones), with rkl, among cosine 0.1 / 1 and
# MSE 0.001 / 0.01 (Rouge-L 90.0, 90.7, 91.2, 93.1; 91.5 without): the teacher's hidden states
# are large (the MSE starts near 150), so a weight of 1 swamps the divergence (29 Rouge-L).
HIDDEN_KW = dict(hidden_coef=0.01, hidden_loss="mse")


def run_demo(out: str, device: str = "auto", seed: int = 0, quick: bool = False, workers: int | None = None) -> dict:
    t_start = time.time()
    budget = Budget.quick() if quick else Budget()
    from .distributed import use_cuda

    cuda = use_cuda(device)
    dev_name = "cuda" if cuda else "cpu"
    if workers is None:
        workers = 1 if cuda else max(1, min(2, os.cpu_count() or 1))
    threads = 0 if cuda else 1
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    _clear_previous(out)
    log = _Logger(os.path.join(out, "demo.log"))
    log(f"kdext demo -> {out} (device {dev_name}; {workers} worker process(es) for the methods)")

    # 1-2. data and tokenizer
    # The held-out prompts come one after another from the task's generator, so the first
    # n_eval (the scored ones) are the same whatever n_dev is; the next n_dev are the dev set.
    train_recs, held_out = task.make_task(budget.n_train, budget.n_eval + budget.n_dev, seed=seed)
    eval_recs, dev_recs = held_out[: budget.n_eval], held_out[budget.n_eval :]
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path, eval_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "eval.jsonl")
    dev_path = os.path.join(data_dir, "dev.jsonl")
    write_jsonl(train_path, train_recs)
    write_jsonl(eval_path, eval_recs)
    write_jsonl(dev_path, dev_recs)
    tok = train_tokenizer(task.corpus(), budget.vocab_size, os.path.join(out, "tokenizer"))
    log(f"task: {len(train_recs)} training examples, {len(eval_recs)} held-out prompts; BPE vocabulary {len(tok)}")

    # 3. teacher from scratch
    models_dir = os.path.join(out, "models")
    t_cfg = llama_config(len(tok), hidden=128, layers=4, heads=4, ffn=384)
    s_cfg = llama_config(len(tok), hidden=64, layers=2, heads=4, ffn=160)
    n_teacher = save_new_model(t_cfg, tok, os.path.join(models_dir, "teacher_init"), seed)
    n_student = save_new_model(s_cfg, tok, os.path.join(models_dir, "student_init"), seed + 1)
    if n_student * 4 > n_teacher:
        raise AssertionError(f"student ({n_student}) must have at most 1/4 of the teacher's parameters ({n_teacher})")
    log(f"teacher {n_teacher:,} parameters, student {n_student:,} ({n_student / n_teacher:.1%} of the teacher)")
    runs = os.path.join(out, "runs")
    log(f"training the teacher ({budget.teacher_steps} steps) ...")
    r = _train(os.path.join(runs, "teacher"), "sft", os.path.join(models_dir, "teacher_init"), train_path, budget,
               budget.teacher_steps, budget.teacher_batch, budget.teacher_lr, seed, dev_name)
    teacher_dir, teacher_s = r["final"], r["train_seconds"]
    log(f"teacher trained in {teacher_s:.0f}s (final loss {r['last']['loss']:.3f})")

    # 4. student warm start
    r = _train(os.path.join(runs, "student_init"), "sft", os.path.join(models_dir, "student_init"), train_path,
               budget, budget.warmup_steps, budget.method_batch, budget.method_lr, seed, dev_name)
    start_dir, start_s = r["final"], r["train_seconds"]
    log(f"student SFT warm start ({budget.warmup_steps} steps) in {start_s:.0f}s")

    # 5. every method from the warm start, and every evaluation, on the worker pool
    common = dict(budget=budget, runs=runs, train_path=train_path, eval_path=eval_path, dev_path=dev_path,
                  seed=seed, device=dev_name, threads=threads, teacher=teacher_dir)
    jobs = [dict(common, name="teacher", model=teacher_dir, seconds=teacher_s),
            dict(common, name="student_init", model=start_dir, seconds=start_s)]
    jobs += [dict(common, name=name, method=m, model=start_dir, mkw=kw) for name, m, kw in RUNS]
    order = sorted(jobs, key=lambda j: -_COST.get(j["name"], 0))
    names = [name for name, _, _ in RUNS]
    log(f"distilling with {', '.join(names)} ({budget.method_steps} steps each) and evaluating ...")
    results = {}

    def done(res):
        results[res["name"]] = res
        trained = f"trained in {res['train_seconds']:.0f}s, " if res["name"] not in ("teacher", "student_init") else ""
        log(f"  {res['name']}: {trained}Rouge-L {res['rougeL']:.1f}, exact match {res['exact_match']:.1f}%")

    for res in _run_jobs(order, workers):
        done(res)
    # the best run again, with feature distillation added
    best = best_student({n: results[n] for n in names})
    best_method, best_kw = next((m, kw) for n, m, kw in RUNS if n == best)
    hidden_name = f"{best}+hidden"
    log(f"{hidden_name}: {best} with feature distillation added ...")
    for res in _run_jobs([dict(common, name=hidden_name, method=best_method, model=start_dir,
                               mkw={**best_kw, **HIDDEN_KW})], 1):
        done(res)
    names.append(hidden_name)

    # 6. report
    report = {}
    for name in ["teacher", "student_init", *names]:
        r = dict(results[name])
        r.pop("name")
        r["params"] = n_teacher if name == "teacher" else n_student
        report[name] = r
    total = time.time() - t_start
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(report, budget, total, dev_name))
    plot(out, report, runs)
    log("\n" + report_table(report))
    log(f"best student by Rouge-L: {best_student(report)}")
    log(f"demo finished in {time.time() - t_start:.0f}s; report: {os.path.join(out, 'report.md')}")
    return report


_OUTPUTS = ("data", "tokenizer", "models", "runs", "report.json", "report.md", "training_curves.png",
            "scores.png", "demo.log")


def _clear_previous(out: str) -> None:
    """A rerun replaces the demo's own outputs (and nothing else in the folder)."""
    import shutil

    for name in _OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _run_jobs(jobs: list[dict], workers: int):
    """Yield job results as they finish: in-process for one worker, else a spawn process pool."""
    if workers <= 1:
        for j in jobs:
            yield _job(j)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_job, j) for j in jobs]
        for f in cf.as_completed(futures):
            yield f.result()


def best_student(report: dict) -> str:
    students = {k: v for k, v in report.items() if k not in ("teacher", "student_init")}
    return max(students, key=lambda k: (students[k]["rougeL"], students[k]["exact_match"]))


def report_table(report: dict) -> str:
    rows = ["| model | Rouge-L | exact match (%) | ECE | train s |", "|---|---:|---:|---:|---:|"]
    for name, r in report.items():
        rows.append(f"| {name} | {r['rougeL']:.1f} | {r['exact_match']:.1f} | {r['ece']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)


def report_markdown(report: dict, budget: Budget, total: float, dev: str) -> str:
    best = best_student(report)
    em = report[best]["exact_match"]
    se = 100 * ((em / 100) * (1 - em / 100) / budget.n_eval) ** 0.5
    return (
        "# kdext demo report\n\n"
        f"Device: {dev}; total wall time {total:.0f}s. Teacher {report['teacher']['params']:,} parameters, "
        f"student {report['sft']['params']:,}. Every run continues the same SFT warm start for "
        f"{budget.method_steps} steps of batch {budget.method_batch}: each method at its defaults "
        "(MiniLLM's and DistiLLM's are their official code's), `minillm_paper` MiniLLM in the paper's form, "
        "and `<best>+hidden` the best of those with feature distillation added. Scores are on "
        f"{budget.n_eval} held-out prompts with sampled responses (temperature 1), every valid answer a "
        "reference.\n\n"
        + report_table(report)
        + f"\n\nBest student by Rouge-L: **{best}**. One standard error of an exact-match rate near "
        f"{em:.0f}% on {budget.n_eval} prompts is about {se:.1f} points; smaller gaps are noise.\n"
    )


def plot(out: str, report: dict, runs: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in report if k not in ("teacher", "student_init")]
    curves = ["teacher"] + names
    rows = -(-len(curves) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3.5 * rows))
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, curves):
        recs = [r for r in _read_metrics(os.path.join(runs, name, "metrics.jsonl")) if "loss" in r]
        steps = [r["step"] for r in recs]
        ax.plot(steps, [r["loss"] for r in recs], lw=0.5, color="tab:blue", alpha=0.35)
        ax.plot(steps, _smooth([r["loss"] for r in recs]), lw=1.5, color="tab:blue")
        if name.startswith("minillm") and recs and "reward" in recs[0]:
            ax2 = ax.twinx()
            ax2.plot(steps, _smooth([r["reward"] for r in recs]), color="tab:orange", lw=1.5)
            ax2.set_ylabel("reward, LMOps' logged form (orange)")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_curves.png"), dpi=80)
    plt.close(fig)

    models = list(report)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in zip(axes, ("rougeL", "exact_match", "ece"), ("Rouge-L", "exact match (%)", "ECE (lower is better)")):
        ax.bar(models, [report[m][key] for m in models], color=["gray", "lightgray"] + ["tab:blue"] * len(names))
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scores.png"), dpi=80)
    plt.close(fig)


def _smooth(xs, beta: float = 0.95):
    """Bias-corrected exponential moving average (the curves are per-step and noisy)."""
    out, m = [], 0.0
    for i, x in enumerate(xs, start=1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta**i))
    return out


class _Logger:
    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")
