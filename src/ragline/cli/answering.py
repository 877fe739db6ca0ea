"""Commands that answer: ``search``, ``ask`` and ``demo``."""

from __future__ import annotations

import json

import click

from ragline import paths, vocab
from ragline.cli import render
from ragline.cli.group import cli
from ragline.cli.options import (
    GENERATOR_HELP,
    K_HELP,
    device_option,
    filter_option,
    from_run,
    index_option,
    mode_option,
    model_options,
    open_retriever,
    precision_option,
    reader_options,
    retrieval_options,
    run_option,
)

DEMO_QUESTION = "Who directed the film 2001: A Space Odyssey?"


@cli.command()
@click.argument("questions", nargs=-1, required=True)
@index_option
@click.option("-k", "k", default=vocab.DEFAULT_SEARCH_K, show_default=True, type=int)
@mode_option()
@retrieval_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@filter_option
@device_option
def search(questions, index_dir, k, mode, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, as_json,
           filters, device) -> None:
    """Print the top-k passages for each QUESTION with their scores."""
    retriever = open_retriever(index_dir, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, device=device)
    results = retriever.search(list(questions), k=k, mode=mode, filters=filters)
    for q, hits in zip(questions, results, strict=True):
        if as_json:
            print(json.dumps({"question": q, "mode": mode, "index": retriever.index.fingerprint,
                              "hits": [h.__dict__ for h in hits]}, ensure_ascii=False))
        else:
            render.hits(q, hits, mode)


@cli.command()
@click.argument("questions", nargs=-1, required=True)
@index_option
@model_options
@click.option("-k", "k", default=None, type=click.IntRange(1), help=K_HELP)
@mode_option()
@reader_options
@click.option("--n-best", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Also print the next best answers (beam decodings).")
@retrieval_options
@run_option
@click.option("--json", "as_json", is_flag=True, help="Print the full answer structure as JSON lines.")
@filter_option
@device_option
@precision_option
@click.pass_context
def ask(ctx, questions, index_dir, model_name, decoding, k, mode, generator, beams, max_new_tokens, length_penalty,
        prior_scale, n_best, query_encoder, allow_encoder_mismatch, bm25_weight, rrf_c, run_dir, as_json,
        filters, device, precision) -> None:
    """Answer each QUESTION with RAG and print the answer with its cited passages."""
    from ragline.system import open as open_system

    s = from_run(ctx, run_dir, {"generator": generator, "model_name": model_name, "k": k, "prior_scale": prior_scale,
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


@cli.command()
@click.argument("question", required=False, default=DEMO_QUESTION)
@click.option("-k", "k", default=vocab.DEFAULT_K, show_default=True, type=int)
@mode_option(vocab.HYBRID)
@click.option("--model", "model_name", type=click.Choice(vocab.RAG_MODELS), default=vocab.DEFAULT_MODEL,
              show_default=True)
@click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP)
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Build the default index from the first N documents only (a quick look).")
@device_option
@precision_option
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
