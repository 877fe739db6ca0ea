"""``ragline eval``: answer every question of a task with one configuration into a run directory, then score
the predictions (:mod:`ragline.evaluate.scoring`).

    RUN/config.json        the configuration (a rerun with the same RUN resumes; another configuration is refused)
    RUN/predictions.jsonl  KILT-format predictions, appended and flushed batch by batch:
                           {id, input, output: [{answer, provenance: [{wikipedia_id (KILT corpora only),
                           title, pid, score, prior, posterior}]}], meta: {logprob, seconds}}
    RUN/report.json / report.md / metrics.png   written (atomically) when every question is answered

An interrupted run leaves at most a partial last line, which the resume drops before going on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ragline import atomic, runconfig, vocab
from ragline.errors import RaglineError
from ragline.evaluate.report import compare, write_report
from ragline.evaluate.retrieval import cited_pages
from ragline.evaluate.scoring import score_run
from ragline.index import manifest as mf
from ragline.index.protocol import Index
from ragline.questions import Task, dev_questions, load_task
from ragline.questions.fanoutqa import BUNDLED_TASKS, DEV, DEV_ANSWERABLE, check_bundled


@dataclass
class EvalConfig:
    """One system on one task: everything that decides the answers (a run directory holds one)."""

    task: str = DEV                     # a task file, or a bundled task (questions.fanoutqa.BUNDLED_TASKS)
    format: str | None = None           # task file format (default: detected)
    index: str | None = None            # index directory (default: the bundled index)
    model: str = vocab.DEFAULT_MODEL
    decoding: str | None = None         # default: the model's first (vocab.DECODINGS)
    k: int | None = None                # default: a RAG checkpoint's n_docs, else vocab.DEFAULT_K
    mode: str = vocab.DEFAULT_MODE
    generator: str = vocab.DEFAULT_GENERATOR  # bundled name, causal or seq2seq folder, or RAG checkpoint
    beams: int = vocab.DEFAULT_BEAMS
    max_new_tokens: int = vocab.DEFAULT_MAX_NEW_TOKENS
    length_penalty: float = vocab.DEFAULT_LENGTH_PENALTY
    prior_scale: float | None = None    # default: the index's (index/manifest.py: prior_scale)
    limit: int | None = None            # first N questions only
    batch: int = 4
    query_encoder: str | None = None    # a trained question encoder (default: the index's own)
    device: str = vocab.DEFAULT_DEVICE  # auto | cpu | cuda (models/device.py); not part of a run's identity
    precision: str = vocab.DEFAULT_PRECISION  # fp32 | bf16 | int8 | auto (models/precision.py); settled to
    #                                           the one used, which is part of the run's identity
    filters: list[str] = field(default_factory=list)  # metadata conditions on the passages (index/filters.py)


def settled(cfg: EvalConfig, index: Index | None, log: Callable[[str], None] = print) -> EvalConfig:
    """``cfg`` with the defaults that depend on the generator and the index filled in: k (a RAG checkpoint's
    n_docs), the prior scale (the index's) and the precision that will run (a fallback's notice to ``log``),
    so that a run records the values it used."""
    from ragline.models import device as devices
    from ragline.models import precision as precisions
    from ragline.models.loading import generator_defaults

    vocab.check_precision(cfg.precision)
    precision, notice = precisions.resolve(cfg.precision, cfg.generator, devices.resolve(cfg.device))
    if notice:
        log(notice)
    k = cfg.k or generator_defaults(cfg.generator).get("k") or vocab.DEFAULT_K
    scale = cfg.prior_scale
    if scale is None:
        scale = mf.prior_scale(index.manifest) if index is not None else vocab.DEFAULT_PRIOR_SCALE
    return replace(cfg, k=1 if cfg.model == vocab.CLOSED_BOOK else k, prior_scale=scale, precision=precision)


def load_eval_task(cfg: EvalConfig, index: Callable[[], Index], skip_bad: bool = False) -> Task:
    """The task's questions (the first ``limit``). The bundled FanOutQA dev split keeps the sub-questions
    whose evidence page is in the index; ``fanoutqa-dev-answerable`` only those whose answer string occurs
    in that page's passages (the ones the corpus can answer word for word)."""
    check_bundled(cfg.task)
    if cfg.task in BUNDLED_TASKS:
        store = index().store
        questions = dev_questions(store.values("title"), store.values("text"),
                                  answerable_only=cfg.task == DEV_ANSWERABLE)
        task = Task(cfg.task, "fanoutqa", "qa", questions)
    else:
        task = load_task(cfg.task, cfg.format, skip_bad)
    task.questions = task.questions[: cfg.limit]
    return task


def task_fingerprint(task: Task) -> str:
    """A hash of the questions a run answers (ids, texts, gold answers and provenance, in order)."""
    h = hashlib.blake2b(digest_size=12)
    for q in task.questions:
        h.update(json.dumps([q.id, q.question, q.answers, q.provenance], default=vars).encode())
    return h.hexdigest()


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


def _prediction(qid: str, question: str, answer: Any, seconds: float, index: Index | None) -> dict:
    pages = cited_pages(index, answer.sources) if index is not None else []
    provenance = [{**({"wikipedia_id": page.wikipedia_id} if page.wikipedia_id else {}), "title": s.title,
                   "pid": s.pid, "score": round(s.score, 5), "prior": round(s.prior, 5),
                   "posterior": round(s.posterior, 5)} for page, s in zip(pages, answer.sources, strict=True)]
    return {"id": qid, "input": question, "output": [{"answer": answer.text, "provenance": provenance}],
            "meta": {"logprob": answer.logprob, "seconds": seconds,
                     **({"cited": answer.cited} if answer.cited is not None else {})}}


