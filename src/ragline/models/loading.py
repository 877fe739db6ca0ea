"""``--generator NAME_OR_PATH`` by kind: a bundled name or causal-LM folder, a BART/T5 folder (an
encoder-decoder config), or a Hugging Face RAG checkpoint folder (its question encoder comes with it).

:func:`generator_defaults` reads what a folder implies for the other settings (a RAG checkpoint's ``n_docs``
as the default k) from its config alone, so commands can settle their settings before loading weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ragline import vocab
from ragline.errors import RaglineError
from ragline.models import device as devices
from ragline.models import precision as precisions
from ragline.models import rag_checkpoint
from ragline.models.catalog import generator_path, is_bundled_generator
from ragline.models.causal import CausalGenerator
from ragline.models.encoders import Encoder
from ragline.models.generator import Generator
from ragline.models.packed_linear import pack_linears
from ragline.models.seq2seq import Seq2SeqGenerator

CAUSAL, SEQ2SEQ, RAG = "causal", "seq2seq", "rag"
GENERATOR_KINDS = (CAUSAL, SEQ2SEQ, RAG)


@dataclass
class LoadedGenerator:
    """A generator and what came with it: a RAG checkpoint's question encoder and its ``n_docs``."""

    generator: Generator
    kind: str
    question_encoder: Encoder | None = None
    n_docs: int | None = None
    model: str | None = None  # the RAG model the checkpoint was saved as
    precision: str = vocab.FP32  # the precision it answers in (--precision, resolved)


def generator_kind(name_or_path: str) -> str:
    """causal, seq2seq or rag, from the bundled names and the folder's config.json."""
    if is_bundled_generator(name_or_path):
        return CAUSAL
    path = Path(name_or_path).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        generator_path(name_or_path)  # a missing folder gets the catalog's own message
        raise RaglineError(f"generator folder {path} has no readable config.json",
                           "pass a Hugging Face model folder (config.json, weights, tokenizer)") from None
    if config.get("model_type") == "rag":
        return RAG
    return SEQ2SEQ if config.get("is_encoder_decoder") else CAUSAL


def generator_defaults(name_or_path: str) -> dict:
    """Settings the generator folder implies: ``{"k": n_docs}`` for a RAG checkpoint, else nothing."""
    if generator_kind(name_or_path) != RAG:
        return {}
    config = rag_checkpoint.read_config(Path(name_or_path).expanduser()) or {}
    return {"k": int(config.get("n_docs", 5))}


def load_generator(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None,
                   precision: str = vocab.FP32, log: Callable[[str], None] | None = None) -> LoadedGenerator:
    """Load ``--generator`` as its kind onto ``device`` (models/device.py; None: auto) in ``precision``
    (models/precision.py; a precision the hardware lacks falls back to fp32 with a notice to ``log``)."""
    vocab.check_precision(precision)
    kind = generator_kind(name_or_path)
    if kind == RAG:
        ckpt = rag_checkpoint.open_checkpoint(Path(name_or_path).expanduser(), dtype, device)
        loaded = LoadedGenerator(ckpt.generator, kind, ckpt.question_encoder, ckpt.n_docs, ckpt.model)
    else:
        cls = Seq2SeqGenerator if kind == SEQ2SEQ else CausalGenerator
        loaded = LoadedGenerator(cls.load(name_or_path, dtype=dtype, device=device), kind)
    chosen, notice = precisions.resolve(precision, name_or_path, devices.resolve(device))
    if notice and log is not None:
        log(notice)
    loaded.generator.model = precisions.apply(loaded.generator.model, chosen)
    loaded.precision = chosen
    if loaded.generator.device.type == "cpu":
        pack_linears(loaded.generator.model)  # oneDNN-laid-out weights for inference (models/packed_linear.py)
    return loaded
