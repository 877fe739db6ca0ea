"""The ``ragline`` commands. What they print is in :mod:`ragline.cli.render`; names and defaults come from
:mod:`ragline.vocab`.

Every bad input ends in one line on stderr, ``error: <problem>; <fix>``, and exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ragline import paths, vocab
from ragline.cli import render
from ragline.corpus.readers import FORMATS as CORPUS_FORMATS
from ragline.errors import RaglineError
from ragline.serve.budget import Budget
from ragline.train.synth import FILTERS as SYNTH_FILTERS
from ragline.train.synth import SynthConfig
from ragline.vocab import INDEX_TYPES

DEMO_QUESTION = "Who directed the film 2001: A Space Odyssey?"
GENERATOR_HELP = ("Bundled name (qwen2.5-0.5b, smollm2), or a Hugging Face folder: a causal LM, a BART/T5 model, or a "
                  "RAG checkpoint (RagSequenceForGeneration / RagTokenForGeneration: its question encoder and n_docs "
                  "come with it).")
K_HELP = "Passages to marginalise over (default: a RAG checkpoint's n_docs, else 5)."
PRIOR_HELP = ("p(z|x) = softmax(scale * q·d) (default: the index's own, 1 for DPR's inner products, 20 for "
              "unit-normalised encoders such as MiniLM).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ragline")
def cli() -> None:
    """ragline: Retrieval-Augmented Generation on CPU."""


def main() -> None:
    """The ``ragline`` entry point: run a command, turning refusals into one line and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except RaglineError as e:
        render.error(str(e))
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        render.log("interrupted; run the same command again to resume")
        sys.exit(130)


# --- shared options --------------------------------------------------------------------------------------

def _index_option(f):
    return click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
                        help="Index directory, single or sharded (default: the bundled Wikipedia leads index).")(f)


def _device_option(f):
    return click.option("--device", type=click.Choice(vocab.DEVICES), default=vocab.DEFAULT_DEVICE, show_default=True,
                        help="Where the encoders and the generator run (auto: a GPU when torch sees one).")(f)


def _precision_option(f):
    return click.option("--precision", type=click.Choice(vocab.PRECISIONS), default=vocab.DEFAULT_PRECISION,
                        show_default=True,
                        help="The generator's number format: fp32, bf16 (CPUs with AVX512-BF16/AMX, GPUs), int8 (CPU, "
                             "VNNI; answers may differ from fp32's); auto: the fastest checked against fp32's "
                             "answers for this generator that the hardware runs natively, else fp32.")(f)


def _query_encoder_option(f):
    return click.option("--query-encoder", default=None,
                        help="Question encoder, e.g. a `ragline train retriever` run's (default: the index's own).")(f)


def _retrieval_options(f):
    f = _query_encoder_option(f)
    f = click.option("--allow-encoder-mismatch", is_flag=True,
                     help="Search even if the question encoder is not paired with the index's passage encoder.")(f)
    f = click.option("--bm25-weight", default=vocab.BM25_WEIGHT, show_default=True, type=click.FloatRange(0),
                     help="Weight of the BM25 ranking in hybrid fusion (dense has weight 1).")(f)
    return click.option("--rrf-c", default=vocab.RRF_C, show_default=True, type=click.FloatRange(0),
                        help="Reciprocal-rank-fusion constant c in w / (c + rank).")(f)


def _mode_option(default: str = vocab.DEFAULT_MODE):
    return click.option("--mode", type=click.Choice(vocab.MODES), default=default, show_default=True,
                        help="Retrieval: dense (q·d), bm25, or hybrid (reciprocal-rank fusion).")


def _reader_options(f):
    """Model, decoding and the decoding settings shared by ask, eval and report."""
    f = click.option("--beams", default=vocab.DEFAULT_BEAMS, show_default=True, type=click.IntRange(1, 64))(f)
    f = click.option("--max-new-tokens", default=vocab.DEFAULT_MAX_NEW_TOKENS, show_default=True,
                     type=click.IntRange(1, 1024))(f)
    f = click.option("--length-penalty", default=vocab.DEFAULT_LENGTH_PENALTY, show_default=True, type=float,
                     help="Beam ranking: log p / length ** this (0 ranks by log p; 1 favours longer answers).")(f)
    f = click.option("--prior-scale", default=None, type=float, help=PRIOR_HELP)(f)
    return click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP)(f)


