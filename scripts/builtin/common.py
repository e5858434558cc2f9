"""What both training stages share: one CPU thread, a run folder with a loss log, atomic checkpoints and resume
(minidiff.training.checkpoint), and the seeded batch order of minidiff.training.data."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch

from minidiff.training import checkpoint
from minidiff.training.data import global_batch_indices, sample_generators, seed_from
from minidiff.training.loop import lr_factor


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (trial runs)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/builtin/<stage>)")
    parser.add_argument("--vae", default=None, help="stage 2: the trained VAE folder (default: runs/builtin/vae/final)")
    return parser.parse_args()


class Run:
    """A run folder: ``train_log.jsonl`` (one line per step), ``checkpoints/checkpoint-NNNNNN`` with every model
    in ``models`` as a diffusers folder plus the optimizer, and the batches of each step. Runs to ``options["steps"]``
    (or ``--steps``, for trials)."""

    def __init__(self, folder: str, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 options: dict, args: argparse.Namespace, dataset_size: int):
        self.folder, self.models, self.optimizer, self.options = folder, models, optimizer, options
        self.last_step = min(args.steps or options["steps"], options["steps"])  # --steps: a shorter trial run
        self.dataset_size, self.step, self.started = dataset_size, 0, time.perf_counter()
        if args.resume:
            path = checkpoint.find_checkpoint("latest", folder)
            state = checkpoint.load_training_state(path, optimizer)
            trained = {k: v for k, v in state["options"].items() if k != "steps"}  # a run may be extended,
            wanted = {k: v for k, v in json.loads(json.dumps(options)).items() if k != "steps"}  # nothing else changes
            if trained != wanted:
                raise ValueError(f"{path} was trained with other settings: {trained} vs {wanted}")
            for name, model in models.items():
                checkpoint.load_model_weights(model, os.path.join(path, name))
            self.step, self.extra = state["step"], state["extra"]
            print(f"resumed from {path} at step {self.step}", flush=True)
        else:
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.makedirs(folder)
            self.extra = {}

    def batch(self, step: int) -> tuple[list[int], list[torch.Generator], list[np.random.Generator]]:
        """Dataset indices of ``step`` and, per sample, a torch generator (noise, timesteps, dropout) and a numpy
        one (captions), all seeded by (seed, step, position)."""
        size, seed = self.options["batch_size"], self.options["seed"]
        indices = global_batch_indices(self.dataset_size, size, step, seed)
        generators = sample_generators(seed, step, range(size))
        numpy_rngs = [np.random.default_rng(seed_from(seed, step, position, 1)) for position in range(size)]
        return indices, generators, numpy_rngs

    def set_learning_rate(self) -> None:
        """Warm-up then cosine decay, restarted every ``restart_every`` steps if set (SGDR's warm restarts,
        Loshchilov & Hutter 2017)."""
        o = self.options
        cycle = o.get("restart_every", o["steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = o["learning_rate"] * lr_factor(self.step % cycle, o["warmup_steps"], cycle, "cosine")

    def log(self, **values: float) -> None:
        self.step += 1
        entry = {"step": self.step, **values, "seconds": round(time.perf_counter() - self.started, 1)}
        with open(os.path.join(self.folder, "train_log.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.step % 25 == 0 or self.step == 1:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
                  flush=True)
        if self.step % self.options["checkpoint_every"] == 0 or self.step == self.last_step:
            self.save()

    def save(self) -> str:
        def write_models(folder: str) -> None:
            for name, model in self.models.items():
                model.save_pretrained(os.path.join(folder, name))

        state = {"options": self.options, "extra": self.extra, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        return checkpoint.save_checkpoint(self.folder, self.step, write_models, self.optimizer, state, keep=2)


def one_thread() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
