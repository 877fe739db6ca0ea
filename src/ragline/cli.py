"""The ``ragline`` command.

Every bad input ends in one line on stderr, ``error: <problem>; <fix>``, and exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ragline import paths
from ragline.errors import RaglineError
from ragline.models.catalog import DEFAULT_GENERATOR

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DEMO_QUESTION = "Who directed the film 2001: A Space Odyssey?"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ragline")
def cli() -> None:
    """ragline: Retrieval-Augmented Generation on CPU."""


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except RaglineError as e:
        err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err_console.print("interrupted; run the same command again to resume")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to resume")
        sys.exit(130)


def _index_option(f):
    return click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
                        help="Index directory (default: the bundled Wikipedia leads index).")(f)


def _retrieval_options(f):
    f = click.option("--query-encoder", default=None, help="Question encoder (default: the index's own).")(f)
    f = click.option("--allow-encoder-mismatch", is_flag=True,
                     help="Search even if the question encoder is not paired with the index's passage encoder.")(f)
    f = click.option("--bm25-weight", default=0.3, show_default=True, type=click.FloatRange(0),
                     help="Weight of the BM25 ranking in hybrid fusion (dense has weight 1).")(f)
    return click.option("--rrf-c", default=20.0, show_default=True, type=click.FloatRange(0),
                        help="Reciprocal-rank-fusion constant c in w / (c + rank).")(f)


def _resolve_index(index_dir: Path | None) -> Path:
    return Path(index_dir) if index_dir else paths.default_index_dir()


def _open_retriever(index_dir: Path | None, query_encoder: str | None, allow_mismatch: bool,
                    bm25_weight: float = 0.3, rrf_c: float = 20.0):
    from ragline.models.encoders import TextEncoder
    from ragline.retriever import Retriever, open_index

    index = open_index(_resolve_index(index_dir))
    enc = None
    if query_encoder:
        enc = TextEncoder(query_encoder, max_seq_length=index.manifest["encoder"]["question"]["max_seq_length"])
    return Retriever(index, enc, allow_encoder_mismatch=allow_mismatch, bm25_weight=bm25_weight, rrf_c=rrf_c)


@cli.command()
@click.option("--source", default="wiki-leads", show_default=True,
              help="JSONL file, KILT knowledge-source file, folder of .txt/.md files, or 'wiki-leads' (bundled).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Index directory to write (default: the bundled index location).")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "kilt", "text", "wiki-leads"]), default="auto",
              show_default=True)
@click.option("--index-type", default="flat", show_default=True,
              type=click.Choice(["flat", "hnsw", "ivfpq", "sq8", "ivfsq8"]), help="FAISS index type.")
@click.option("--encoder", default="minilm", show_default=True, help="Passage encoder: bundled name or model folder.")
@click.option("--query-encoder", default=None, help="Question encoder (default: the passage encoder).")
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
def index(source, out, fmt, index_type, encoder, query_encoder, passage_words, max_seq_length, batch_size,
          chunk_rows, target_recall, no_bm25, no_dense, limit, skip_bad, force, ray_address, shards,
          encode_actors) -> None:
    """Build an index: passages, dense (FAISS) and BM25. Resumes after an interruption. With --ray, a
    sharded index: Ray Data encodes the shards in parallel, and Ray actors serve them at query time."""
    from ragline.index.build import BuildOptions, build_index

    opts = BuildOptions(source=source, out=out or paths.default_index_dir(), fmt=fmt, index_type=index_type,
                        encoder=encoder, question_encoder=query_encoder, max_seq_length=max_seq_length,
                        passage_words=passage_words, batch_size=batch_size, chunk_rows=chunk_rows,
                        bm25=not no_bm25, dense=not no_dense, force=force, skip_bad=skip_bad, limit=limit,
                        target_recall=target_recall)
    if ray_address is None:
        build_index(opts, log=lambda m: err_console.print(m))
        return
    from ragline.scale.build import build_sharded

    build_sharded(opts, shards, address=None if ray_address == "local" else ray_address, actors=encode_actors,
                  log=lambda m: err_console.print(m))


@cli.command()
@click.argument("questions", nargs=-1, required=True)
@_index_option
@click.option("-k", "k", default=10, show_default=True, type=int)
@click.option("--mode", type=click.Choice(["dense", "bm25", "hybrid"]), default="dense", show_default=True)
@_retrieval_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def search(questions, index_dir, k, mode, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, as_json) -> None:
    """Print the top-k passages for each QUESTION with their scores."""
    retriever = _open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c)
    results = retriever.search(list(questions), k=k, mode=mode)
    for q, hits in zip(questions, results, strict=True):
        if as_json:
            print(json.dumps({"question": q, "mode": mode, "index": retriever.index.fingerprint,
                              "hits": [h.__dict__ for h in hits]}, ensure_ascii=False))
            continue
        _print_hits(q, hits, mode)


def _print_hits(question: str, hits, mode: str) -> None:
    table = Table(title=f"{question}  [dim]({mode})[/]", title_justify="left", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("title", style="bold")
    table.add_column("passage")
    for h in hits:
        text = h.text if len(h.text) <= 200 else h.text[:197] + "..."
        table.add_row(str(h.rank), f"{h.score:.4f}", h.title, text)
    if not hits:
        console.print(f"{question}: no passage matches ({mode})")
    else:
        console.print(table)


@cli.command()
@click.argument("questions", nargs=-1, required=True)
@_index_option
@click.option("--model", "model_name", type=click.Choice(["rag-sequence", "rag-token", "closed-book"]),
              default="rag-sequence", show_default=True)
@click.option("--decoding", type=click.Choice(["thorough", "fast", "beam", "greedy"]), default=None,
              help="rag-sequence: thorough (default) or fast; rag-token / closed-book: beam (default) or greedy.")
@click.option("-k", "k", default=5, show_default=True, type=int, help="Passages to marginalise over.")
@click.option("--beams", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--generator", default=DEFAULT_GENERATOR, show_default=True,
              help="Bundled name (qwen2.5-0.5b, smollm2) or a Hugging Face causal LM folder.")
@click.option("--mode", type=click.Choice(["dense", "bm25", "hybrid"]), default="dense", show_default=True)
@click.option("--prior-scale", default=20.0, show_default=True, type=float,
              help="p(z|x) = softmax(scale * q·d): 20 suits unit-normalised encoders such as MiniLM, 1 suits DPR.")
@click.option("--length-penalty", default=1.0, show_default=True, type=float,
              help="Beam ranking: log p / length ** this (0 ranks by log p, favouring short answers).")
@click.option("--n-best", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Also print the next best answers (beam decodings).")
@_retrieval_options
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="A finished `ragline train rag` run: use its trained generator and question encoder.")
@click.option("--json", "as_json", is_flag=True, help="Print the full answer structure as JSON lines.")
def ask(questions, index_dir, model_name, decoding, k, beams, max_new_tokens, generator, mode, prior_scale,
        length_penalty, n_best, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, run_dir, as_json) -> None:
    """Answer each QUESTION with RAG and print the answer with its cited passages."""
    from ragline.models.generators import CausalGenerator
    from ragline.rag.model import RagModel

    if run_dir is not None:
        from ragline.train.rag import load_trained

        trained = load_trained(run_dir)
        generator = str(trained["generator"])
        query_encoder = str(trained["question_encoder"]) if trained["question_encoder"] else query_encoder
        index_dir = index_dir or (Path(trained["index"]) if trained.get("index") else None)

    retriever = None
    if model_name != "closed-book":
        retriever = _open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c)
    rag = RagModel(retriever, CausalGenerator.load(generator), k=k, mode=mode, prior_scale=prior_scale)
    for a in rag.answer(list(questions), model=model_name, decoding=decoding, beams=beams,
                        max_new_tokens=max_new_tokens, length_penalty=length_penalty, n_best=n_best):
        if as_json:
            print(json.dumps(a.to_dict(), ensure_ascii=False))
        else:
            _print_answer(a)


def _print_answer(a) -> None:
    console.print(f"[bold]Question:[/] {a.question}")
    console.print(f"[bold green]Answer:[/] {a.text}  [dim]({a.model}, {a.decoding}, log p = {a.logprob:.2f})[/]")
    for i, (text, lp) in enumerate(a.alternatives[1:], 2):
        console.print(f"  [dim]#{i}: {text}  (log p = {lp:.2f})[/]")
    if not a.sources:
        return
    console.print("[bold]Sources[/] (prior p(z|x) -> posterior p(z|x,y)):")
    for s in sorted(a.sources, key=lambda s: -s.posterior):
        snippet = s.text if len(s.text) <= 160 else s.text[:157] + "..."
        console.print(f"  [{s.rank}] [bold]{s.title}[/] {s.prior:.2f} -> [bold]{s.posterior:.2f}[/]  [dim]{snippet}[/]")
    if a.token_sources:
        console.print("[bold]Tokens[/] (most likely source): " + " ".join(
            f"{tok.strip() or repr(tok)}[{max(range(len(p)), key=p.__getitem__) + 1}]" for tok, p in a.token_sources))


@cli.command("eval-retrieval")
@_index_option
@click.option("--questions", default="fanoutqa-dev", show_default=True,
              help="'fanoutqa-dev' (bundled dev split) or a JSONL/KILT question file with gold pages.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["dense", "bm25", "hybrid"]),
              help="Repeatable; default: every mode the index supports.")
@click.option("-k", "ks", multiple=True, type=click.IntRange(1), help="Cut-offs (default 1 5 20 100).")
@_retrieval_options
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the metrics as JSON.")
def eval_retrieval(index_dir, questions, modes, ks, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c,
                   json_out) -> None:
    """Recall@k, precision@k and R-precision of the gold Wikipedia pages."""
    from ragline import atomic
    from ragline.evaluate.runner import evaluate_retrieval, load_eval_questions

    retriever = _open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c)
    qs, note = load_eval_questions(questions, retriever.index)
    err_console.print(note)
    ks = sorted(set(ks or (1, 5, 20, 100)))
    modes = modes or retriever.index.modes
    rows = {}
    for mode in modes:
        t0 = time.perf_counter()
        rows[mode] = evaluate_retrieval(retriever, qs, ks, mode)
        rows[mode]["seconds"] = time.perf_counter() - t0
    table = Table(title=f"retrieval on {questions} ({len(qs)} questions), index {retriever.index.name}",
                  title_justify="left")
    table.add_column("mode")
    cols = [f"recall@{k}" for k in ks] + ["r_precision"]
    for c in cols:
        table.add_column(c, justify="right")
    for mode, m in rows.items():
        table.add_row(mode, *(f"{m[c]:.3f}" for c in cols))
    console.print(table)
    if json_out:
        atomic.write_json(Path(json_out), {"questions": questions, "n": len(qs), "index": retriever.index.fingerprint,
                                           "metrics": rows})


def _eval_options(f):
    f = click.option("--generator", default=DEFAULT_GENERATOR, show_default=True,
                     help="Bundled name (qwen2.5-0.5b, smollm2) or a Hugging Face causal LM folder.")(f)
    f = click.option("--beams", default=4, show_default=True, type=click.IntRange(1, 64))(f)
    f = click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1, 1024))(f)
    f = click.option("--length-penalty", default=0.0, show_default=True, type=float,
                     help="Beam ranking: log p / length ** this.")(f)
    f = click.option("--prior-scale", default=20.0, show_default=True, type=float,
                     help="p(z|x) = softmax(scale * q·d).")(f)
    f = click.option("--limit", type=click.IntRange(1), default=None, help="The first N questions only.")(f)
    f = click.option("--batch", default=4, show_default=True, type=click.IntRange(1, 256),
                     help="Questions decoded together.")(f)
    return f


@cli.command("eval")
@click.option("--task", default="fanoutqa-dev", show_default=True,
              help="'fanoutqa-dev' or 'fanoutqa-dev-answerable' (bundled dev split) or a task file (KILT, JSONL, DPR .qa.csv, TriviaQA, "
                   "WebQuestions, CuratedTrec, FEVER, MS-MARCO, Jeopardy .source).")
@click.option("--format", "fmt", default=None, help="Task file format (default: detected from the file).")
@_index_option
@click.option("--model", "model_name", type=click.Choice(["rag-sequence", "rag-token", "closed-book"]),
              default="rag-sequence", show_default=True)
@click.option("--decoding", type=click.Choice(["thorough", "fast", "beam", "greedy"]), default=None,
              help="rag-sequence: thorough (default) or fast; rag-token / closed-book: beam (default) or greedy.")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--mode", type=click.Choice(["dense", "bm25", "hybrid"]), default="dense", show_default=True)
@_eval_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory (rerun with the same settings to resume).")
@click.option("--skip-bad", is_flag=True, help="Skip malformed task records (listed in the report) instead of failing.")
def eval_cmd(task, fmt, index_dir, model_name, decoding, k, mode, generator, beams, max_new_tokens, length_penalty,
             prior_scale, limit, batch, out, skip_bad) -> None:
    """Answer a task's questions into a run directory: KILT-format predictions and a report."""
    from ragline.evaluate.harness import EvalConfig, run_eval
    from ragline.evaluate.report import markdown
    from ragline.rag.model import _check_model

    _check_model(model_name, decoding)
    cfg = EvalConfig(task=task, format=fmt, index=str(index_dir) if index_dir else None, model=model_name,
                     decoding=decoding, k=1 if model_name == "closed-book" else k, mode=mode, generator=generator,
                     beams=beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                     prior_scale=prior_scale, limit=limit, batch=batch)
    report = run_eval(cfg, Path(out), skip_bad=skip_bad, log=lambda m: err_console.print(m))
    console.print(markdown(report))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Also draw the metrics as a bar chart.")
