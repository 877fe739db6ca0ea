"""Hugging Face RAG checkpoints (``RagSequenceForGeneration`` / ``RagTokenForGeneration`` folders): open one as
ragline's question encoder and generator, and write one from them.

A RAG folder holds one config (a ``RagConfig`` with the question encoder's and the generator's configs
inside), one state dict (``rag.question_encoder.*`` and ``rag.generator.*``) and the two tokenizers in the
sub-folders ``question_encoder_tokenizer/`` and ``generator_tokenizer/`` (as ``RagTokenizer`` saves them).
The prompt layout (``title_sep``, ``doc_sep``, ``max_combined_length``, the generator's ``prefix``) and the
default number of passages (``n_docs``) come from the config.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ragline import vocab
from ragline.errors import RaglineError
from ragline.models import device as devices
from ragline.models.encoders import DPR_QUESTION, DprEncoder, Encoder
from ragline.models.prompts import Seq2SeqPrompt
from ragline.models.seq2seq import Seq2SeqGenerator

QUESTION_TOKENIZER_DIR, GENERATOR_TOKENIZER_DIR = "question_encoder_tokenizer", "generator_tokenizer"
CLASSES = {vocab.RAG_SEQUENCE: "RagSequenceForGeneration", vocab.RAG_TOKEN: "RagTokenForGeneration"}


@dataclass
class RagCheckpoint:
    """The parts of a RAG folder: its question encoder, its generator, ``n_docs`` and the model it was saved
    as (rag-sequence, rag-token, or None for a bare ``RagModel``)."""

    question_encoder: DprEncoder
    generator: Seq2SeqGenerator
    n_docs: int
    model: str | None


def read_config(path: Path) -> dict | None:
    """The folder's config.json when it is a RAG checkpoint's, else None."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("model_type") == "rag" else None


def open_checkpoint(path: Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> RagCheckpoint:
    """Split the RAG folder ``path`` into its question encoder and generator, with their tokenizers."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    config = read_config(path)
    if config is None:
        raise RaglineError(f"{path} is not a Hugging Face RAG checkpoint (config.json model_type is not 'rag')",
                           "pass a folder saved by RagSequenceForGeneration / RagTokenForGeneration.save_pretrained")
    missing = [d for d in (QUESTION_TOKENIZER_DIR, GENERATOR_TOKENIZER_DIR) if not (path / d).is_dir()]
    if missing:
        raise RaglineError(f"RAG checkpoint {path} has no {' or '.join(missing)} folder",
                           "save its tokenizers beside it with RagTokenizer.save_pretrained(folder)")
    arch = (config.get("architectures") or ["RagModel"])[0]
    model_name = {v: k for k, v in CLASSES.items()}.get(arch)
    cls = getattr(transformers, arch if arch in (*CLASSES.values(), "RagModel") else "RagModel")
    try:
        model = cls.from_pretrained(str(path), dtype=dtype).to(devices.resolve(device)).eval()
        qtok = AutoTokenizer.from_pretrained(str(path / QUESTION_TOKENIZER_DIR))
        gtok = AutoTokenizer.from_pretrained(str(path / GENERATOR_TOKENIZER_DIR))
    except (OSError, ValueError) as e:
        raise RaglineError(f"cannot load RAG checkpoint {path} ({type(e).__name__}: {str(e)[:200]})",
                           "check that the folder is complete (config, weights, both tokenizer folders)") from None
    rag = getattr(model, "rag", model)
    cfg = rag.config
    encoder = DprEncoder(rag.question_encoder.eval(), qtok, f"{path.resolve()}#question_encoder", path, DPR_QUESTION)
    layout = Seq2SeqPrompt(title_sep=cfg.title_sep, doc_sep=cfg.doc_sep,
                           prefix=getattr(cfg.generator, "prefix", None) or "",
                           max_combined_length=cfg.max_combined_length)
    generator = Seq2SeqGenerator(rag.generator.eval(), gtok, f"{path.resolve()}#generator", layout, qtok)
    return RagCheckpoint(encoder, generator, int(cfg.n_docs), model_name)


def export_checkpoint(out: Path, question_encoder: Encoder, generator: Seq2SeqGenerator, model: str,
                      n_docs: int) -> Path:
    """Write a Hugging Face RAG folder (``model``: rag-sequence or rag-token) from a DPR question encoder and a
    seq2seq generator; written to a temporary folder, then renamed onto ``out``.

    The folder behaves as every RAG checkpoint does, in transformers and in ragline: its generator reads each
    question as the question encoder's tokenizer decodes it (BERT uncased lower-cases it). A generator trained
    on questions as typed may answer a little differently once exported when its vocabulary is cased."""
    import transformers
    from transformers import RagConfig, RagTokenizer

    if not isinstance(question_encoder, DprEncoder) or question_encoder.kind != DPR_QUESTION:
        raise RaglineError(f"the question encoder {question_encoder.name} is a {question_encoder.kind} encoder; a "
                           "Hugging Face RAG checkpoint holds a DPR question encoder",
                           "train with an index built with DPR encoders (--encoder DPR_CTX --query-encoder DPR_Q)")
    if not isinstance(generator, Seq2SeqGenerator):
        raise RaglineError(f"the generator {generator.name} is not an encoder-decoder model; a Hugging Face RAG "
                           "checkpoint holds a BART or T5 generator", "train with --generator BART_OR_T5_FOLDER")
    if model not in CLASSES:
        raise RaglineError(f"cannot export model {model!r}", f"export one of {', '.join(CLASSES)}")
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise RaglineError(f"{out} already exists", "choose another --out or remove it; nothing was written")
    lay = generator.layout
    qcfg, gcfg = question_encoder.model.config, generator.model.config
    config = RagConfig.from_question_encoder_generator_configs(
        qcfg, gcfg, n_docs=n_docs, title_sep=lay.title_sep, doc_sep=lay.doc_sep,
        max_combined_length=lay.max_combined_length)
    hf = getattr(transformers, CLASSES[model])(config=config, question_encoder=question_encoder.model,
                                               generator=generator.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp) / "rag"
        hf.save_pretrained(folder)
        RagTokenizer(question_encoder.tokenizer, generator.tokenizer).save_pretrained(str(folder))
        os.rename(folder, out)
    return out
