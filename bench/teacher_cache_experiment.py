"""The offline teacher at demo size: kd and rkl from the live teacher and from caches of k = 8,
32, 64 and V, side by side (issue 11's evidence).

    python bench/teacher_cache_experiment.py --out /tmp/tc_exp [--quick] [--steps N] [--ks 8,32,64,V]

The setting is the demo's (kdext/train/demo.py): its synthetic task, tokenizer, a Llama teacher
trained from scratch with sft and a student of under a quarter of its size warmed up with sft;
then every run distils the same warm start with the same seed and data order, from the live
teacher (``--teacher``) or from a cache (``--teacher-cache``, fp16, ``--sparse-tail bucket``;
k = V is stored fp32, the exact case). Each student is scored on the held-out prompts (Rouge-L,
exact match: the sampled answer is one of the valid ones). Reported per run: the scores, the
training time per step (with the teacher's forward in the loop, or the cache read instead),
and per cache its capture time and size. Writes OUT/results.json and OUT/results.md (the
table, the command and the machine).

Not yet run at full size: on the shared 2-core CPU machine it was written on, the demo budget's
teacher (1500 sft steps) alone took over 9.5 minutes, so no results are in bench/results yet;
``--quick`` (about a minute) only checks that every step runs — its scores mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdext.train import demo, task  # noqa: E402
from kdext.train.config import CacheConfig, MethodConfig, TrainConfig  # noqa: E402
from kdext.train.data import load_jsonl, write_jsonl  # noqa: E402
from kdext.train.evaluate import evaluate_model  # noqa: E402
from kdext.train.models import load_model, load_tokenizer  # noqa: E402
from kdext.train.teacher_cache import capture  # noqa: E402
from kdext.train.trainer import train  # noqa: E402

P, R = 32, 16  # the demo's --max-prompt-len / --max-response-len


def train_run(out, method, student, data, b: demo.Budget, steps, seed, teacher=None, cache=None):
    cfg = TrainConfig(method=method, student=student, teacher=teacher, teacher_cache=cache, data=data, out=out,
                      template=demo.TEMPLATE, max_steps=steps, batch_size=b.method_batch, lr=b.method_lr,
                      warmup_steps=max(1, steps // 20), max_prompt_len=P, max_response_len=R, seed=seed,
                      device="cpu", progress=False, method_cfg=MethodConfig(max_new_tokens=b.max_new_tokens))
    return train(cfg)


def score(folder, eval_path, b: demo.Budget, seed) -> dict:
    model = load_model(folder, "--model", torch.device("cpu"), trainable=False)
    res = evaluate_model(model, load_tokenizer(folder, "--model"), load_jsonl(eval_path, demo.TEMPLATE),
                         max_new_tokens=b.max_new_tokens, max_prompt_len=P, max_response_len=R, seed=seed)
    return {"rougeL": round(res["rougeL"], 2), "exact_match": round(res["exact_match"], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="the demo's quick budget (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="distillation steps per run (default: the budget's)")
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--ks", default="8,32,64,V")
    ap.add_argument("--methods", default="kd,rkl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    b = demo.Budget.quick() if args.quick else demo.Budget()
    steps = args.steps or b.method_steps
    t_steps, w_steps = args.teacher_steps or b.teacher_steps, args.warmup_steps or b.warmup_steps
    out, t_start = os.path.abspath(args.out), time.time()
    os.makedirs(out, exist_ok=True)

    def log(text):
        print(f"[{time.time() - t_start:6.0f}s] {text}", file=sys.stderr, flush=True)

    train_recs, held_out = task.make_task(b.n_train, b.n_eval, seed=args.seed)
    train_path, eval_path = os.path.join(out, "train.jsonl"), os.path.join(out, "eval.jsonl")
    write_jsonl(train_path, train_recs)
    write_jsonl(eval_path, held_out)
    tok = demo.train_tokenizer(task.corpus(), b.vocab_size, os.path.join(out, "tokenizer"))
    V = len(tok)
    t_init, s_init = os.path.join(out, "teacher_init"), os.path.join(out, "student_init")
    demo.save_new_model(demo.llama_config(V, hidden=128, layers=4, heads=4, ffn=384), tok, t_init, args.seed)
    demo.save_new_model(demo.llama_config(V, hidden=64, layers=2, heads=4, ffn=160), tok, s_init, args.seed + 1)
    log(f"training the teacher ({t_steps} steps) ...")
    teacher = train(TrainConfig(method="sft", student=t_init, data=train_path, out=os.path.join(out, "teacher"),
                                template=demo.TEMPLATE, max_steps=t_steps, batch_size=b.teacher_batch,
                                lr=b.teacher_lr, warmup_steps=max(1, t_steps // 20), max_prompt_len=P,
                                max_response_len=R, seed=args.seed, device="cpu", progress=False))["final"]
    log(f"student warm start ({w_steps} steps) ...")
    start = train_run(os.path.join(out, "warm"), "sft", s_init, train_path, b, w_steps, args.seed)["final"]

    caches = {}
    for k in args.ks.split(","):
        kk, dtype = (V, "fp32") if k == "V" else (int(k), "fp16")
        folder = os.path.join(out, f"cache_k{k}")
        t0 = time.time()
        capture(CacheConfig(teacher=teacher, data=train_path, out=folder, k=kk, dtype=dtype, template=demo.TEMPLATE,
                            max_prompt_len=P, max_response_len=R, batch_size=64, device="cpu", progress=False))
        with open(os.path.join(folder, "manifest.json")) as f:
            m = json.load(f)
        caches[k] = {"folder": folder, "k": kk, "dtype": dtype, "capture_s": round(time.time() - t0, 2),
                     "bytes": m["bytes"], "tokens": m["tokens"], "bytes_per_position": m["bytes_per_position"]}
        log(f"cache k = {k}: {m['bytes']} bytes, {m['bytes_per_position']} per position, "
            f"{caches[k]['capture_s']} s")

    rows = [{"run": "teacher", **score(teacher, eval_path, b, args.seed)},
            {"run": "warm start", **score(start, eval_path, b, args.seed)}]
    for method in args.methods.split(","):
        for src in ["live"] + list(caches):
            name = f"{method} {src if src == 'live' else 'k=' + src}"
            kw = {"teacher": teacher} if src == "live" else {"cache": caches[src]["folder"]}
            r = train_run(os.path.join(out, "runs", name.replace(" ", "_")), method, start, train_path, b, steps,
                          args.seed, **kw)
            row = {"run": name, **score(r["final"], eval_path, b, args.seed),
                   "ms_per_step": round(1000 * r["train_seconds"] / steps, 1)}
            rows.append(row)
            log(json.dumps(row))

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    command = "python bench/teacher_cache_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "machine": machine, "steps": steps, "teacher_steps": t_steps,
              "warmup_steps": w_steps, "vocab": V, "runs": rows, "caches": caches,
              "wall_s": round(time.time() - t_start, 1)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Teacher {t_steps} sft steps, student warm start {w_steps}, {steps} distillation steps per run, "
             f"V = {V}; total {result['wall_s']:.0f} s.", "",
             "| run | Rouge-L | exact match | ms / step |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['rougeL']} | {r['exact_match']} | {r.get('ms_per_step', '')} |" for r in rows]
    lines += ["", "| cache | dtype | bytes | positions | bytes / position | capture s |", "|---|---|---|---|---|---|"]
    lines += [f"| k = {k} | {c['dtype']} | {c['bytes']} | {c['tokens']} | {c['bytes_per_position']} | "
              f"{c['capture_s']} |" for k, c in caches.items()]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