def compare(runs, png) -> None:
    """Put finished eval runs side by side."""
    from ragline.evaluate.report import compare as compare_runs

    console.print(compare_runs(list(runs), png))


REPORT_GRID = [("closed-book", "greedy", "dense", None)] + [
    (model, decoding, "dense", k) for k in (1, 5, 10)
    for model, decoding in (("rag-token", "greedy"), ("rag-sequence", "fast"), ("rag-sequence", "thorough"))
] + [("rag-sequence", "thorough", mode, 5) for mode in ("bm25", "hybrid")]


@cli.command()
@_index_option
@_eval_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/fanoutqa-dev"), show_default=True)
@click.option("--task", default="fanoutqa-dev", show_default=True,
              help="The task every run answers ('fanoutqa-dev-answerable': the 35 answerable dev questions).")
def report(index_dir, generator, beams, max_new_tokens, length_penalty, prior_scale, limit, batch, out, task) -> None:
    """The comparison report: closed book, RAG-Token, RAG-Sequence fast and thorough at k = 1, 5, 10, and
    BM25 / dense / hybrid retrieval, each a resumable run under OUT, then OUT/README.md and OUT/comparison.png."""
    from ragline.evaluate.harness import EvalConfig, run_eval
    from ragline.evaluate.report import compare as compare_runs

    out = Path(out)
    runs = []
    for i, (model, decoding, mode, k) in enumerate(REPORT_GRID, 1):
        name = model if k is None else f"{model}-{decoding}-{mode}-k{k}"
        err_console.print(f"[bold]run {i}/{len(REPORT_GRID)}: {name}[/]")
        cfg = EvalConfig(task=task, index=str(index_dir) if index_dir else None, model=model, decoding=decoding,
                         k=k or 1, mode=mode, generator=generator, beams=beams, max_new_tokens=max_new_tokens,
                         length_penalty=length_penalty, prior_scale=prior_scale, limit=limit, batch=batch)
        run_eval(cfg, out / name, log=lambda m: err_console.print(m))
        runs.append(out / name)
    from ragline import atomic

    table = compare_runs(runs, out / "comparison.png")
    atomic.write_bytes(out / "README.md", (f"# ragline report: {task}\n\nOne run per row (`ragline report`); "
                                           f"metrics as KILT defines them.\n\n{table}").encode())
    console.print(table)


