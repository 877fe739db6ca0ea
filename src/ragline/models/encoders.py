"""The retriever's bi-encoder (DPR layout): a question encoder q(x) and a passage encoder d(z).

Both default to all-MiniLM-L6-v2 (sentence-transformers, unit-normalised 384-d outputs), so
``q(x)·d(z)`` is a cosine similarity. Each encoder has a ``fingerprint`` (a hash of its weights); a question
encoder is *paired* with the passage encoder whose fingerprint it names in ``paired_with``. An index built
with passage encoder P accepts only question encoders paired with P.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ragline.errors import RaglineError
from ragline.models.catalog import encoder_path
from ragline.vocab import DEFAULT_ENCODER

PAIRING_FILE = "ragline_encoder.json"  # written beside a trained question encoder: {"paired_with": fp}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer (name, shape, dtype, bytes), in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TextEncoder:
    """One side of the bi-encoder: texts -> float32 vectors, shape (n, dim)."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, max_seq_length: int = 256) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-load "Loading weights" bar is noise in a CLI

        self.name, path = encoder_path(name_or_path)
        self.path = path
        try:
            self.model = SentenceTransformer(str(path), device="cpu")
        except (OSError, ValueError) as e:
            raise RaglineError(f"cannot load encoder from {path} ({type(e).__name__}: {str(e)[:200]})",
                               "point to a sentence-transformers or Hugging Face model folder") from None
        self.model.max_seq_length = max_seq_length
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self._fingerprint: str | None = None
        pairing = Path(path) / PAIRING_FILE
        self._paired_with: str | None = json.loads(pairing.read_text())["paired_with"] if pairing.is_file() else None

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def paired_with(self) -> str:
        """Fingerprint of the passage encoder this (question) encoder is meant to search against."""
        return self._paired_with or self.fingerprint

    def identity(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim,
                "max_seq_length": self.max_seq_length}

    def save(self, path: Path, paired_with: str | None = None) -> None:
        """Write the encoder as a sentence-transformers folder; ``paired_with`` (a passage encoder's
        fingerprint) makes it a question encoder for indexes built with that passage encoder."""
        self.model.save(str(path))
        if paired_with is not None:
            (Path(path) / PAIRING_FILE).write_text(json.dumps({"paired_with": paired_with}))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """q(x) with gradient (for training the question encoder): float32 tensor (n, dim)."""
        features = self.model.tokenize(texts)
        return self.model(features)["sentence_embedding"]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed texts without gradient; returns float32 (n, dim). Sorted by length inside for speed."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                show_progress_bar=show_progress)
        return np.ascontiguousarray(out, dtype=np.float32)


class BiEncoder:
    """Question and passage encoders. The same folder for both shares one model in memory."""

    def __init__(self, question: TextEncoder, passage: TextEncoder) -> None:
        if question.dim != passage.dim:
            raise RaglineError(f"question encoder dim {question.dim} != passage encoder dim {passage.dim}",
                               "use a question and passage encoder with the same output size")
        self.question, self.passage = question, passage

    @classmethod
    def load(cls, passage: str = DEFAULT_ENCODER, question: str | None = None,
             max_seq_length: int = 256) -> BiEncoder:
        p = TextEncoder(passage, max_seq_length=max_seq_length)
        q = p if question in (None, passage) else TextEncoder(question, max_seq_length=max_seq_length)
        return cls(q, p)