def _model_options(f):
    f = click.option("--model", "model_name", type=click.Choice(vocab.MODELS), default=vocab.DEFAULT_MODEL,
                     show_default=True)(f)
    decodings = "; ".join(f"{m}: {' or '.join(d)}" for m, d in vocab.DECODINGS.items())
    return click.option("--decoding", type=click.Choice(vocab.ALL_DECODINGS), default=None,
                        help=f"{decodings} (the first is the default).")(f)


def _filter_option(f):
    return click.option("--filter", "filters", multiple=True, callback=_check_filters, metavar="FIELD=VALUE",
                        help="Only passages whose metadata match (repeatable): field=value, field!=value, or "
                             "field=prefix* for paths; fields: pid, doc_id, title, source, page, section and a "
                             "JSONL corpus's own metadata keys.")(f)


def _check_filters(ctx, param, value):
    from ragline.index.filters import parse_filters

    parse_filters(value)  # a malformed condition fails before any model loads
    return list(value)


def _run_option(f):
    return click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
                        help="A finished `ragline train rag` run: its trained models and the settings it trained "
                             "with (model, k, prior scale, mode, index), unless given here.")(f)


def _skip_bad_option(f):
    return click.option("--skip-bad", is_flag=True,
                        help="Skip malformed question records (each reported) instead of failing.")(f)


def _resolve_index(index_dir: Path | None) -> Path:
    return Path(index_dir) if index_dir else paths.default_index_dir()


def _open_retriever(index_dir: Path | None, query_encoder: str | None, allow_mismatch: bool = False,
                    bm25_weight: float = vocab.BM25_WEIGHT, rrf_c: float = vocab.RRF_C, checkpoint_encoder=None,
                    device: str | None = None):
    from ragline.retriever import open_retriever

    return open_retriever(_resolve_index(index_dir), query_encoder, checkpoint_encoder,
                          allow_encoder_mismatch=allow_mismatch, bm25_weight=bm25_weight, rrf_c=rrf_c, log=render.log,
                          device=device)


def _from_run(ctx: click.Context, run_dir: Path | None, settings: dict) -> dict:
    """``settings`` with a finished `ragline train rag` run's own (generator, question encoder, model, k,
    prior scale, retrieval mode, index) wherever the command line left the option at its default."""
    if run_dir is None:
        return settings
    from ragline.runconfig import trained_settings

    trained = trained_settings(run_dir)
    given = {name for name in settings
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    out = dict(settings)
    option = {"model": "model_name", "index": "index_dir"}  # the options' names where they differ
    for name, value in trained.items():
        name = option.get(name, name)
        if name in settings and name not in given and value is not None:
            out[name] = value
    return out


@cli.command()
@click.option("--source", default="wiki-leads", show_default=True,
              help="JSONL file, KILT knowledge-source file, DPR passage TSV (psgs_w100.tsv), folder of .txt/.md "
                   "files, or 'wiki-leads' (bundled).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Index directory to write (default: the bundled index location).")
@click.option("--format", "fmt", type=click.Choice(CORPUS_FORMATS), default="auto", show_default=True)
@click.option("--index-type", default=vocab.DEFAULT_INDEX_TYPE, show_default=True, type=click.Choice(INDEX_TYPES),
              help="FAISS index type.")
@click.option("--encoder", default=vocab.DEFAULT_ENCODER, show_default=True,
              help="Passage encoder: bundled name, sentence-transformers folder, DPR context encoder or BERT folder.")
@click.option("--query-encoder", default=None,
              help="Question encoder, e.g. a DPR question encoder (default: the passage encoder).")
@click.option("--embeddings", type=click.Path(path_type=Path), default=None,
              help="Precomputed passage vectors (a .npy file or a folder of .npy shards, float32 or float16, in "
                   "corpus order) used instead of encoding the corpus.")
@click.option("--passage-words", default=100, show_default=True, type=click.IntRange(1))
@click.option("--max-seq-length", default=256, show_default=True, type=click.IntRange(8))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--chunk-rows", default=1024, show_default=True, type=click.IntRange(1),
              help="Passages encoded between two checkpoints (resume granularity).")
@click.option("--target-recall", default=0.95, show_default=True, type=click.FloatRange(0, 1),
              help="Recall@10 vs exact that approximate indexes are tuned to on build.")
@click.option("--no-bm25", is_flag=True, help="Skip the BM25 index.")
@click.option("--no-dense", is_flag=True, help="Skip the dense index (BM25 only).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Index only the first N documents.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed records (reported) instead of failing.")
@click.option("--force", is_flag=True, help="Replace an existing index (atomically, once the new one is complete).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Build a sharded index on Ray: on the cluster at ADDRESS ('auto' finds a running one), or on a "
                   "local Ray when no address is given. Every node must see --out.")