@cli.command()
@_index_option
@click.option("--generator", default=DEFAULT_GENERATOR, show_default=True,
              help="Bundled name (qwen2.5-0.5b, smollm2) or a Hugging Face causal LM folder.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Serve the models of a finished `ragline train rag` run.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Questions arriving together with the same settings are decoded in one batch of at most this.")
@click.option("--prior-scale", default=20.0, show_default=True, type=float)
def serve(index_dir, generator, run_dir, host, port, max_batch, prior_scale) -> None:
    """Serve the HTTP API (POST /ask, /ask/stream, /search; GET /passages/ID, /indexes, /health)."""
    import uvicorn

    from ragline.models.generators import CausalGenerator
    from ragline.rag.model import RagModel
    from ragline.serve.app import create_app

    query_encoder = None
    if run_dir is not None:
        from ragline.train.rag import load_trained

        trained = load_trained(run_dir)
        generator = str(trained["generator"])
        query_encoder = str(trained["question_encoder"]) if trained["question_encoder"] else None
    retriever = _open_retriever(index_dir, query_encoder, False)
    err_console.print(f"loading the generator {generator}")
    rag = RagModel(retriever, CausalGenerator.load(generator), prior_scale=prior_scale)
    err_console.print(f"serving index {retriever.index.name} on http://{host}:{port} (API schema at /docs)")
    uvicorn.run(create_app(rag, max_batch=max_batch), host=host, port=port, log_level="warning")


