"""The retriever's bi-encoder (DPR layout): a question encoder q(x) and a passage encoder d(z), by kind.

Three kinds of folder load, each as what it is (:func:`encoder_kind` tells them apart; a folder of no known
kind is refused, never silently mean-pooled):

* ``sentence-transformers`` (:class:`TextEncoder`): the folder's own pooling and normalisation. The default,
  all-MiniLM-L6-v2, gives unit-normalised 384-d vectors, so ``q(x)·d(z)`` is a cosine.
* ``dpr-question`` / ``dpr-context`` (:class:`DprEncoder`): Hugging Face ``DPRQuestionEncoder`` /
  ``DPRContextEncoder`` folders: the [CLS] vector (through the projection when there is one), not
  normalised, so ``q(x)·d(z)`` is DPR's raw inner product.
* ``bert-cls``: a plain BERT folder used DPR-style (the [CLS] vector of the last layer, as DPR's own
  ``HFBertEncoder`` pools), e.g. DPR's original checkpoints converted to ``BertModel``.

Passages are encoded as each kind was trained: sentence-transformers read ``title\ntext``; DPR encoders read
(title, text) as a sentence pair, ``[CLS] title [SEP] text [SEP]``, cut at the maximum length.

Each encoder has a ``fingerprint`` (a hash of its weights); a question encoder is *paired* with the passage
encoder whose fingerprint it names in ``paired_with``. An index built with passage encoder P accepts only
question encoders paired with P, or the question encoder it was built with.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ragline.corpus.passages import encoder_text
from ragline.errors import RaglineError
from ragline.models import device as devices
from ragline.models.catalog import encoder_path
from ragline.vocab import DEFAULT_ENCODER, DEFAULT_PRIOR_SCALE, DPR_PRIOR_SCALE

PAIRING_FILE = "ragline_encoder.json"  # written beside a trained question encoder: {"paired_with": fp}
SENTENCE_TRANSFORMERS, DPR_QUESTION, DPR_CONTEXT, BERT_CLS = "sentence-transformers", "dpr-question", "dpr-context", \
    "bert-cls"
ENCODER_KINDS = (SENTENCE_TRANSFORMERS, DPR_QUESTION, DPR_CONTEXT, BERT_CLS)
DPR_MAX_LENGTH = 256  # DPR's encoder.sequence_length for questions and (title, text) passages


def weights_fingerprint(module: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer (name, shape, dtype, bytes), in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_kind(path: Path) -> str:
    """The kind of the encoder folder ``path`` (one of :data:`ENCODER_KINDS`), from its files and config."""
    path = Path(path)
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return SENTENCE_TRANSFORMERS
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    model_type, arch = config.get("model_type"), " ".join(config.get("architectures") or [])
    if model_type == "dpr" and "DPRQuestionEncoder" in arch:
        return DPR_QUESTION
    if model_type == "dpr" and "DPRContextEncoder" in arch:
        return DPR_CONTEXT
    if model_type == "bert":
        return BERT_CLS
    what = f"a {model_type!r} model ({arch or 'no architecture named'})" if model_type else "no model config"
    raise RaglineError(
        f"encoder folder {path} holds {what}: not a sentence-transformers folder (no modules.json), nor a DPR "
        "question/context encoder, nor a BERT model; ragline will not guess how to pool it",
        "save it with sentence-transformers (SentenceTransformer(...).save(folder)) to declare its pooling, or pass "
        "a Hugging Face DPRQuestionEncoder / DPRContextEncoder folder")


def _check_modules(path: Path) -> None:
    """Refuse a sentence-transformers folder whose ``modules.json`` names a module class outside
    sentence-transformers (``custom.Module``): loading it would import Python code from the folder or from any
    installed package. (sentence-transformers 6 refuses too without ``trust_remote_code``, which ragline never
    passes; this check holds whatever the installed release.)"""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise RaglineError(f"{path}/modules.json is not readable JSON", "save the encoder again with "
                                                                         "sentence-transformers") from None
    types = [m.get("type") if isinstance(m, dict) else None for m in modules] if isinstance(modules, list) else [None]
    foreign = [t for t in types if not (isinstance(t, str) and t.startswith("sentence_transformers."))]
    if foreign:
        raise RaglineError(f"encoder folder {path} names a module that is not part of sentence-transformers "
                           f"({str(foreign[0])[:100]!r}); ragline does not run code that comes with a model",
                           "use an encoder made of sentence-transformers' own modules (Transformer, Pooling, "
                           "Normalize, ...)")


def load_encoder(name_or_path: str = DEFAULT_ENCODER, max_seq_length: int = 256, device: str | None = None
                 ) -> Encoder:
    """The encoder of a bundled name or folder, loaded as its kind (:func:`encoder_kind`) onto ``device``
    (models/device.py; None: auto)."""
    _, path = encoder_path(name_or_path)
    kind = encoder_kind(path)
    if kind == SENTENCE_TRANSFORMERS:
        return TextEncoder(name_or_path, max_seq_length, device)
    return DprEncoder.load(name_or_path, kind, max_seq_length, device)


class Encoder(ABC):
    """One side of the bi-encoder: texts -> float32 vectors, shape (n, dim).

    ``kind``, ``pooling`` and ``normalised`` say how vectors are made; ``prior_scale`` is the s of
    p_eta(z|x) = softmax(s · q(x)·d(z)) that suits them (1 for raw inner products as in the paper, 20 for
    unit-normalised vectors such as MiniLM's cosines)."""

    name: str
    path: Path
    model: torch.nn.Module
    dim: int
    kind: str
    pooling: str
    normalised: bool
    _paired_with: str | None = None
    _fingerprint: str | None = None

    @property
    @abstractmethod
    def max_seq_length(self) -> int:
        """Tokens read per text (longer texts are cut)."""

    @property
    def prior_scale(self) -> float:
        return DEFAULT_PRIOR_SCALE if self.normalised else DPR_PRIOR_SCALE

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def paired_with(self) -> str:
        """Fingerprint of the passage encoder this (question) encoder is meant to search against."""
        return self._paired_with or self.fingerprint

    def _read_pairing(self) -> None:
        pairing = Path(self.path) / PAIRING_FILE
        self._paired_with = json.loads(pairing.read_text())["paired_with"] if pairing.is_file() else None

    def identity(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim,
                "max_seq_length": self.max_seq_length, "kind": self.kind, "pooling": self.pooling,
                "normalised": self.normalised}

    def save(self, path: Path, paired_with: str | None = None) -> None:
        """Write the encoder as a folder of its kind; ``paired_with`` (a passage encoder's fingerprint) makes it a
        question encoder for indexes built with that passage encoder."""
        self._save(Path(path))
        if paired_with is not None:
            (Path(path) / PAIRING_FILE).write_text(json.dumps({"paired_with": paired_with}))

    @abstractmethod
    def _save(self, path: Path) -> None: ...

    @abstractmethod
    def embed(self, texts: list[str]) -> torch.Tensor:
        """q(x) with gradient (for training): float32 tensor (n, dim)."""

    @abstractmethod
    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed questions (or any texts) without gradient; returns float32 (n, dim)."""

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the encoder reads of ``texts``, truncated as it truncates them."""
        tokenizer = getattr(self, "tokenizer", None) or self.model.tokenizer
        ids = tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]
        return sum(len(x) for x in ids)

    def embed_passages(self, titles: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """d(z) of (title, text) passages with gradient, read as this kind was trained to: (n, dim)."""
        return self.embed([encoder_text(t, x) for t, x in zip(titles, texts, strict=True)])

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """d(z) of (title, text) passages without gradient: float32 (n, dim)."""
        return self.encode([encoder_text(t, x) for t, x in zip(titles, texts, strict=True)], batch_size=batch_size)


class TextEncoder(Encoder):
    """A sentence-transformers encoder: the folder's own pooling and normalisation."""

    kind = SENTENCE_TRANSFORMERS

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, max_seq_length: int = 256, device: str | None = None
                 ) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-load "Loading weights" bar is noise in a CLI

        self.name, path = encoder_path(name_or_path)
        self.path = path
        if encoder_kind(path) != SENTENCE_TRANSFORMERS:  # SentenceTransformer would mean-pool it silently
            raise RaglineError(f"{path} is not a sentence-transformers folder (no modules.json)",
                               "load it with ragline.models.encoders.load_encoder, which reads it as its kind")
        _check_modules(path)
        try:
            self.model = SentenceTransformer(str(path), device=str(devices.resolve(device)))
        except (OSError, ValueError) as e:
            raise RaglineError(f"cannot load encoder from {path} ({type(e).__name__}: {str(e)[:200]})",
                               "point to a sentence-transformers or Hugging Face model folder") from None
        self.model.max_seq_length = max_seq_length
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        modules = [type(m).__name__ for m in self.model]
        pooling = [m for m in self.model if type(m).__name__ == "Pooling"]
        self.pooling = str(pooling[0].get_config_dict().get("pooling_mode", "?")) if pooling else "none"
        self.normalised = "Normalize" in modules
        self._read_pairing()

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def _save(self, path: Path) -> None:
        self.model.save(str(path))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """q(x) with gradient (for training the question encoder): float32 tensor (n, dim)."""
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # tokenize: before 6.x
        features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v
                    for k, v in prepare(texts).items()}
        return self.model(features)["sentence_embedding"]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed texts without gradient; returns float32 (n, dim). Sorted by length inside for speed."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                show_progress_bar=show_progress)
        return np.ascontiguousarray(out, dtype=np.float32)


