"""The demo's embedded synthetic instruction-following task (nothing is downloaded).

Prompts are short instructions over a small world of words; most admit *several* valid responses
(any of the listed words, any fruit not excluded, any two distinct items, ...), a few exactly one.
Training responses are drawn uniformly from the valid set, so the teacher learns a distribution
over answers, and a student has to decide how to spend its small capacity: cover every answer
(forward KL, mode covering) or put its mass on answers that are certainly valid (reverse KL,
mode seeking). Evaluation lists *every* valid response as a reference, so exact match means
"the sampled answer is valid" and Rouge-L gives partial credit.
"""

from __future__ import annotations

import itertools
import random

CATEGORIES = {
    "fruit": ["apple", "pear", "plum", "fig", "kiwi", "lime", "grape", "peach"],
    "animal": ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee"],
    "color": ["red", "blue", "green", "pink", "gray", "gold", "tan", "teal"],
}
WORDS = [w for ws in CATEGORIES.values() for w in ws]
CATEGORY_OF = {w: c for c, ws in CATEGORIES.items() for w in ws}


def _pick_one(rng: random.Random):
    items = rng.sample(WORDS, 3)
    return f"pick one: {' '.join(items)}", list(items)


def _pick_two(rng: random.Random):
    items = rng.sample(WORDS, 4)
    return f"pick two: {' '.join(items)}", [f"{a} {b}" for a, b in itertools.permutations(items, 2)]


def _name_other(rng: random.Random):
    cat = rng.choice(sorted(CATEGORIES))
    # one or two excluded words from the category, plus distractors from the others
    k = rng.choice([1, 2])
    banned = rng.sample(CATEGORIES[cat], k) + rng.sample([w for w in WORDS if CATEGORY_OF[w] != cat], 3 - k)
    rng.shuffle(banned)
    return f"name a {cat} not in: {' '.join(banned)}", [w for w in CATEGORIES[cat] if w not in banned]


def _which(rng: random.Random):
    cat = rng.choice(sorted(CATEGORIES))
    target = rng.choice(CATEGORIES[cat])
    others = rng.sample([w for w in WORDS if CATEGORY_OF[w] != cat], 2)
    items = [target] + others
    rng.shuffle(items)
    return f"which is a {cat}: {' '.join(items)}", [target]


def _reverse(rng: random.Random):
    items = rng.sample(WORDS, 3)
    return f"reverse: {' '.join(items)}", [" ".join(reversed(items))]


TASKS = [_pick_one, _pick_two, _name_other, _which, _reverse]


def make_task(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train records with one sampled response each, held-out records listing every valid response).

    Held-out prompts never occur in the training set.
    """
    rng = random.Random(seed)
    train, seen = [], set()
    for i in range(n_train):
        prompt, valid = TASKS[i % len(TASKS)](rng)
        seen.add(prompt)
        train.append({"prompt": prompt, "response": rng.choice(valid)})
    evals, eval_seen = [], set()
    i = 0
    while len(evals) < n_eval:
        prompt, valid = TASKS[i % len(TASKS)](rng)
        i += 1
        if prompt in seen or prompt in eval_seen:
            continue
        eval_seen.add(prompt)
        evals.append({"prompt": prompt, "response": valid})
    return train, evals


def corpus() -> list[str]:
    """Text for training the tokenizer: every word and instruction phrase, in context."""
    train, _ = make_task(2000, 0, seed=12345)
    return [f"{r['prompt']}\n{r['response']}" for r in train]