@click.option("--shards", default=2, show_default=True, type=click.IntRange(1), help="Shards of a --ray build.")
@click.option("--encode-actors", default=None, type=click.IntRange(1),
              help="Encoder actors of a --ray build (default: one per CPU of the cluster).")
@_device_option
def index(source, out, fmt, index_type, encoder, query_encoder, embeddings, passage_words, max_seq_length, batch_size,
          chunk_rows, target_recall, no_bm25, no_dense, limit, skip_bad, force, ray_address, shards,
          encode_actors, device) -> None:
    """Build an index: passages, dense (FAISS) and BM25. Resumes after an interruption. With --ray, a
    sharded index: Ray Data encodes the shards in parallel, and Ray actors serve them at query time."""
    from ragline.index.build import BuildOptions, build_index

    opts = BuildOptions(source=source, out=out or paths.default_index_dir(), fmt=fmt, index_type=index_type,
                        encoder=encoder, question_encoder=query_encoder, max_seq_length=max_seq_length,
                        passage_words=passage_words, batch_size=batch_size, chunk_rows=chunk_rows,
                        bm25=not no_bm25, dense=not no_dense, force=force, skip_bad=skip_bad, limit=limit,
                        target_recall=target_recall, embeddings=str(embeddings) if embeddings else None,
                        device=device)
    if ray_address is None:
        build_index(opts, log=render.log)
        return
    if embeddings:
        raise RaglineError("--embeddings builds a single index", "drop --ray, or drop --embeddings to encode on Ray")
    from ragline.scale.build import build_sharded

    build_sharded(opts, shards, address=None if ray_address == "local" else ray_address, actors=encode_actors,
                  log=render.log)



def _changer(what: str):
    """The function that makes change ``what`` (add, delete, compact) to an index, single or sharded (told
    apart when called, from the manifest at its first argument, the index's path)."""
    def run(path: Path, *args, **kwargs):
        from ragline.scale.update import change_sharded, compact_sharded, delete_sharded, is_sharded

        if is_sharded(path):
            fn = {"add": change_sharded, "delete": delete_sharded, "compact": compact_sharded}[what]
        else:
            from ragline.index import update

            fn = {"add": update.add_documents, "delete": update.delete_documents, "compact": update.compact_index}[what]
        return fn(path, *args, **kwargs)

    return run


def _change_options(f):
    f = _device_option(f)
    f = click.option("--skip-bad", is_flag=True, help="Skip malformed records (reported) instead of failing.")(f)
    f = click.option("--format", "fmt", type=click.Choice(CORPUS_FORMATS), default="auto", show_default=True)(f)
    f = click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))(f)
    f = click.argument("sources", nargs=-1, required=True)(f)
    return _index_option(f)


@cli.command()
@_change_options
def add(index_dir, sources, batch_size, fmt, skip_bad, device) -> None:
    """Add the documents of SOURCES (files or folders) to an index as a new generation, without a rebuild.
    A document already there with the same content is left as it is; one with other content is refused (that
    is `ragline update`). A running server or retriever takes the new generation up by itself."""
    _changer("add")(_resolve_index(index_dir), sources, fmt=fmt, skip_bad=skip_bad, batch_size=batch_size,
                    device=device, log=render.log)


@cli.command()
@_change_options
def update(index_dir, sources, batch_size, fmt, skip_bad, device) -> None:
    """Replace the documents of SOURCES in an index by id (adding those it does not hold), as a new generation;
    unchanged documents are left as they are."""
    _changer("add")(_resolve_index(index_dir), sources, replace=True, fmt=fmt, skip_bad=skip_bad,
                    batch_size=batch_size, device=device, log=render.log)


@cli.command()
@_index_option
@click.option("--doc", "doc_ids", multiple=True, required=True, help="A document id to delete (repeatable).")
def delete(index_dir, doc_ids) -> None:
    """Delete documents (every passage of each) from an index as a new generation; searches never return them."""
    _changer("delete")(_resolve_index(index_dir), doc_ids, log=render.log)


@cli.command()
@_index_option
def compact(index_dir) -> None:
    """Merge an index's base, added segments and deletions into one plain index (no re-encoding), replacing it
    atomically; searches give the same results, faster once many segments have piled up."""
    _changer("compact")(_resolve_index(index_dir), log=render.log)


