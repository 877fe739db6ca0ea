"""Options and helpers the commands share: the index, device, precision, retrieval and reader settings, and a
trained run's settings. Names and defaults come from :mod:`ragline.vocab`."""

from __future__ import annotations

from pathlib import Path

import click

from ragline import paths, vocab
from ragline.cli import render

GENERATOR_HELP = ("Bundled name (qwen2.5-0.5b, smollm2), or a Hugging Face folder: a causal LM, a BART/T5 model, or a "
                  "RAG checkpoint (RagSequenceForGeneration / RagTokenForGeneration: its question encoder and n_docs "
                  "come with it).")
KS_HELP = f"Cut-offs (default {' '.join(map(str, vocab.RETRIEVAL_KS))})."
K_HELP = "Passages to marginalise over (default: a RAG checkpoint's n_docs, else 5)."
PRIOR_HELP = ("p(z|x) = softmax(scale * q·d) (default: the index's own, 1 for DPR's inner products, 20 for "
              "unit-normalised encoders such as MiniLM).")


def index_option(f):
    return click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
                        help="Index directory, single or sharded (default: the bundled Wikipedia leads index).")(f)


def device_option(f):
    return click.option("--device", type=click.Choice(vocab.DEVICES), default=vocab.DEFAULT_DEVICE, show_default=True,
                        help="Where the encoders and the generator run (auto: a GPU when torch sees one).")(f)


def precision_option(f):
    return click.option("--precision", type=click.Choice(vocab.PRECISIONS), default=vocab.DEFAULT_PRECISION,
                        show_default=True,
                        help="The generator's number format: fp32, bf16 (CPUs with AVX512-BF16/AMX, GPUs), int8 (CPU, "
                             "VNNI; answers may differ from fp32's); auto: the fastest checked against fp32's "
                             "answers for this generator that the hardware runs natively, else fp32.")(f)


def query_encoder_option(f):
    return click.option("--query-encoder", default=None,
                        help="Question encoder, e.g. a `ragline train retriever` run's (default: the index's own).")(f)


def retrieval_options(f):
    f = query_encoder_option(f)
    f = click.option("--allow-encoder-mismatch", is_flag=True,
                     help="Search even if the question encoder is not paired with the index's passage encoder.")(f)
    f = click.option("--bm25-weight", default=vocab.BM25_WEIGHT, show_default=True, type=click.FloatRange(0),
                     help="Weight of the BM25 ranking in hybrid fusion (dense has weight 1).")(f)
    return click.option("--rrf-c", default=vocab.RRF_C, show_default=True, type=click.FloatRange(0),
                        help="Reciprocal-rank-fusion constant c in w / (c + rank).")(f)


def mode_option(default: str = vocab.DEFAULT_MODE):
    return click.option("--mode", type=click.Choice(vocab.MODES), default=default, show_default=True,
                        help="Retrieval: dense (q·d), bm25, or hybrid (reciprocal-rank fusion).")


def reader_options(f):
    """Model, decoding and the decoding settings shared by ask, eval and report."""
    f = click.option("--beams", default=vocab.DEFAULT_BEAMS, show_default=True, type=click.IntRange(1, 64))(f)
    f = click.option("--max-new-tokens", default=vocab.DEFAULT_MAX_NEW_TOKENS, show_default=True,
                     type=click.IntRange(1, 1024))(f)
    f = click.option("--length-penalty", default=vocab.DEFAULT_LENGTH_PENALTY, show_default=True, type=float,
                     help="Beam ranking: log p / length ** this (0 ranks by log p; 1 favours longer answers).")(f)
    f = click.option("--prior-scale", default=None, type=float, help=PRIOR_HELP)(f)
    return click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP)(f)


def model_options(f):
    f = click.option("--model", "model_name", type=click.Choice(vocab.MODELS), default=vocab.DEFAULT_MODEL,
                     show_default=True)(f)
    decodings = "; ".join(f"{m}: {' or '.join(d)}" for m, d in vocab.DECODINGS.items())
    return click.option("--decoding", type=click.Choice(vocab.ALL_DECODINGS), default=None,
                        help=f"{decodings} (the first is the default).")(f)


def filter_option(f):
    return click.option("--filter", "filters", multiple=True, callback=check_filters, metavar="FIELD=VALUE",
                        help="Only passages whose metadata match (repeatable): field=value, field!=value, or "
                             "field=prefix* for paths; fields: pid, doc_id, title, source, page, section and a "
                             "JSONL corpus's own metadata keys.")(f)


def check_filters(ctx, param, value):
    from ragline.index.filters import parse_filters

    parse_filters(value)  # a malformed condition fails before any model loads
    return list(value)


def run_option(f):
    return click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
                        help="A finished `ragline train rag` run: its trained models and the settings it trained "
                             "with (model, k, prior scale, mode, index), unless given here.")(f)


def skip_bad_option(f):
    return click.option("--skip-bad", is_flag=True,
                        help="Skip malformed question records (each reported) instead of failing.")(f)


def resolve_index(index_dir: Path | None) -> Path:
    return Path(index_dir) if index_dir else paths.default_index_dir()


def open_retriever(index_dir: Path | None, query_encoder: str | None, allow_mismatch: bool = False,
                    bm25_weight: float = vocab.BM25_WEIGHT, rrf_c: float = vocab.RRF_C, checkpoint_encoder=None,
                    device: str | None = None):
    from ragline.retriever import open_retriever

    return open_retriever(resolve_index(index_dir), query_encoder, checkpoint_encoder,
                          allow_encoder_mismatch=allow_mismatch, bm25_weight=bm25_weight, rrf_c=rrf_c, log=render.log,
                          device=device)


def from_run(ctx: click.Context, run_dir: Path | None, settings: dict) -> dict:
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
