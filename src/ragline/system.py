"""The front door: ``ragline.open()`` gives a ready RAG system with the CLI's defaults.

    import ragline
    rag = ragline.open()                                   # the bundled index and generator
    answer = rag.ask("Who wrote Candide?")                 # an Answer: text, sources with p(z|x), log p
    hits = rag.search("Candide", k=10, mode="hybrid")      # ranked passages
    rag = ragline.open(index="indexes/mine", generator="qwen2.5-0.5b", run="runs/rag", precision="auto")

It opens the generator as ``ragline ask`` does (``--precision auto``: the fastest number format checked against
fp32's answers on this hardware; linear layers laid out once for oneDNN; the prefix cache), the index with the
question encoder every command picks (``query_encoder``, else a RAG checkpoint's, else the index's own), the
index's prior scale, a RAG checkpoint's ``n_docs`` as k, and a finished training run's models and settings.
Each call's settings (model, decoding, k, retrieval mode, filters, beams) go with that call: nothing is set on
the shared model, so one system serves callers with different settings. The CLI, eval, report, serve and MCP
open their models here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ragline import paths, vocab
from ragline.index.protocol import Index
from ragline.models.loading import LoadedGenerator, load_generator
from ragline.rag.marginal import Likelihood
from ragline.rag.model import Answer, RagModel
from ragline.retriever import Hit, open_retriever
from ragline.runconfig import trained_settings


@dataclass(frozen=True)
class Opened:
    """What :func:`open` settled: the generator and index it opened and the defaults calls start from."""

    generator: str
    index: Path
    precision: str            # the precision the generator answers in (``auto`` resolved)
    k: int
    model: str = vocab.DEFAULT_MODEL
    mode: str = vocab.DEFAULT_MODE
    query_encoder: str | None = None
    prior_scale: float | None = None
    run: Path | None = None


class Rag:
    """A ready RAG system (:func:`open`): :meth:`ask`, :meth:`search`, :meth:`likelihood`."""

    def __init__(self, model: RagModel, loaded: LoadedGenerator, opened: Opened) -> None:
        self.model, self.loaded, self.opened = model, loaded, opened

    @property
    def retriever(self):
        return self.model.retriever

    @property
    def generator(self):
        return self.model.generator

    def ask(self, questions: str | Sequence[str], model: str | None = None, decoding: str | None = None,
            k: int | None = None, mode: str | None = None, filters: Sequence[str] = (),
            beams: int = vocab.DEFAULT_BEAMS, max_new_tokens: int = vocab.DEFAULT_MAX_NEW_TOKENS,
            length_penalty: float = vocab.DEFAULT_LENGTH_PENALTY, n_best: int = 1) -> Answer | list[Answer]:
        """The answer to ``questions`` (one question: an :class:`Answer`; a list: a list of them, decoded as
        one batch), with the reader ``model`` (default: the run's, else RAG-Sequence) and its ``decoding``."""
        one = isinstance(questions, str)
        qs = [questions] if one else list(questions)
        out = self.model.answer(qs, model=model or self.opened.model, decoding=decoding, k=k or self.opened.k,
                                beams=beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                n_best=n_best, mode=mode or self.opened.mode, filters=tuple(filters))
        return out[0] if one else out

    def search(self, questions: str | Sequence[str], k: int = vocab.DEFAULT_SEARCH_K, mode: str | None = None,
               filters: Sequence[str] = ()) -> list[Hit] | list[list[Hit]]:
        """Ranked passages for ``questions`` (one question: its hits; a list: a list of them)."""
        if self.model.retriever is None:
            from ragline.errors import RaglineError

            raise RaglineError("this system was opened closed-book, with no index", "open it with an index")
        one = isinstance(questions, str)
        hits = self.model.retriever.search([questions] if one else list(questions), k=k,
                                           mode=mode or self.opened.mode, filters=tuple(filters))
        return hits[0] if one else hits

    def likelihood(self, questions: Sequence[str], answers: Sequence[str], model: str | None = None,
                   k: int | None = None) -> Likelihood:
        """The marginal likelihood of ``answers`` (with gradient to the generator and question encoder)."""
        return self.model.likelihood(list(questions), list(answers), model=model or self.opened.model,
                                     k=k or self.opened.k)


def open(index: str | Path | Index | None = None, generator: str = vocab.DEFAULT_GENERATOR, *,  # noqa: A001
         run: str | Path | None = None, precision: str = vocab.DEFAULT_PRECISION, device: str = vocab.DEFAULT_DEVICE,
         query_encoder: str | None = None, k: int | None = None, model: str | None = None, mode: str | None = None,
         prior_scale: float | None = None, kv_cache_mb: float = vocab.DEFAULT_KV_CACHE_MB,
         allow_encoder_mismatch: bool = False, bm25_weight: float = vocab.BM25_WEIGHT, rrf_c: float = vocab.RRF_C,
         follow: bool = True, log: Callable[[str], None] | None = None) -> Rag:
    """A ready RAG system over ``index`` (a directory or an opened index; default: the bundled one) with
    ``generator`` (a bundled name or a folder), as ``ragline ask`` opens them (module docstring); with
    ``model="closed-book"`` no index is opened. ``run``, a finished ``ragline train rag`` run,
    supplies its generator, question encoder, model, k, prior scale, retrieval mode and index wherever the
    arguments leave them at their defaults. ``follow`` takes up new generations of the index as they are
    written (a run that records its index passes False)."""
    settings = {"generator": generator, "index": index, "query_encoder": query_encoder, "k": k, "model": model,
                "mode": mode, "prior_scale": prior_scale}
    if run is not None:
        settings = _from_run(Path(run), settings, defaults={"generator": vocab.DEFAULT_GENERATOR})
    loaded = load_generator(settings["generator"], device=device, precision=precision, log=log)
    if hasattr(loaded.generator, "kv_cache"):
        from ragline.models.prefill import cache_of_mb

        loaded.generator.kv_cache = cache_of_mb(kv_cache_mb)
    chosen = settings["index"]
    where = chosen if chosen is not None and not isinstance(chosen, str | Path) else None  # an opened Index
    index_dir = where.path if where is not None else Path(chosen) if chosen else paths.default_index_dir()
    reader = settings["model"] or loaded.model or vocab.DEFAULT_MODEL
    retriever = None
    if reader != vocab.CLOSED_BOOK:  # closed book reads no passage: no index needed
        retriever = open_retriever(where or index_dir, settings["query_encoder"], loaded.question_encoder,
                                   allow_encoder_mismatch=allow_encoder_mismatch, bm25_weight=bm25_weight,
                                   rrf_c=rrf_c, log=log or (lambda m: None), device=device, follow=follow)
    opened = Opened(generator=str(settings["generator"]), index=index_dir, precision=loaded.precision,
                    k=settings["k"] or loaded.n_docs or vocab.DEFAULT_K, model=reader,
                    mode=settings["mode"] or vocab.DEFAULT_MODE, query_encoder=settings["query_encoder"],
                    prior_scale=settings["prior_scale"], run=Path(run) if run is not None else None)
    rag = RagModel(retriever, loaded.generator, k=opened.k, mode=opened.mode, prior_scale=opened.prior_scale)
    return Rag(rag, loaded, opened)


def _from_run(run: Path, settings: dict, defaults: dict) -> dict:
    """``settings`` with a finished training run's own wherever they are None (or at ``defaults``)."""
    out = dict(settings)
    for name, value in trained_settings(run).items():
        if value is not None and (out.get(name) is None or out.get(name) == defaults.get(name)):
            out[name] = value
    return out