@cli.command()
@click.argument("questions", nargs=-1, required=True)
@_index_option
@click.option("-k", "k", default=10, show_default=True, type=int)
@_mode_option()
@_retrieval_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@_filter_option
@_device_option
def search(questions, index_dir, k, mode, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, as_json,
           filters, device) -> None:
    """Print the top-k passages for each QUESTION with their scores."""
    retriever = _open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, device=device)
    results = retriever.search(list(questions), k=k, mode=mode, filters=filters)
    for q, hits in zip(questions, results, strict=True):
        if as_json:
            print(json.dumps({"question": q, "mode": mode, "index": retriever.index.fingerprint,
                              "hits": [h.__dict__ for h in hits]}, ensure_ascii=False))
        else:
            render.hits(q, hits, mode)


@cli.command()
@click.argument("questions", nargs=-1, required=True)
@_index_option
@_model_options
@click.option("-k", "k", default=None, type=click.IntRange(1), help=K_HELP)
@_mode_option()
@_reader_options
@click.option("--n-best", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Also print the next best answers (beam decodings).")
@_retrieval_options
@_run_option
@click.option("--json", "as_json", is_flag=True, help="Print the full answer structure as JSON lines.")
@_filter_option
@_device_option
@_precision_option
@click.pass_context
def ask(ctx, questions, index_dir, model_name, decoding, k, mode, generator, beams, max_new_tokens, length_penalty,
        prior_scale, n_best, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, run_dir, as_json,
        filters, device, precision) -> None:
    """Answer each QUESTION with RAG and print the answer with its cited passages."""
    from ragline.system import open as open_system

    s = _from_run(ctx, run_dir, {"generator": generator, "model_name": model_name, "k": k, "prior_scale": prior_scale,
                                 "mode": mode, "index_dir": index_dir, "query_encoder": query_encoder})
    vocab.check(s["model_name"], decoding)
    rag = open_system(s["index_dir"], s["generator"], precision=precision, device=device,
                      query_encoder=s["query_encoder"], k=s["k"], model=s["model_name"], mode=s["mode"],
                      prior_scale=s["prior_scale"], allow_encoder_mismatch=allow_encoder_mismatch,
                      bm25_weight=bm25_weight, rrf_c=rrf_c, log=render.log)
    for a in rag.ask(list(questions), decoding=decoding, beams=beams, max_new_tokens=max_new_tokens,
                     length_penalty=length_penalty, n_best=n_best, filters=filters):
        if as_json:
            print(json.dumps(a.to_dict(), ensure_ascii=False))
        else:
            render.answer(a)


@cli.command("eval-retrieval")
@_index_option
@click.option("--questions", default="fanoutqa-dev", show_default=True,
              help="'fanoutqa-dev' (bundled dev split) or a question file with gold pages (JSONL, KILT, ...).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(vocab.MODES),
              help="Repeatable; default: every mode the index supports.")
@click.option("-k", "ks", multiple=True, type=click.IntRange(1),
              help=f"Cut-offs (default {' '.join(map(str, vocab.RETRIEVAL_KS))}).")
@_retrieval_options
@_skip_bad_option
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the metrics as JSON.")
@_device_option
def eval_retrieval(index_dir, questions, modes, ks, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c,
                   skip_bad, json_out, device) -> None:
    """R-precision, recall@k, precision@k and success rate of the gold pages, as KILT scores provenance."""
    from ragline import atomic
    from ragline.evaluate.retrieval import evaluate_retrieval, load_retrieval_questions

    retriever = _open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, device=device)
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
    f = _device_option(f)
    f = _precision_option(f)
    f = _reader_options(f)
    f = _query_encoder_option(f)
    f = click.option("--limit", type=click.IntRange(1), default=None, help="The first N questions only.")(f)
    return click.option("--batch", default=4, show_default=True, type=click.IntRange(1, 256),
                        help="Questions decoded together.")(f)


@cli.command("eval")
@click.option("--task", default="fanoutqa-dev", show_default=True,
              help="'fanoutqa-dev' or 'fanoutqa-dev-answerable' (bundled dev split) or a task file (KILT, JSONL, "
                   "DPR .qa.csv, TriviaQA, WebQuestions, CuratedTrec, FEVER, MS-MARCO, Jeopardy .source).")
