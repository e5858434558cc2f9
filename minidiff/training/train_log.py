"""``train_log.jsonl``: one line ``{"step": k, "loss": x}`` per optimizer step, appended and flushed as training goes.

Resuming from a checkpoint at step ``s`` never rewrites the log:

- the lines of steps 1..s stay exactly as they are;
- steps the log lacks (a deleted log, or a checkpoint resumed into a new output folder) are appended from the
  checkpoint's per-step losses;
- only the lines of steps after ``s`` are cut (and a torn last line of a killed run): those are the steps the resumed
  run trains again, and writes again, with the same losses (the data order and noise depend only on the step).
  A resume that would not re-run all of them (``max_train_steps`` below the last logged step) is refused.

The log is read (and checked) by :func:`plan_resume` before anything is written; :func:`continue_log` applies it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

LOG_NAME = "train_log.jsonl"


@dataclass
class ResumePlan:
    keep_bytes: int  # the log's first bytes to keep: the lines of steps 1..min(s, logged)
    append: list[tuple[int, float]]  # (step, loss) lines to add after them


def plan_resume(path: str, losses: list[float], max_train_steps: int) -> ResumePlan:
    """How to continue the log ``path`` from a checkpoint whose per-step losses are ``losses``; reads only."""
    step = len(losses)
    kept_lines, keep_bytes, last_logged = 0, 0, 0
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):  # torn by a kill mid-write: a step after every checkpoint
                    break
                _check_line(path, number, line)
                last_logged = number
                if number <= step:
                    kept_lines, keep_bytes = number, keep_bytes + len(line)
    if last_logged > max_train_steps and last_logged > step:
        raise ValueError(f"{path} logs steps up to {last_logged}, but resuming from step {step} with "
                         f"max_train_steps={max_train_steps} would drop the lines of steps "
                         f"{max(step, max_train_steps) + 1}-{last_logged} without re-running them; pass "
                         f"--max-train-steps {last_logged} (or more)")
    return ResumePlan(keep_bytes, [(k, losses[k - 1]) for k in range(kept_lines + 1, step + 1)])


def _check_line(path: str, number: int, line: bytes) -> None:
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        entry = None
    if not isinstance(entry, dict) or entry.get("step") != number or "loss" not in entry:
        raise ValueError(f"{path} line {number} is not {{\"step\": {number}, \"loss\": ...}}: the log is damaged; "
                         "move it away and resume again (the log is rebuilt from the checkpoint's losses)")


def continue_log(path: str, plan: ResumePlan) -> None:
    """Cut the log after ``plan.keep_bytes`` (never earlier) and append ``plan.append``."""
    with open(path, "ab") as handle:
        handle.truncate(plan.keep_bytes)
        for step, loss in plan.append:
            handle.write(log_line(step, loss).encode("utf-8"))


def log_line(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss}) + "\n"
