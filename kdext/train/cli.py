"""The ``kdext`` command line: ``kdext distill``, ``kdext eval``, ``kdext demo``.

Run ``kdext distill --help`` for every option. Under ``torchrun`` the distill command runs data
parallel (DDP): ``torchrun --nproc_per_node 2 -m kdext.train.cli distill ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .data import DEFAULT_TEMPLATE  # noqa: E402
from .methods import METHODS  # noqa: E402

EXIT_DIVERGED = 3
EXIT_USAGE = 2


def _add_distill(sub):
    p = sub.add_parser(
        "distill",
        help="distill a teacher into a student",
        description="Distill --teacher into --student on --data with --method; writes OUT/final, "
        "OUT/metrics.jsonl and OUT/checkpoints/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--method", required=True, choices=METHODS)
    g.add_argument("--teacher", help="teacher model folder (save_pretrained); not needed for sft")
    g.add_argument("--student", required=True, help="student model folder (with its tokenizer)")
    g.add_argument("--data", required=True, help="JSONL: prompt/response or instruction/context/response")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--eval-data", help="JSONL scored at the end (and every --eval-every steps)")
    g.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template; {prompt} is replaced")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--max-prompt-len", type=int, default=256)
    g.add_argument("--max-response-len", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("method options")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of losses and sampling")
    g.add_argument("--alpha", type=float, default=None,
                   help="minillm: teacher mix in sampling (default 0.2); distillm: skew (default 0.1)")
    g.add_argument("--beta", type=float, default=0.5, help="gkd: JSD beta (0 forward KL, 1 reverse KL)")
    g.add_argument("--lam", type=float, default=0.5, help="gkd: fraction of steps on student samples")
    g.add_argument("--lm-coef", type=float, default=0.0,
                   help="weight of an LM loss on the data's responses added to the method's loss "
                        "(MiniLLM's pretraining-loss term when --data holds LM data)")
    g.add_argument("--skew", default="skew_forward_kl", choices=["skew_forward_kl", "skew_reverse_kl"],
                   help="distillm: which skew divergence")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus of sampled rollouts")
    g.add_argument("--top-k", type=int, default=0, help="top-k of sampled rollouts (0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="rollout / evaluation length limit")
    g.add_argument("--gamma", type=float, default=1.0, help="minillm: reward discount")
    g.add_argument("--clip-eps", type=float, default=0.2, help="minillm: PPO clip range")
    g.add_argument("--ppo-epochs", type=int, default=1, help="minillm: optimizer steps per rollout batch")

    g = p.add_argument_group("run control")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--eval-max-examples", type=int, default=256)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as if preempted; --resume continues")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="score a model: Rouge-L, exact match, calibration",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model folder (with its tokenizer)")
    p.add_argument("--data", required=True, help="JSONL; 'response' may be a list of valid references")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-response-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_demo(sub):
    p = sub.add_parser("demo", help="the self-contained demo: teacher, 7 methods, report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that train the methods side by side (default: 2 on CPU, 1 on GPU)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdext", description="Distill language models with kdext's fused ops.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_distill(sub)
    _add_eval(sub)
    _add_demo(sub)
    return p


def distill_config(a: argparse.Namespace):
    from .methods import MethodConfig
    from .trainer import TrainConfig

    mcfg = MethodConfig(
        temperature=a.temperature, alpha=a.alpha, beta=a.beta, lam=a.lam, lm_coef=a.lm_coef, top_p=a.top_p,
        top_k=a.top_k, max_new_tokens=a.max_new_tokens, gamma=a.gamma, clip_eps=a.clip_eps,
        ppo_epochs=a.ppo_epochs, skew=a.skew, seed=a.seed,
    )
    return TrainConfig(
        method=a.method, student=a.student, teacher=a.teacher, data=a.data, out=a.out, eval_data=a.eval_data,
        template=a.template, max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, schedule=a.schedule,
        min_lr_ratio=a.min_lr_ratio, max_grad_norm=a.max_grad_norm, max_prompt_len=a.max_prompt_len,
        max_response_len=a.max_response_len, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints,
        eval_every=a.eval_every, eval_max_examples=a.eval_max_examples, resume=a.resume, stop_after=a.stop_after,
        seed=a.seed, device=a.device, bf16=not a.no_bf16, progress=not a.no_progress, method_cfg=mcfg,
    )


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .data import DataError
    from .models import ModelError
    from .trainer import TrainingDiverged

    try:
        if args.command == "distill":
            from .trainer import train

            summary = train(distill_config(args))
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps({k: v for k, v in summary.items() if k != "last"}, default=str))
        elif args.command == "eval":
            from .evaluate import evaluate_folder

            res = evaluate_folder(
                args.model, args.data, args.out, template=args.template, device=args.device,
                max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                max_response_len=args.max_response_len, seed=args.seed, temperature=args.temperature,
                top_p=args.top_p, greedy=args.greedy, batch_size=args.batch_size,
            )
            print(json.dumps({k: res[k] for k in ("rougeL", "exact_match", "ece", "n")}))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, device=args.device, seed=args.seed, quick=args.quick, workers=args.workers)
    except TrainingDiverged as e:
        print(f"kdext: training stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (DataError, ModelError, ValueError) as e:
        print(f"kdext {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