@click.option("--format", "fmt", default=None, help="Task file format (default: detected from the file).")
@_index_option
@_model_options
@click.option("-k", "k", default=None, type=click.IntRange(1, 100), help=K_HELP)
@_mode_option()
@_eval_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory (rerun with the same settings to resume).")
@_run_option
@_skip_bad_option
@_filter_option
@click.pass_context
def eval_cmd(ctx, task, fmt, index_dir, model_name, decoding, k, mode, generator, beams, max_new_tokens,
             length_penalty, prior_scale, query_encoder, limit, batch, out, run_dir, skip_bad, filters, device,
             precision) -> None:
    """Answer a task's questions into a run directory: KILT-format predictions and a report."""
    from ragline.evaluate.answers import EvalConfig, run_eval
    from ragline.evaluate.report import markdown

    s = _from_run(ctx, run_dir, {"generator": generator, "model_name": model_name, "k": k, "prior_scale": prior_scale,
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
@click.option("-k", "ks", multiple=True, type=click.IntRange(1), help="Cut-offs (default 1 5 10 20).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def score(gold, guess, ks, as_json) -> None:
    """Score a KILT prediction file against a KILT gold file as KILT's official scripts do."""
    from ragline.evaluate.scoring import DEFAULT_KS, score_files

    result = score_files(gold, guess, sorted(set(ks or DEFAULT_KS)))
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
@_index_option
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


def _serving_options(f):
    """What ``serve`` and ``mcp`` share: the models, the work budget, the API key."""
    options = [
        _index_option,
        click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP),
        _query_encoder_option,
        click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
                     help="Serve the models of a finished `ragline train rag` run, with the prior scale and index it "
                          "trained with unless given here."),
        click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64),
                     help="Questions arriving together with the same settings are decoded in one batch of at most "
                          "this."),
        click.option("--prior-scale", default=None, type=float, help=PRIOR_HELP),
        click.option("--api-key", envvar="RAGLINE_API_KEY", default=None,
                     help="Require 'Authorization: Bearer KEY' on every HTTP route but the page (also from "
                          "RAGLINE_API_KEY)."),
        click.option("--max-request-tokens", default=Budget.max_request_tokens, show_default=True,
                     type=click.IntRange(1), help="Work one request may ask: generator rows (k x beams) x (prompt + "
                                                  "new tokens)."),
        click.option("--max-batch-tokens", default=Budget.max_batch_tokens, show_default=True,
                     type=click.IntRange(1), help="Work one batch may hold, in the same tokens."),
        click.option("--max-queue", default=Budget.max_queue, show_default=True, type=click.IntRange(1),
                     help="Requests waiting at most; more are refused (HTTP 503 with Retry-After)."),
        click.option("--max-running", default=Budget.max_running, show_default=True, type=click.IntRange(1, 16),
                     help="Batches of different settings decoded at once, taking turns on the model step by "
                          "step: a question with other settings than the batch decoding starts at that batch's next "
                          "step instead of after its last (1: one batch at a time)."),
        click.option("--kv-cache-mb", default=vocab.DEFAULT_KV_CACHE_MB, show_default=True,
                     type=click.FloatRange(0),
                     help="Memory for the key/value states of prompt blocks already read (system prompt, passages), "
                          "reused by later questions without recomputing them (decoder-only generators; 0: off)."),
        _device_option,
        _precision_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _serving_model(ctx: click.Context, o: dict):
    """The RAG model ``serve`` and ``mcp`` answer with, and the worker that owns it, from their options. The
    model loads on the worker's model thread, which runs all of the server's torch work (serve/turns.py: one
    thread calling into OpenMP, or every operation pays for waking its threads)."""
    from ragline.rag.model import RagModel
    from ragline.serve.turns import Turns
    from ragline.serve.worker import ModelWorker

    s = _from_run(ctx, o["run_dir"], {"generator": o["generator"], "prior_scale": o["prior_scale"],
                                      "index_dir": o["index_dir"], "query_encoder": o["query_encoder"]})

    def load() -> RagModel:
        from ragline.system import open as open_system

        render.log(f"loading the generator {s['generator']}")
        system = open_system(s["index_dir"], s["generator"], precision=o["precision"], device=o["device"],
                             query_encoder=s["query_encoder"], prior_scale=s["prior_scale"],
                             kv_cache_mb=o["kv_cache_mb"], log=render.log)
        if system.opened.precision != vocab.FP32:
            render.log(f"the generator answers in {system.opened.precision}")
        return system.model

    turns = Turns()
    rag = turns.call(load)
    budget = Budget(max_request_tokens=o["max_request_tokens"], max_batch_tokens=o["max_batch_tokens"],
                    max_queue=o["max_queue"], max_running=o["max_running"])
    return rag, ModelWorker(rag, max_batch=o["max_batch"], budget=budget, turns=turns)


