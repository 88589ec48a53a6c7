"""What a run reports: ``OUT/metrics.jsonl`` (every step) and progress (a bar, or log lines).

Progress goes to stderr on the main process. On a terminal it is a tqdm bar; otherwise (a log
file, CI) a bar would write a carriage-return update per step, so it is one line every N steps
instead, as Hugging Face's Trainer logs every ``logging_steps``::

    kd: step 40/200 | loss 1.234 | lr 4.6e-05 | 3.1 steps/s | 13s elapsed
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, TextIO

from . import storage

POSTFIX_KEYS = ("loss", "reward", "lr")  # shown with the bar / in each line, when present


def notice(text: str, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
    """A line for the user on stderr (``kdext distill: warning: ...``), main process only."""
    if enabled:
        print(f"kdext distill: {text}", file=stream if stream is not None else sys.stderr, flush=True)


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl (main process only)."""

    def __init__(self, path: str, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            # Drop records from beyond the checkpoint we resume from (or all, on a fresh run),
            # so the file describes exactly one run. Rewritten atomically: a kill here loses nothing.
            keep = []
            if resume_step > 0:
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if rec.get("step", 0) <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
            storage.atomic_write(path, lambda f: f.write("".join(keep).encode("utf-8")))

    def write(self, record: dict) -> None:
        if self.enabled:
            storage.append_line(self.path, json.dumps(record) + "\n")


def default_log_every(max_steps: int) -> int:
    """About 20 progress lines per run."""
    return max(1, max_steps // 20)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Training progress: a tqdm bar when ``stream`` is a terminal, else a line every ``every``
    steps (and at the last step). ``enabled`` False: nothing at all."""

    def __init__(self, desc: str, total: int, initial: int, end: int, enabled: bool, every: int,
                 stream: Optional[TextIO] = None):
        self.desc, self.total, self.end, self.every = desc, total, end, every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream)
        self._t0 = self._t_last = time.time()
        self._step_last = initial

    def update(self, step: int, rec: dict) -> None:
        """Step ``step`` (1-based) is done; ``rec`` is its metrics record."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{rec[k]:.4g}" for k in POSTFIX_KEYS if k in rec})
        elif self.enabled and (step % self.every == 0 or step == self.end):
            self.stream.write(self.line(step, rec) + "\n")
            self.stream.flush()

    def line(self, step: int, rec: dict) -> str:
        now = time.time()
        speed = (step - self._step_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._step_last = now, step
        parts = [f"{self.desc}: step {step}/{self.total}"]
        parts += [f"{k} {rec[k]:.4g}" for k in POSTFIX_KEYS if k in rec]
        parts += [f"{speed:.3g} steps/s", f"{now - self._t0:.0f}s elapsed"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
