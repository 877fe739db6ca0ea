"""The settings file of a run directory (an eval run, a training run): written once, then checked on resume."""

from __future__ import annotations

import json
from pathlib import Path

from ragline import atomic
from ragline.errors import RaglineError


def prepare(run: Path, config: dict, ignore: tuple[str, ...] = ()) -> None:
    """Create ``run`` with ``run/config.json`` = ``config``, or, when it exists, check that it holds the same
    settings (apart from ``ignore``): a rerun resumes, a run with other settings is refused."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.json"
    if not path.exists():
        atomic.write_json(path, config)
        return
    have = json.loads(path.read_text())
    diff = sorted(k for k in set(config) | set(have) if config.get(k) != have.get(k) and k not in ignore)
    if diff:
        raise RaglineError(f"run directory {run} holds a run with other settings ({', '.join(diff)})",
                           "resume with the same settings, or pass a new --out")


def load_trained(run: Path) -> dict:
    """Paths of a finished run's models: {'generator': Path, 'question_encoder': Path | None, ...}."""
    info_path = Path(run) / "final" / "run.json"
    if not info_path.is_file():
        raise RaglineError(f"{run} holds no finished training run (final/run.json is missing)",
                           "finish it (rerun `ragline train rag` with the same --out) or pass another run")
    info = json.loads(info_path.read_text())
    base = info_path.parent
    info["generator"] = base / info["generator"]
    info["question_encoder"] = base / info["question_encoder"] if info["question_encoder"] else None
    return info


def trained_settings(run: Path) -> dict:
    """A finished training run's models and the settings it trained with, by the names ``ragline.open`` takes
    (generator, query_encoder, model, k, prior_scale, mode, index); None where the run says nothing."""
    trained = load_trained(run)
    return {"generator": str(trained["generator"]), "model": trained.get("model"), "k": trained.get("k"),
            "prior_scale": trained.get("prior_scale"), "mode": trained.get("mode"),
            "index": Path(trained["index"]) if trained.get("index") else None,
            "query_encoder": str(trained["question_encoder"]) if trained.get("question_encoder") else None}