def _warn_open(host: str, api_key: str | None) -> None:
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not api_key and not loopback:
        render.log(f"warning: serving on {host}, reachable from other machines, without an API key: anyone who "
                   "can reach it can ask questions, read the passages and switch the index; pass --api-key "
                   "(or set RAGLINE_API_KEY)")


@cli.command()
@_serving_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header names NAME (repeatable; '*': any). Others than "
                   "localhost, 127.0.0.1, [::1] and --host are refused with 421 (DNS rebinding).")
@click.pass_context
def serve(ctx, host, port, allowed_hosts, **o) -> None:
    """Serve the HTTP API (POST /ask, /ask/stream, /search; GET /passages/ID, /indexes, /health), the
    OpenAI-compatible routes (/v1/chat/completions, /v1/models, /v1/embeddings), MCP at /mcp and the page."""
    import uvicorn

    from ragline.serve.app import create_app

    _warn_open(host, o["api_key"])
    rag, worker = _serving_model(ctx, o)
    render.log(f"serving index {rag.retriever.index.name} on http://{host}:{port} (API schema at /docs; "
               f"OpenAI-compatible at http://{host}:{port}/v1; MCP at http://{host}:{port}/mcp)")
    app = create_app(rag, worker=worker, api_key=o["api_key"], host=host, allowed_hosts=allowed_hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.command()
@_serving_options
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
              help="stdio: talk over stdin/stdout (what desktop MCP clients launch); http: streamable HTTP at /mcp.")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --transport http.")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535), help="With --transport http.")
@click.pass_context
def mcp(ctx, transport, host, port, **o) -> None:
    """Serve the Model Context Protocol: tools `search` and `ask` with typed inputs and structured results."""
    import contextlib
    import sys

    from ragline.serve.mcp_server import create_mcp, require_key

    if transport == "http":
        _warn_open(host, o["api_key"])
    with contextlib.redirect_stdout(sys.stderr):  # over stdio, stdout carries the protocol alone
        rag, worker = _serving_model(ctx, o)
    server = create_mcp(rag, worker)
    if transport == "stdio":
        render.log(f"MCP over stdio: index {rag.retriever.index.name}, tools search and ask")
        server.run("stdio")
        return
    import uvicorn

    app = server.streamable_http_app(host=host)
    render.log(f"MCP over streamable HTTP at http://{host}:{port}/mcp: index {rag.retriever.index.name}")
    uvicorn.run(require_key(app, o["api_key"]) if o["api_key"] else app, host=host, port=port, log_level="warning")


@cli.group()
def train() -> None:
    """Training: end-to-end RAG fine-tuning."""


@train.command("rag")
@click.option("--train", "train_spec", default="fanoutqa-dev", show_default=True,
              help="Training examples: JSONL (question, answers, optional positive) or KILT, or 'fanoutqa-dev'.")
@_index_option
@click.option("--generator", default=vocab.TRAINING_GENERATOR, show_default=True, help=GENERATOR_HELP)
@click.option("--model", "model_name", type=click.Choice(vocab.TRAINABLE_MODELS), default=vocab.DEFAULT_MODEL,
              show_default=True)
@click.option("-k", "k", default=None, type=click.IntRange(1, 50), help=K_HELP)
@click.option("--generator-training", type=click.Choice(["full", "lora", "frozen"]), default="full", show_default=True)
@click.option("--lora-r", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lora-alpha", default=16, show_default=True, type=click.IntRange(1))
@click.option("--freeze-question-encoder", is_flag=True, help="Train the generator only.")
@click.option("--lr", default=3e-5, show_default=True, type=float, help="Generator learning rate.")
@click.option("--question-encoder-lr", default=1e-5, show_default=True, type=float)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--accumulation", default=1, show_default=True, type=click.IntRange(1), help="Micro-batches per step.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0))
@click.option("--clip", default=1.0, show_default=True, type=float, help="Gradient clipping (global norm).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--prior-scale", default=None, type=float, help=PRIOR_HELP)
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--val-limit", default=64, show_default=True, type=click.IntRange(1))
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory (rerun the same command to resume after an interruption).")
@_skip_bad_option
@_device_option
def train_rag(train_spec, index_dir, generator, model_name, k, generator_training, lora_r, lora_alpha,
              freeze_question_encoder, lr, question_encoder_lr, batch_size, accumulation, steps, warmup, clip, seed,
              precision, label_smoothing, prior_scale, val_fraction, val_limit, eval_every, save_every, out,
              skip_bad, device) -> None:
    """Fine-tune the question encoder and the generator on the marginal likelihood (index frozen)."""
    from ragline.train.rag import RagTrainConfig, RagTrainer

    cfg = RagTrainConfig(train=train_spec, index=str(index_dir) if index_dir else None, generator=generator,
                         model=model_name, k=k, generator_training=generator_training, lora_r=lora_r,
                         lora_alpha=lora_alpha, train_question_encoder=not freeze_question_encoder, lr=lr,
                         question_encoder_lr=question_encoder_lr, batch_size=batch_size, accumulation=accumulation,
                         steps=steps, warmup=warmup, clip=clip, seed=seed, precision=precision,
                         label_smoothing=label_smoothing, prior_scale=prior_scale, val_fraction=val_fraction,
                         val_limit=val_limit, eval_every=eval_every, save_every=save_every, device=device)
    result = RagTrainer(cfg, Path(out), log=render.log, skip_bad=skip_bad).run_training()
    render.console.print(f"trained {result['steps']} steps (last loss {result['last_loss']:.4f}); "
                         f"models in {result['final']}; "
                  f"use them with `ragline ask --run {out} ...`")