def run_eval(cfg: EvalConfig, out: Path, skip_bad: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Answer the task's questions not yet in ``out``, then write and return the report."""
    from tqdm import tqdm

    from ragline import paths
    from ragline.index.registry import open_index
    from ragline.system import open as open_system

    index = None
    if cfg.model != vocab.CLOSED_BOOK or cfg.task in BUNDLED_TASKS:
        index = open_index(cfg.index or paths.default_index_dir())
    cfg = settled(cfg, index, log)
    task = load_eval_task(cfg, lambda: index, skip_bad)
    # what the answers depend on besides the settings: a rebuilt index or an edited task file is another run
    identity = {**asdict(cfg), "index_fingerprint": index.fingerprint if index is not None else None,
                "task_fingerprint": task_fingerprint(task)}
    if not cfg.filters:  # runs from before filters existed resume
        del identity["filters"]
    runconfig.prepare(out, identity, ignore=("batch", "device"))  # a run may resume with another batch or device
    for msg in task.skipped:
        log(f"skipped {msg}")
    preds_path = out / "predictions.jsonl"
    done = _read_predictions(preds_path)
    todo = [q for q in task.questions if q.id not in done]
    if todo:
        log(f"{len(done)} of {len(task.questions)} questions already answered in {out}" if done else
            f"answering {len(task.questions)} questions of {task.name} into {out}")
        # pinned to the generation the run's config names (follow=False): answers from a newer one never land here
        rag = open_system(index, cfg.generator, precision=cfg.precision, device=cfg.device,
                          query_encoder=cfg.query_encoder, k=cfg.k, model=cfg.model, mode=cfg.mode,
                          prior_scale=cfg.prior_scale, follow=False, log=log).model
        with open(preds_path, "a", encoding="utf-8") as f, \
                tqdm(total=len(task.questions), initial=len(done), disable=not progress, unit="q") as bar:
            for lo in range(0, len(todo), cfg.batch):
                batch = todo[lo : lo + cfg.batch]
                t0 = time.perf_counter()
                answers = rag.answer([q.question for q in batch], model=cfg.model, decoding=cfg.decoding,
                                     k=cfg.k, beams=cfg.beams, max_new_tokens=cfg.max_new_tokens,
                                     length_penalty=cfg.length_penalty, filters=cfg.filters)
                secs = (time.perf_counter() - t0) / len(batch)
                f.write("".join(json.dumps(_prediction(q.id, q.question, a, secs, index), ensure_ascii=False) + "\n"
                                for q, a in zip(batch, answers, strict=True)))
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
        done = _read_predictions(preds_path)
    ks = sorted({k for k in (*vocab.RETRIEVAL_KS, cfg.k) if k <= cfg.k}) if cfg.model != vocab.CLOSED_BOOK else [1]
    report = {
        "run": out.name, "config": asdict(cfg),
        "task": {"name": task.name, "format": task.format, "kind": task.kind, "questions": len(task.questions),
                 "skipped": task.skipped},
        "index": None if index is None else {"name": index.name, "fingerprint": index.fingerprint,
                                             "passages": index.live_passages},
        "metrics": score_run(task.questions, task.kind, done, ks),
        "timing": {"seconds_per_question": sum(done[q.id]["meta"]["seconds"] for q in task.questions)
                   / max(len(task.questions), 1),
                   "seconds": sum(done[q.id]["meta"]["seconds"] for q in task.questions)},
    }
    write_report(out, report)
    return report


# ragline report: (model, decoding, retrieval mode, k) of each run; closed book reads no passage.
REPORT_GRID: list[tuple[str, str, str, int | None]] = [(vocab.CLOSED_BOOK, vocab.GREEDY, vocab.DENSE, None)] + [
    (model, decoding, vocab.DENSE, k) for k in (1, 5, 10)
    for model, decoding in ((vocab.CONCAT, vocab.GREEDY), (vocab.RAG_TOKEN, vocab.GREEDY),
                            (vocab.RAG_SEQUENCE, vocab.FAST), (vocab.RAG_SEQUENCE, vocab.THOROUGH))
] + [(vocab.FID, vocab.GREEDY, vocab.DENSE, k) for k in (1, 5, 10)  # seq2seq generators only
] + [(vocab.RAG_SEQUENCE, vocab.THOROUGH, mode, 5) for mode in (vocab.BM25, vocab.HYBRID)]


def run_report(base: EvalConfig, out: Path, log: Callable[[str], None] = print) -> str:
    """``ragline report``: every system of :data:`REPORT_GRID` as a resumable eval run under ``out`` (``base``
    gives the task and decoding settings), then
    ``out/README.md`` and ``out/comparison.png``; returns the comparison table."""
    from ragline.models.loading import CAUSAL, generator_kind

    runs = []
    grid = [g for g in REPORT_GRID if g[0] != vocab.FID or generator_kind(base.generator) != CAUSAL]
    for i, (model, decoding, mode, k) in enumerate(grid, 1):
        name = model if k is None else f"{model}-{decoding}-{mode}-k{k}"
        log(f"run {i}/{len(grid)}: {name}")
        run_eval(replace(base, model=model, decoding=decoding, mode=mode, k=k or 1), out / name, log=log)
        runs.append(out / name)
    table = compare(runs, out / "comparison.png")
    atomic.write_bytes(out / "README.md", (f"# ragline report: {base.task}\n\nOne run per row (`ragline report`); "
                                           f"metrics as KILT defines them.\n\n{table}").encode())
    return table
