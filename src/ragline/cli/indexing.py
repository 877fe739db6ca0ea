"""Commands that build and change indexes: ``index``, ``add``, ``update``, ``delete``, ``compact``, ``indexes``."""

from __future__ import annotations

from pathlib import Path

import click

from ragline import paths, vocab
from ragline.cli import render
from ragline.cli.group import cli
from ragline.cli.options import (
    device_option,
    index_option,
    resolve_index,
)
from ragline.corpus.readers import FORMATS as CORPUS_FORMATS
from ragline.vocab import INDEX_TYPES


@cli.command()
@click.option("--source", default="wiki-leads", show_default=True,
              help="JSONL file, KILT knowledge-source file, DPR passage TSV (psgs_w100.tsv), folder of .txt/.md "
                   "files, or 'wiki-leads' (bundled).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Index directory to write (default: the bundled index location).")
@click.option("--format", "fmt", type=click.Choice(CORPUS_FORMATS), default="auto", show_default=True)
@click.option("--index-type", default=vocab.DEFAULT_INDEX_TYPE, show_default=True,
              type=click.Choice((vocab.AUTO_INDEX_TYPE, *INDEX_TYPES)),
              help=f"FAISS index type; auto: exact (flat) up to {vocab.AUTO_EXACT_MAX:,} passages, then the exact "
                   f"scan over float16 vectors (fp16) while they take at most {vocab.AUTO_MEMORY_SHARE:.0%} of the "
                   "memory, else IVF-PQ.")
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
@device_option
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
    f = device_option(f)
    f = click.option("--skip-bad", is_flag=True, help="Skip malformed records (reported) instead of failing.")(f)
    f = click.option("--format", "fmt", type=click.Choice(CORPUS_FORMATS), default="auto", show_default=True)(f)
    f = click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))(f)
    f = click.argument("sources", nargs=-1, required=True)(f)
    return index_option(f)


@cli.command()
@_change_options
def add(index_dir, sources, batch_size, fmt, skip_bad, device) -> None:
    """Add the documents of SOURCES (files or folders) to an index as a new generation, without a rebuild.
    A document already there with the same content is left as it is; one with other content is refused (that
    is `ragline update`). A running server or retriever takes the new generation up by itself."""
    _changer("add")(resolve_index(index_dir), sources, fmt=fmt, skip_bad=skip_bad, batch_size=batch_size,
                    device=device, log=render.log)


@cli.command()
@_change_options
def update(index_dir, sources, batch_size, fmt, skip_bad, device) -> None:
    """Replace the documents of SOURCES in an index by id (adding those it does not hold), as a new generation;
    unchanged documents are left as they are."""
    _changer("add")(resolve_index(index_dir), sources, replace=True, fmt=fmt, skip_bad=skip_bad,
                    batch_size=batch_size, device=device, log=render.log)


@cli.command()
@index_option
@click.option("--doc", "doc_ids", multiple=True, required=True, help="A document id to delete (repeatable).")
def delete(index_dir, doc_ids) -> None:
    """Delete documents (every passage of each) from an index as a new generation; searches never return them."""
    _changer("delete")(resolve_index(index_dir), doc_ids, log=render.log)


@cli.command()
@index_option
def compact(index_dir) -> None:
    """Merge an index's base, added segments and deletions into one plain index (no re-encoding), replacing it
    atomically; searches give the same results, faster once many segments have piled up."""
    _changer("compact")(resolve_index(index_dir), log=render.log)


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Folder holding index directories.")
def indexes(root) -> None:
    """List the index directories (single and sharded) side by side."""
    from ragline.index.registry import list_indexes

    root = Path(root) if root else paths.default_index_dir().parent
    render.indexes(str(root), list_indexes(root))