@train.command("retriever")
@click.option("--train", "train_spec", default="fanoutqa-dev", show_default=True,
              help="Pairs: JSONL with question and positive (page titles or passage ids), KILT, or 'fanoutqa-dev'.")
@_index_option
@click.option("--train-passage-encoder", is_flag=True,
              help="Also train the passage encoder; the corpus is then re-encoded into a new index.")
@click.option("--new-index", type=click.Path(path_type=Path), default=None,
              help="Where the re-encoded index goes (default OUT/index).")
@click.option("--hard-negatives", default=1, show_default=True, type=click.IntRange(0, 16),
              help="BM25 hard negatives per question, besides the in-batch negatives.")
@click.option("--scale", default=None, type=float,
              help="Score scale s in softmax(s q·d) (default: the index's prior scale, 1 for DPR, 20 for MiniLM).")
@click.option("--lr", default=2e-5, show_default=True, type=float)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--accumulation", default=1, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (rerun to resume).")
@_skip_bad_option
@_device_option
def train_retriever(train_spec, index_dir, train_passage_encoder, new_index, hard_negatives, scale, lr, batch_size,
                    accumulation, steps, warmup, seed, val_fraction, eval_every, save_every, out, skip_bad,
                    device) -> None:
    """DPR training of the question (and optionally passage) encoder with in-batch + BM25 hard negatives."""
    from ragline.train.retriever import RetrieverTrainConfig, RetrieverTrainer

    cfg = RetrieverTrainConfig(train=train_spec, index=str(index_dir) if index_dir else None,
                               train_passage_encoder=train_passage_encoder,
                               new_index=str(new_index) if new_index else None, hard_negatives=hard_negatives,
                               scale=scale, lr=lr, batch_size=batch_size, accumulation=accumulation, steps=steps,
                               warmup=warmup, seed=seed, val_fraction=val_fraction, eval_every=eval_every,
                               save_every=save_every, device=device)
    result = RetrieverTrainer(cfg, Path(out), log=render.log, skip_bad=skip_bad).run_training()
    render.console.print(f"trained {result['steps']} steps (last loss {result['last_loss']:.4f}); encoders in "
                  f"{result['final']}; search with `ragline search --query-encoder {result['final']}/question_encoder`")


@cli.command()
@_index_option
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The training file to write (JSONL); rerun the same command to continue it.")
@click.option("--questions", default=1000, show_default=True, type=click.IntRange(1), help="Questions wanted.")
@click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP)
@click.option("--seed", default=0, show_default=True, type=int, help="Which passages are sampled, in which order.")
@click.option("--filter", "filters", multiple=True, type=click.Choice(SYNTH_FILTERS),
              help="Keep a pair only if it passes this check (repeatable; default: all of them).")
@click.option("--roundtrip-k", default=SynthConfig.roundtrip_k, show_default=True, type=click.IntRange(1),
              help="The round trip keeps a question whose own search finds its passage in this top k.")
@click.option("--mode", type=click.Choice(vocab.MODES), default=None,
              help="The round trip's retrieval (default: dense, or the index's only mode).")