@cli.group()
def train() -> None:
    """Training: end-to-end RAG fine-tuning."""


@train.command("rag")
@click.option("--train", "train_spec", default="fanoutqa-dev", show_default=True,
              help="Training examples: JSONL (question, answers, optional positive) or KILT, or 'fanoutqa-dev'.")
@_index_option
@click.option("--generator", default="smollm2", show_default=True, help="Bundled name or a causal LM folder.")
@click.option("--model", "model_name", type=click.Choice(["rag-sequence", "rag-token"]), default="rag-sequence",
              show_default=True)
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1, 50))
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
@click.option("--prior-scale", default=20.0, show_default=True, type=float)
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--val-limit", default=64, show_default=True, type=click.IntRange(1))
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory (rerun the same command to resume after an interruption).")
def train_rag(train_spec, index_dir, generator, model_name, k, generator_training, lora_r, lora_alpha,
              freeze_question_encoder, lr, question_encoder_lr, batch_size, accumulation, steps, warmup, clip, seed,
              precision, label_smoothing, prior_scale, val_fraction, val_limit, eval_every, save_every, out) -> None:
    """Fine-tune the question encoder and the generator on the marginal likelihood (index frozen)."""
    from ragline.train.rag import RagTrainConfig, RagTrainer

    cfg = RagTrainConfig(train=train_spec, index=str(index_dir) if index_dir else None, generator=generator,
                         model=model_name, k=k, generator_training=generator_training, lora_r=lora_r,
                         lora_alpha=lora_alpha, train_question_encoder=not freeze_question_encoder, lr=lr,
                         question_encoder_lr=question_encoder_lr, batch_size=batch_size, accumulation=accumulation,
                         steps=steps, warmup=warmup, clip=clip, seed=seed, precision=precision,
                         label_smoothing=label_smoothing, prior_scale=prior_scale, val_fraction=val_fraction,
                         val_limit=val_limit, eval_every=eval_every, save_every=save_every)
    result = RagTrainer(cfg, Path(out), log=lambda m: err_console.print(m)).run_training()
    console.print(f"trained {result['steps']} steps (last loss {result['last_loss']:.4f}); models in {result['final']}; "
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
@click.option("--scale", default=20.0, show_default=True, type=float, help="Score scale s in softmax(s q·d).")
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
def train_retriever(train_spec, index_dir, train_passage_encoder, new_index, hard_negatives, scale, lr, batch_size,
                    accumulation, steps, warmup, seed, val_fraction, eval_every, save_every, out) -> None:
    """DPR training of the question (and optionally passage) encoder with in-batch + BM25 hard negatives."""
    from ragline.train.retriever import RetrieverTrainConfig, RetrieverTrainer

    cfg = RetrieverTrainConfig(train=train_spec, index=str(index_dir) if index_dir else None,
                               train_passage_encoder=train_passage_encoder,
                               new_index=str(new_index) if new_index else None, hard_negatives=hard_negatives,
                               scale=scale, lr=lr, batch_size=batch_size, accumulation=accumulation, steps=steps,
                               warmup=warmup, seed=seed, val_fraction=val_fraction, eval_every=eval_every,
                               save_every=save_every)
    result = RetrieverTrainer(cfg, Path(out), log=lambda m: err_console.print(m)).run_training()
    console.print(f"trained {result['steps']} steps (last loss {result['last_loss']:.4f}); encoders in "
                  f"{result['final']}; search with `ragline search --query-encoder {result['final']}/question_encoder`")


@train.command("fanoutqa-dev")
@click.argument("out", type=click.Path(path_type=Path))
def train_fanoutqa(out) -> None:
    """Write the FanOutQA dev split (top-level ids 0-7 only) as a JSONL training file."""
    from ragline.train.data import read_examples, write_examples

    examples = read_examples("fanoutqa-dev")
    write_examples(Path(out), examples)
    console.print(f"wrote {len(examples)} examples to {out}")


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Folder holding index directories.")
def indexes(root) -> None:
    """List the index directories side by side."""
    from ragline.index.directory import list_indexes

    root = Path(root) if root else paths.default_index_dir().parent
    found = list_indexes(root)
    if not found:
        console.print(f"no index under {root}; build one with `ragline index`")
        return
    table = Table(title=str(root), title_justify="left")
    for c in ("name", "fingerprint", "passages", "dense", "bm25", "encoder", "created"):
        table.add_column(c)
    for path, m in found:
        dense = m.get("dense") or {}
        name = path.name + (f" ({len(m['shards'])} shards, Ray)" if m.get("shards") else "")
        table.add_row(name, m["fingerprint"], str(m["corpus"]["passages"]), dense.get("factory", "-"),
                      "yes" if m.get("bm25") else "no", str((m["encoder"].get("passage") or {}).get("name")),
                      m["created_at"])
    console.print(table)


@cli.command()
@click.argument("question", required=False, default=DEMO_QUESTION)
@click.option("-k", "k", default=5, show_default=True, type=int)
@click.option("--mode", type=click.Choice(["dense", "bm25", "hybrid"]), default="hybrid", show_default=True)
@click.option("--model", "model_name", type=click.Choice(["rag-sequence", "rag-token"]), default="rag-sequence",
              show_default=True)
@click.option("--generator", default=DEFAULT_GENERATOR, show_default=True,
              help="Bundled name (qwen2.5-0.5b, smollm2) or a Hugging Face causal LM folder.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Build the default index from the first N documents only (a quick look).")
def demo(question, k, mode, model_name, generator, limit) -> None:
    """The main job on the embedded default: build the bundled index if missing, then answer a question
    with RAG and print the answer with its sources."""
    from ragline.index.build import BuildOptions, build_index
    from ragline.index.manifest import is_index_dir
    from ragline.models.generators import CausalGenerator
    from ragline.rag.model import RagModel

    out = paths.default_index_dir()
    if not is_index_dir(out):
        err_console.print(f"building the default index of the bundled Wikipedia leads at {out} "
                          "(a few minutes on 2 cores; interrupt and rerun to resume)")
        build_index(BuildOptions(source="wiki-leads", out=out, limit=limit), log=lambda m: err_console.print(m))
    retriever = _open_retriever(out, None, False)
    err_console.print(f"loading the generator {generator} (the first use converts the bundled weights once)")
    rag = RagModel(retriever, CausalGenerator.load(generator), k=k, mode=mode)
    for a in rag.answer([question], model=model_name):
        _print_answer(a)