class DprEncoder(Encoder):
    """A DPR encoder: the [CLS] vector of a ``DPRQuestionEncoder`` / ``DPRContextEncoder`` (its pooler output,
    through the projection when there is one) or of a plain BERT model, not normalised."""

    pooling, normalised = "cls", False

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, path: Path, kind: str,
                 max_seq_length: int = DPR_MAX_LENGTH) -> None:
        self.model, self.tokenizer, self.name, self.path, self.kind = model, tokenizer, name, Path(path), kind
        self._max_seq_length = max_seq_length
        cfg = model.config
        self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)
        self._read_pairing()

    @classmethod
    def load(cls, name_or_path: str, kind: str, max_seq_length: int = DPR_MAX_LENGTH, device: str | None = None
             ) -> DprEncoder:
        from transformers import AutoModel, AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        name, path = encoder_path(name_or_path)
        model_cls = {DPR_QUESTION: DPRQuestionEncoder, DPR_CONTEXT: DPRContextEncoder, BERT_CLS: AutoModel}[kind]
        try:
            model = model_cls.from_pretrained(str(path), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise RaglineError(f"cannot load the {kind} encoder from {path} ({type(e).__name__}: {str(e)[:200]})",
                               "point to a complete Hugging Face model folder (config, weights, tokenizer)") from None
        return cls(model.to(devices.resolve(device)).eval(), tok, name, path, kind, max_seq_length)

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    def _save(self, path: Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _forward(self, enc: dict) -> torch.Tensor:
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        if self.kind == BERT_CLS:
            return self.model(**enc).last_hidden_state[:, 0]  # (n, hidden): [CLS], as DPR's HFBertEncoder pools
        return self.model(**enc).pooler_output  # (n, dim): [CLS] (+ projection)

    def _tokens(self, first: Sequence[str], second: Sequence[str] | None = None) -> dict:
        return self.tokenizer(list(first), None if second is None else list(second), padding=True, truncation=True,
                              max_length=self.max_seq_length, return_tensors="pt")

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self._forward(self._tokens(texts)).float()

    def embed_passages(self, titles: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        return self._forward(self._tokens(titles, texts)).float()  # [CLS] title [SEP] text [SEP]

    @torch.inference_mode()
    def _batched(self, n: int, batch_size: int, vectors) -> np.ndarray:
        out = np.zeros((n, self.dim), dtype=np.float32)
        for lo in range(0, n, batch_size):
            out[lo : lo + batch_size] = vectors(slice(lo, lo + batch_size)).cpu().numpy()
        return out

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self._batched(len(texts), batch_size, lambda s: self.embed(texts[s]))

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        titles, texts = list(titles), list(texts)
        return self._batched(len(texts), batch_size, lambda s: self.embed_passages(titles[s], texts[s]))


class BiEncoder:
    """Question and passage encoders. The same folder for both shares one model in memory."""

    def __init__(self, question: Encoder, passage: Encoder) -> None:
        if question.dim != passage.dim:
            raise RaglineError(f"question encoder dim {question.dim} != passage encoder dim {passage.dim}",
                               "use a question and passage encoder with the same output size")
        self.question, self.passage = question, passage

    @classmethod
    def load(cls, passage: str = DEFAULT_ENCODER, question: str | None = None,
             max_seq_length: int = 256, device: str | None = None) -> BiEncoder:
        p = load_encoder(passage, max_seq_length, device)
        q = p if question in (None, passage) else load_encoder(question, max_seq_length, device)
        return cls(q, p)