@click.option("--max-answer-words", default=SynthConfig.max_answer_words, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Passages whose questions are generated together.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON at the end.")
@_device_option
@_precision_option
def synth(index_dir, out, questions, generator, seed, filters, roundtrip_k, mode, max_answer_words, batch_size,
          as_json, device, precision) -> None:
    """Synthesise training questions with short answers from an index's passages (for `train rag` and
    `train retriever`), keeping only pairs that pass the filters."""
    from ragline.system import open as open_system
    from ragline.train.synth import Synthesiser, model_functions

    render.log(f"loading the generator {generator}")
    system = open_system(index_dir, generator, precision=precision, device=device, log=render.log,
                         follow=False)  # the file records the generation it was synthesised from
    retriever = system.retriever
    index = retriever.index
    mode = mode or (vocab.DEFAULT_MODE if vocab.DEFAULT_MODE in index.modes else index.modes[0])
    if mode not in index.modes:
        raise RaglineError(f"index {index.name} cannot search {mode}", f"use --mode {' or '.join(index.modes)}")
    cfg = SynthConfig(generator=generator, seed=seed, filters=tuple(dict.fromkeys(filters)) or SYNTH_FILTERS,
                      roundtrip_k=roundtrip_k, mode=mode, max_answer_words=max_answer_words, precision=precision)
    generate, search, answer = model_functions(system.generator, retriever, mode, cfg.max_new_tokens)
    runner = Synthesiser(cfg, Path(out), index.store, index.fingerprint, generate, search, answer,
                         alive=getattr(index, "alive", None), batch_size=batch_size)
    stats = runner.run(questions, log=render.log)
    if as_json:
        print(json.dumps({"out": str(out), **stats.to_dict()}, indent=2))
        return
    dropped = ", ".join(f"{k} {v}" for k, v in stats.dropped.items() if v) or "none"
    render.console.print(f"{stats.questions} questions in {out} from {stats.passages_tried} passages tried "
                         f"(dropped: {dropped}); train with `ragline train retriever --train {out}` or "
                         f"`ragline train rag --train {out}`", markup=False)


@train.command("fanoutqa-dev")
@click.argument("out", type=click.Path(path_type=Path))
def train_fanoutqa(out) -> None:
    """Write the FanOutQA dev split (top-level ids 0-7 only) as a JSONL training file."""
    from ragline.train.data import read_examples, write_examples

    examples = read_examples("fanoutqa-dev")
    write_examples(Path(out), examples)
    render.console.print(f"wrote {len(examples)} examples to {out}", markup=False)


@cli.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="A finished `ragline train rag` run with a BART/T5 generator and a DPR question encoder.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The Hugging Face RAG folder to write.")
def export(run_dir, out) -> None:
    """Write a trained run as a Hugging Face RAG checkpoint (RagSequenceForGeneration or RagTokenForGeneration,
    as the run trained) that transformers loads with from_pretrained."""
    from ragline.train.rag import export_run

    folder = export_run(Path(run_dir), Path(out), log=render.log)
    render.console.print(f"wrote {folder}; load it with transformers' Rag*ForGeneration.from_pretrained or "
                         f"`ragline ask --generator {folder}`", markup=False)


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Folder holding index directories.")
def indexes(root) -> None:
    """List the index directories (single and sharded) side by side."""
    from ragline.index.registry import list_indexes

    root = Path(root) if root else paths.default_index_dir().parent
    render.indexes(str(root), list_indexes(root))


@cli.command()
@click.argument("question", required=False, default=DEMO_QUESTION)
@click.option("-k", "k", default=vocab.DEFAULT_K, show_default=True, type=int)
@_mode_option(vocab.HYBRID)
@click.option("--model", "model_name", type=click.Choice(vocab.RAG_MODELS), default=vocab.DEFAULT_MODEL,
              show_default=True)
@click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP)
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Build the default index from the first N documents only (a quick look).")
@_device_option
@_precision_option
def demo(question, k, mode, model_name, generator, limit, device, precision) -> None:
    """The main job on the embedded default: build the bundled index if missing, then answer a question
    with RAG and print the answer with its sources."""
    from ragline.index.build import BuildOptions, build_index
    from ragline.index.manifest import is_index_dir
    from ragline.system import open as open_system

    out = paths.default_index_dir()
    if not is_index_dir(out):
        render.log(f"building the default index of the bundled Wikipedia leads at {out} "
                   "(a few minutes on 2 cores; interrupt and rerun to resume)")
        build_index(BuildOptions(source="wiki-leads", out=out, limit=limit, device=device), log=render.log)
    render.log("the first use of a bundled generator converts its weights once")
    render.log(f"loading the generator {generator}")
    rag = open_system(out, generator, precision=precision, device=device, k=k, mode=mode, log=render.log)
    render.answer(rag.ask(question, model=model_name))
