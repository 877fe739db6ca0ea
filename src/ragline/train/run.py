"""A training run directory.

    RUN/config.json            the run's settings (a rerun with the same RUN resumes; other settings are refused)
    RUN/checkpoints/step-N.pt  trainable weights, optimiser, scheduler, RNG states, step (the last two kept)
    RUN/checkpoints/latest     the name of the newest complete checkpoint
    RUN/metrics.csv            step, split, name, value (loss, learning rate, steps/s, validation metrics)
    RUN/curves.png             the curves of metrics.csv
    RUN/final/                 the trained models, loadable by path (``ragline ask --run RUN``)

Every file is written to a temporary name and renamed into place: an interruption, or a full disk, leaves
the previous checkpoint whole and ``latest`` pointing at it.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragline import atomic, runconfig
from ragline.errors import RaglineError

KEEP = 2


class RunDir:
    """A training run directory: config, atomic checkpoints (the last two kept), metrics, final models."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"

    def prepare(self, config: dict) -> None:
        """Create the run with ``config``, or check that it holds the same settings (resume)."""
        runconfig.prepare(self.path, config)
        self.ckpt_dir.mkdir(exist_ok=True)

    # --- checkpoints -----------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest checkpoint on disk. ``latest`` names it after every save; when that name is gone (the
        file deleted on the advice of an unreadable-checkpoint error, or the pointer lost in a crash) the
        newest remaining ``step-*.pt`` is taken, never a fresh start over a run that has checkpoints."""
        pointer = self.ckpt_dir / "latest"
        if pointer.is_file():
            path = self.ckpt_dir / pointer.read_text().strip()
            if path.is_file() and path.parent == self.ckpt_dir:
                return path
        found = sorted(self.ckpt_dir.glob("step-*.pt"))
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically, point ``latest`` at it, drop all but the newest ``KEEP``."""
        buf = io.BytesIO()
        torch.save({**state, "step": step, "rng": rng_state()}, buf)
        path = self.ckpt_dir / f"step-{step:07d}.pt"
        try:
            atomic.write_bytes(path, buf.getvalue())
            atomic.write_bytes(self.ckpt_dir / "latest", path.name.encode())
        except OSError as e:
            for tmp in self.ckpt_dir.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
            prev = self.latest()
            kept = f"the previous checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"
            reason = "the disk is full" if e.errno == errno.ENOSPC else os.strerror(e.errno or 0) or str(e)
            raise RaglineError(f"could not save checkpoint step {step} in {self.ckpt_dir} ({reason})",
                               f"free disk space and rerun the same command to resume; {kept}") from None
        for old in sorted(self.ckpt_dir.glob("step-*.pt"))[:-KEEP]:
            old.unlink()
        return path

    def load(self, identity: dict) -> dict | None:
        """The newest checkpoint (with its RNG states restored), or None for a fresh run. A checkpoint whose
        ``identity`` (model names, trained parts, parameter shapes) differs from this run's is refused."""
        path = self.latest()
        if path is None:
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise RaglineError(f"checkpoint {path} cannot be read ({type(e).__name__})",
                               "delete it (the run resumes from the one before) or start a new --out") from None
        if state.get("identity") != identity:
            raise RaglineError(f"checkpoint {path} belongs to another model or training setup",
                               "resume it with the settings it was made with, or start a new --out")
        set_rng_state(state["rng"])
        return state

    # --- the trained models ----------------------------------------------------------------------------

    def write_final(self, fill: Callable[[Path], dict]) -> Path:
        """RUN/final, written whole or not at all: ``fill`` saves the models into a fresh folder and returns
        what run.json records; the folder is then renamed into place."""
        final, tmp = self.path / "final", self.path / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        info = fill(tmp)
        (tmp / "run.json").write_text(json.dumps(info, indent=2))
        atomic.replace_dir(tmp, final)
        return final

    # --- metrics ---------------------------------------------------------------------------------------

    def log(self, rows: list[tuple[int, str, str, float]]) -> None:
        """Append (step, split, name, value) rows to metrics.csv (flushed: a crash loses no logged row)."""
        path = self.path / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "split", "name", "value"])
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self, after_step: int | None = None) -> list[dict]:
        path = self.path / "metrics.csv"
        if not path.exists():
            return []
        with open(path, encoding="utf-8") as f:
            rows = [{"step": int(r["step"]), "split": r["split"], "name": r["name"], "value": float(r["value"])}
                    for r in csv.DictReader(f)]
        return rows if after_step is None else [r for r in rows if r["step"] <= after_step]

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (they came from steps a resume will redo)."""
        rows = self.read_metrics()
        if any(r["step"] > step for r in rows):
            keep = [r for r in rows if r["step"] <= step]
            text = "step,split,name,value\n" + "".join(f"{r['step']},{r['split']},{r['name']},{r['value']!r}\n"
                                                       for r in keep)
            atomic.write_bytes(self.path / "metrics.csv", text.encode())

    def plot(self) -> None:
        """curves.png: one panel per metric name, a line per split."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        names = list(dict.fromkeys(r["name"] for r in rows))
        if not names:
            return
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for split in dict.fromkeys(r["split"] for r in rows if r["name"] == name):
                pts = [(r["step"], r["value"]) for r in rows if r["name"] == name and r["split"] == split]
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 40 else None, label=split)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic.write_bytes(self.path / "curves.png", buf.getvalue())


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain data (loadable with ``weights_only=True``)."""
    version, keys, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss],
            "numpy": [kind, torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
