"""``--precision fp32|bf16|int8|auto``: the number format a generator answers in.

* fp32: the weights as trained.
* bf16: weights and activations in bfloat16; worth it on CPUs with AVX512-BF16 or AMX (and on GPUs).
* int8: the network body's ``nn.Linear`` layers quantised to int8 weights, one scale per output channel, with
  int8 activations quantised per batch at run time (torch's dynamic quantisation, fbgemm; VNNI instructions
  make it fast). Two kinds of layer stay fp32, as do embeddings, norms and the attention arithmetic:
  the output layer (quantised, its 150k-way logits lost every answer: Qwen2.5-0.5B EM 0 of 6 where fp32 has
  4) and each feed-forward block's output projection (:data:`FP32_LAYERS`), whose input carries the few huge
  activations a per-batch int8 scale cannot hold (quantised, closed-book EM fell from 10 to 2 of 35 answerable
  dev questions; kept fp32, 13, with 24 answers token for token the same). CPU only.
* auto: the fastest of these that this CPU runs natively and whose answers were checked against fp32 on the
  dev split for this generator (``benchmarks/latency.py`` measures it; :data:`CHECKED` records the result);
  fp32 otherwise.

A precision the CPU lacks the instructions for is not attempted: the generator stays fp32 and a one-line
notice says why (:func:`resolve`). Training keeps its own ``--precision fp32|bf16`` (autocast).
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch

from ragline.vocab import AUTO, BF16, FP32, INT8

# Precisions whose answers benchmarks/latency.py found within one question of fp32's EM on the 35 answerable dev
# questions (ids 0-7) for the RAG readers, per bundled generator, fastest first; auto takes the first this CPU
# runs natively. Qwen2.5-0.5B (README "Answer latency"), k=5, against fp32's RAG-Sequence thorough 0.743,
# RAG-Token greedy 0.714, single passage 0.657, closed book 0.286:
# * bf16 (2026-11-30, AVX512-BF16): the same EM in every row, cold and warm, 33-35 of 35 answers token for
#   token fp32's; RAG-Sequence thorough 2.29 s cold against int8's 3.80 and fp32's 6.94. With the packed
#   linear layers and per-row prefill attention (same day): the same EM but RAG-Token greedy's, one question
#   lower (0.686); RAG-Sequence thorough 1.75 s cold against int8's 2.04 and fp32's 2.75.
# * int8 (2026-11-25 and 2026-11-30, VNNI): RAG-Sequence 0.714-0.743, RAG-Token greedy 0.686, single passage
#   0.629-0.657.
# SmolLM2-135M (2026-11-30, `--generator smollm2 --precisions fp32,bf16,int8 --paths cold`): fp32's EM is 0 in every
# row (untrained, its answers miss: README, the fine-tuning table), and so is bf16's, with 26-34 of 35 answers token
# for token fp32's, RAG-Sequence thorough 2.14 s against fp32's 2.91. int8 moved most answers (9-16 of 35 the same)
# and RAG-Sequence's EM by two questions: left out.
CHECKED: dict[str, tuple[str, ...]] = {"qwen2.5-0.5b": (BF16, INT8), "smollm2": (BF16,)}


# Feed-forward output projections by architecture (Llama/Qwen/Mistral, BART/OPT, T5, GPT-NeoX, Mixtral experts):
# int8 leaves them in fp32 (see the module docstring).
FP32_LAYERS = ("down_proj", "fc2", "wo", "dense_4h_to_h", "w2")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native(precision: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``precision`` runs natively on ``device``, and if not, why."""
    if precision == FP32:
        return True, ""
    flags = cpu_flags()
    if precision == BF16:
        if device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported()), "this GPU has no bf16 support"
        return bool(flags & {"avx512_bf16", "amx_bf16"}), "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
    if precision == INT8:
        if device.type != "cpu":
            return False, "int8 dynamic quantisation runs on the CPU only"
        return (bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) and "fbgemm" in torch.backends.quantized.
                supported_engines), "this CPU has no int8 dot-product instructions (VNNI)"
    raise ValueError(precision)


def resolve(precision: str, generator: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to use for ``--precision`` with ``generator`` on ``device``, and a notice when an explicit
    request falls back to fp32 (auto's choice needs none)."""
    if precision == AUTO:
        for option in CHECKED.get(generator, ()):
            if native(option, device)[0]:
                return option, None
        return FP32, None
    ok, why = native(precision, device)
    if ok:
        return precision, None
    return FP32, f"--precision {precision}: {why}; answering in fp32"


def apply(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``model`` in ``precision`` (a resolved one: fp32, bf16 or int8), converted in place."""
    if precision == BF16:
        return model.to(torch.bfloat16)
    if precision == INT8:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            spec = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head and name.rsplit(".", 1)[-1] not in FP32_LAYERS}
            return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)  # no second copy in memory
    return model

