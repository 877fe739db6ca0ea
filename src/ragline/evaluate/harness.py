"""``ragline eval``: answer every question of a task with one configuration, into a run directory.

    RUN/config.json        the configuration (a rerun with the same RUN resumes; another configuration is refused)
    RUN/predictions.jsonl  KILT-format predictions, appended and flushed batch by batch:
                           {id, input, output: [{answer, provenance: [{wikipedia_id, title, pid, prior,
                           posterior}]}], meta: {logprob, seconds}}
    RUN/report.json / report.md / metrics.png   written (atomically) when every question is answered

An interrupted run leaves at most a partial last line, which the resume drops before going on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragline import runconfig
from ragline.errors import RaglineError
from ragline.evaluate.datasets import Question, answerable, load_fanoutqa
from ragline.evaluate.scoring import score_run
from ragline.evaluate.tasks import Task, load_task
from ragline.index.directory import IndexDir

BUNDLED_TASKS = ("fanoutqa-dev", "fanoutqa-dev-answerable")


@dataclass
class EvalConfig:
    task: str = "fanoutqa-dev"          # a task file, 'fanoutqa-dev' or 'fanoutqa-dev-answerable' (bundled)
    format: str | None = None           # task file format (default: detected)
    index: str | None = None            # index directory (default: the bundled index)
    model: str = "rag-sequence"         # closed-book | rag-token | rag-sequence
    decoding: str | None = None         # default: the model's first (thorough / beam)
    k: int = 5
    mode: str = "dense"                 # dense | bm25 | hybrid
    generator: str = "qwen2.5-0.5b"
    beams: int = 4
    max_new_tokens: int = 24
    length_penalty: float = 0.0
    prior_scale: float = 20.0
    limit: int | None = None            # first N questions only
    batch: int = 4


def dev_questions(index: IndexDir, answerable_only: bool = False) -> list[Question]:
    """FanOutQA dev sub-questions whose gold page is in ``index``; with ``answerable_only``, those whose
    answer string occurs in that page's passages."""
    titles = index.store.table.column("title").to_pylist()
    pages: dict[str, list[str]] = {}
    for t, x in zip(titles, index.store.table.column("text").to_pylist(), strict=True):
        pages.setdefault(t, []).append(x)
    questions = load_fanoutqa("dev", set(pages))
    return answerable(questions, pages) if answerable_only else questions


def load_eval_task(cfg: EvalConfig, index: Callable[[], IndexDir], skip_bad: bool = False) -> Task:
    """The task's questions (the first ``limit``). The bundled FanOutQA dev split keeps the sub-questions
    whose evidence page is in the index; ``fanoutqa-dev-answerable`` only those whose answer string occurs
    in that page's passages (the ones the corpus can answer word for word)."""
    if cfg.task in BUNDLED_TASKS:
        questions = dev_questions(index(), answerable_only=cfg.task == "fanoutqa-dev-answerable")
        task = Task(cfg.task, "fanoutqa", "qa", questions)
    elif cfg.task.startswith("fanoutqa-"):
        raise RaglineError(f"unknown bundled task {cfg.task!r}",
                           "use fanoutqa-dev or fanoutqa-dev-answerable (the held-out half is for final "
                           "evaluation only) or a task file")
    else:
        task = load_task(cfg.task, cfg.format, skip_bad)
    task.questions = task.questions[: cfg.limit]
    return task


def _read_predictions(path: Path) -> dict[str, dict]:
    """Complete prediction lines of ``path``; a partial last line (an interrupted write) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = {}
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise RaglineError(f"{path}:{n} is not a valid prediction line",
                               "remove the run directory (or that line) and run again") from None
        out[rec["id"]] = rec
    return out


def _prediction(qid: str, question: str, answer: Any, seconds: float) -> dict:
    provenance = [{"wikipedia_id": s.pid.rsplit("#", 1)[0], "title": s.title, "pid": s.pid,
                   "score": round(s.score, 5), "prior": round(s.prior, 5), "posterior": round(s.posterior, 5)}
                  for s in answer.sources]
    return {"id": qid, "input": question, "output": [{"answer": answer.text, "provenance": provenance}],
            "meta": {"logprob": answer.logprob, "seconds": seconds}}


def run_eval(cfg: EvalConfig, out: Path, skip_bad: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Answer the task's questions not yet in ``out``, then write and return the report."""
    from tqdm import tqdm

    from ragline import paths
    from ragline.index.directory import IndexDir
    from ragline.models.generators import CausalGenerator
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever

    runconfig.prepare(out, asdict(cfg), ignore=("batch",))  # the batch size does not change answers
    index = None
    if cfg.model != "closed-book" or cfg.task in BUNDLED_TASKS:
        index = IndexDir.open(cfg.index or paths.default_index_dir())
    task = load_eval_task(cfg, lambda: index, skip_bad)
    for msg in task.skipped:
        log(f"skipped {msg}")
    preds_path = out / "predictions.jsonl"
    done = _read_predictions(preds_path)
    todo = [q for q in task.questions if q.id not in done]
    if todo:
        log(f"{len(done)} of {len(task.questions)} questions already answered in {out}" if done else
            f"answering {len(task.questions)} questions of {task.name} into {out}")
        retriever = Retriever(index) if cfg.model != "closed-book" else None
        rag = RagModel(retriever, CausalGenerator.load(cfg.generator), k=cfg.k, mode=cfg.mode,
                       prior_scale=cfg.prior_scale)
        with open(preds_path, "a", encoding="utf-8") as f, \
                tqdm(total=len(task.questions), initial=len(done), disable=not progress, unit="q") as bar:
            for lo in range(0, len(todo), cfg.batch):
                batch = todo[lo : lo + cfg.batch]
                t0 = time.perf_counter()
                answers = rag.answer([q.question for q in batch], model=cfg.model, decoding=cfg.decoding,
                                     k=cfg.k, beams=cfg.beams, max_new_tokens=cfg.max_new_tokens,
                                     length_penalty=cfg.length_penalty)
                secs = (time.perf_counter() - t0) / len(batch)
                f.write("".join(json.dumps(_prediction(q.id, q.question, a, secs), ensure_ascii=False) + "\n"
                                for q, a in zip(batch, answers, strict=True)))
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
        done = _read_predictions(preds_path)
    from ragline.evaluate.report import write_report

    ks = sorted({k for k in (1, 5, 10, cfg.k) if k <= cfg.k}) if cfg.model != "closed-book" else [1]
    report = {
        "run": out.name, "config": asdict(cfg),
        "task": {"name": task.name, "format": task.format, "kind": task.kind, "questions": len(task.questions),
                 "skipped": task.skipped},
        "index": None if index is None else {"name": index.name, "fingerprint": index.fingerprint,
                                             "passages": len(index)},
        "metrics": score_run(task.questions, task.kind, done, ks),
        "timing": {"seconds_per_question": sum(done[q.id]["meta"]["seconds"] for q in task.questions)
                   / max(len(task.questions), 1),
                   "seconds": sum(done[q.id]["meta"]["seconds"] for q in task.questions)},
    }
    write_report(out, report)
    return report
