"""The training loop both trainers share (``ragline train rag`` and ``ragline train retriever``).

AdamW, linear warm-up then linear decay to 0, gradient accumulation, clipping by global norm; per-step
metrics in the run's CSV, validation every ``eval_every`` steps, a checkpoint every ``save_every`` steps
(trainable weights, optimiser, scheduler, RNG, step), and resume from the newest checkpoint. Models run in
eval mode (no dropout), and the batch of step s depends only on (seed, s), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragline.errors import RaglineError
from ragline.train.run import RunDir


@dataclass
class LoopConfig:
    """Settings every training run has."""
    train: str = "fanoutqa-dev"        # training file (JSONL / KILT) or 'fanoutqa-dev'
    index: str | None = None            # index directory (default: the bundled one)
    batch_size: int = 4
    accumulation: int = 1               # micro-batches per optimiser step
    steps: int = 100
    warmup: int = 10
    clip: float = 1.0                   # gradient clipping, global norm
    seed: int = 0
    val_fraction: float = 0.1           # held back from the training data for validation
    val_limit: int | None = 64          # validation examples scored at each evaluation
    eval_every: int = 20
    save_every: int = 20

    def check(self) -> None:
        for name in ("batch_size", "accumulation", "steps", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise RaglineError(f"{name} must be at least 1", f"pass a positive --{name.replace('_', '-')}")


def batch_indices(step: int, micro: int, batch_size: int, accumulation: int, seed: int, n: int) -> list[int]:
    """Example indices of micro-batch ``micro`` of ``step``: consecutive slices of per-epoch permutations
    drawn from (seed, epoch)."""
    start = (step * accumulation + micro) * batch_size
    out = []
    perms: dict[int, torch.Tensor] = {}
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class Trainer(ABC):
    """Subclasses set ``cfg`` (with steps, warmup, batch_size, accumulation, clip, seed, eval_every,
    save_every), ``run``, ``train_set`` and ``parts`` ({name: (module, learning rate)}), then call
    :meth:`setup_optimiser`."""

    cfg: Any
    run: RunDir
    train_set: list
    parts: dict[str, tuple[torch.nn.Module, float]]
    log: Callable[[str], None]
    progress: bool

    def trainable_signature(self) -> str:
        """A hash of the trained parameters' names and shapes, part by part: a checkpoint of another
        training setup does not match it."""
        h = hashlib.blake2b(digest_size=12)
        for part, (m, _) in self.parts.items():
            for n, p in trainable(m).items():
                h.update(f"{part}:{n}:{tuple(p.shape)};".encode())
        return h.hexdigest()

    def setup_optimiser(self, identity: dict) -> None:
        groups = [{"params": list(trainable(m).values()), "lr": lr} for m, lr in self.parts.values() if trainable(m)]
        if not groups:
            raise RaglineError("nothing to train: every part is frozen", "unfreeze a part")
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        cfg = self.cfg
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
        self.identity = identity

    @abstractmethod
    def loss(self, batch: list, grad: bool) -> torch.Tensor:
        """Mean training loss of ``batch`` (a scalar tensor, with a graph when ``grad``)."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Validation metrics, {name: value} (may be empty)."""

    @abstractmethod
    def export(self) -> Path:
        """Write the trained models for use by path; returns where."""

    def state(self) -> dict:
        return {"identity": self.identity, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "weights": {part: {n: p.detach().clone() for n, p in trainable(m).items()}
                            for part, (m, _) in self.parts.items()}}

    def restore(self, state: dict) -> None:
        with torch.no_grad():
            for part, (m, _) in self.parts.items():
                params = trainable(m)
                for n, t in state["weights"][part].items():
                    params[n].copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def run_training(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        state = self.run.load(self.identity)
        start = 0
        if state is not None:
            self.restore(state)
            start = state["step"]
            self.run.truncate_metrics(start)
            self.log(f"resuming {self.run.path} at step {start} of {cfg.steps}")
        else:  # a fresh start: rows of an earlier attempt that left no checkpoint would be logged twice
            self.run.truncate_metrics(-1)
            self.log(f"training on {len(self.train_set)} examples")
            self.run.log([(0, "validation", name, v) for name, v in self.validate().items()])
        last = math.nan
        with tqdm(total=cfg.steps, initial=start, disable=not self.progress, unit="step") as bar:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                self.opt.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(cfg.accumulation):
                    idx = batch_indices(step, micro, cfg.batch_size, cfg.accumulation, cfg.seed, len(self.train_set))
                    loss = self.loss([self.train_set[i] for i in idx], grad=True) / cfg.accumulation
                    loss.backward()
                    total += float(loss.detach())
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
                lr = self.opt.param_groups[0]["lr"]
                self.opt.step()
                self.sched.step()
                done = step + 1
                rate = 1.0 / (time.perf_counter() - t0)
                rows = [(done, "train", "loss", total), (done, "train", "lr", lr),
                        (done, "train", "grad_norm", float(norm)), (done, "train", "steps_per_s", rate)]
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    rows += [(done, "validation", name, v) for name, v in self.validate().items()]
                self.run.log(rows)
                last = total
                bar.set_postfix(loss=f"{total:.3f}", steps_s=f"{rate:.2f}")
                bar.update(1)
                if done % cfg.save_every == 0 or done == cfg.steps:
                    self.run.save(done, self.state())
        self.run.plot()
        return {"steps": cfg.steps, "last_loss": last, "final": str(self.export())}
