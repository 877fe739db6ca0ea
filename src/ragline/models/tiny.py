"""A tiny randomly initialised causal generator for tests and load benchmarks: two Llama layers of width 32
with SmolLM2's tokenizer. Quick to run and to train; its answers are noise."""

from __future__ import annotations

from pathlib import Path

import torch

from ragline.models.causal import CausalGenerator


def tiny_causal(seed: int = 0) -> CausalGenerator:
    """The tiny generator, identical for the same ``seed``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragline.models.catalog import generator_path

    _, smol = generator_path("smollm2")
    tok = AutoTokenizer.from_pretrained(str(smol))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return CausalGenerator(LlamaForCausalLM(cfg).eval(), tok, "tiny-llama")


def save_tiny_causal(folder: Path, seed: int = 0) -> Path:
    """Write the tiny generator as a Hugging Face folder (``--generator FOLDER`` loads it)."""
    gen = tiny_causal(seed)
    gen.model.save_pretrained(folder)
    gen.tokenizer.save_pretrained(folder)
    return folder
