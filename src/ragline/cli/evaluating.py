"""Commands that measure: ``eval-retrieval``, ``eval``, ``score``, ``compare`` and ``report``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ragline import vocab
from ragline.cli import render
from ragline.cli.group import cli
from ragline.cli.options import (
    K_HELP,
    KS_HELP,
    device_option,
    filter_option,
    from_run,
    index_option,
    mode_option,
    model_options,
    open_retriever,
    precision_option,
    query_encoder_option,
    reader_options,
    retrieval_options,
    run_option,
    skip_bad_option,
)


@cli.command("eval-retrieval")
@index_option
@click.option("--questions", default="fanoutqa-dev", show_default=True,
              help="'fanoutqa-dev' (bundled dev split) or a question file with gold pages (JSONL, KILT, ...).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(vocab.MODES),
              help="Repeatable; default: every mode the index supports.")
@click.option("-k", "ks", multiple=True, type=click.IntRange(1),
              help=KS_HELP)
@retrieval_options
@skip_bad_option
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the metrics as JSON.")
@device_option
def eval_retrieval(index_dir, questions, modes, ks, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c,
                   skip_bad, json_out, device) -> None:
    """R-precision, recall@k, precision@k and success rate of the gold pages, as KILT scores provenance."""
    from ragline import atomic
    from ragline.evaluate.retrieval import evaluate_retrieval, load_retrieval_questions

    retriever = open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, device=device)
    qs, note = load_retrieval_questions(questions, retriever.index, skip_bad)
    render.log(note)
    ks = sorted(set(ks or vocab.RETRIEVAL_KS))
    rows = {}
    for mode in modes or retriever.index.modes:
        t0 = time.perf_counter()
        rows[mode] = evaluate_retrieval(retriever, qs, ks, mode)
        rows[mode]["seconds"] = time.perf_counter() - t0
    render.metric_table(f"retrieval on {questions} ({len(qs)} questions), index {retriever.index.name}", rows,
                        [f"recall@{k}" for k in ks] + ["r_precision"])
    if json_out:
        atomic.write_json(Path(json_out), {"questions": questions, "n": len(qs), "index": retriever.index.fingerprint,
                                           "metrics": rows})


def _eval_options(f):
    f = device_option(f)
    f = precision_option(f)
    f = reader_options(f)
    f = query_encoder_option(f)
    f = click.option("--limit", type=click.IntRange(1), default=None, help="The first N questions only.")(f)
    return click.option("--batch", default=4, show_default=True, type=click.IntRange(1, 256),
                        help="Questions decoded together.")(f)


@cli.command("eval")
@click.option("--task", default="fanoutqa-dev", show_default=True,
              help="'fanoutqa-dev' or 'fanoutqa-dev-answerable' (bundled dev split) or a task file (KILT, JSONL, "
                   "DPR .qa.csv, TriviaQA, WebQuestions, CuratedTrec, FEVER, MS-MARCO, Jeopardy .source).")
@click.option("--format", "fmt", default=None, help="Task file format (default: detected from the file).")
@index_option
@model_options
@click.option("-k", "k", default=None, type=click.IntRange(1, 100), help=K_HELP)
@mode_option()
@_eval_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory (rerun with the same settings to resume).")
@run_option
@skip_bad_option
@filter_option
@click.pass_context
def eval_cmd(ctx, task, fmt, index_dir, model_name, decoding, k, mode, generator, beams, max_new_tokens,
             length_penalty, prior_scale, query_encoder, limit, batch, out, run_dir, skip_bad, filters, device,
             precision) -> None:
    """Answer a task's questions into a run directory: KILT-format predictions and a report."""
    from ragline.evaluate.answers import EvalConfig, run_eval
    from ragline.evaluate.report import markdown

    s = from_run(ctx, run_dir, {"generator": generator, "model_name": model_name, "k": k, "prior_scale": prior_scale,
                                 "mode": mode, "index_dir": index_dir, "query_encoder": query_encoder})
    vocab.check(s["model_name"], decoding)
    cfg = EvalConfig(task=task, format=fmt, index=str(s["index_dir"]) if s["index_dir"] else None,
                     model=s["model_name"], decoding=decoding, k=s["k"], mode=s["mode"], generator=s["generator"],
                     beams=beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                     prior_scale=s["prior_scale"], limit=limit, batch=batch, query_encoder=s["query_encoder"],
                     device=device, precision=precision, filters=list(filters))
    report = run_eval(cfg, Path(out), skip_bad=skip_bad, log=render.log)
    render.markdown(markdown(report))


@cli.command()
@click.option("--gold", type=click.Path(path_type=Path), required=True, help="KILT gold file (JSONL).")
@click.option("--guess", type=click.Path(path_type=Path), required=True,
              help="KILT prediction file (JSONL), from `ragline eval` (RUN/predictions.jsonl) or any other system.")
@click.option("-k", "ks", multiple=True, type=click.IntRange(1), help=KS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def score(gold, guess, ks, as_json) -> None:
    """Score a KILT prediction file against a KILT gold file as KILT's official scripts do."""
    from ragline.evaluate.scoring import score_files

    result = score_files(gold, guess, sorted(set(ks or vocab.RETRIEVAL_KS)))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    m = result["metrics"]
    render.log(f"{int(m['questions'])} gold questions ({result['kind']} answers); "
               f"{result['ignored_predictions']} predictions of other ids ignored")
    render.metric_table(f"{guess} against {gold}", {"score": m}, [c for c in m if c not in ("questions", "answered")],
                        first="")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Also draw the metrics as a bar chart.")
def compare(runs, png) -> None:
    """Put finished eval runs side by side."""
    from ragline.evaluate.report import compare as compare_runs

    render.markdown(compare_runs(list(runs), png))


@cli.command()
@index_option
@_eval_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/fanoutqa-dev"), show_default=True)
@click.option("--task", default="fanoutqa-dev", show_default=True,
              help="The task every run answers ('fanoutqa-dev-answerable': the 35 answerable dev questions).")
def report(index_dir, generator, beams, max_new_tokens, length_penalty, prior_scale, query_encoder, limit, batch,
           out, task, device, precision) -> None:
    """The comparison report: closed book, RAG-Token, RAG-Sequence fast and thorough at k = 1, 5, 10, and
    BM25 / dense / hybrid retrieval, each a resumable run under OUT, then OUT/README.md and OUT/comparison.png."""
    from ragline.evaluate.answers import EvalConfig, run_report

    base = EvalConfig(task=task, index=str(index_dir) if index_dir else None, generator=generator, beams=beams,
                      max_new_tokens=max_new_tokens, length_penalty=length_penalty, prior_scale=prior_scale,
                      limit=limit, batch=batch, query_encoder=query_encoder, device=device, precision=precision)
    render.markdown(run_report(base, Path(out), log=render.log))
