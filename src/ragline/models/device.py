"""``--device auto|cpu|cuda``: where encoders, generators and training run.

``auto`` is a GPU when torch sees one, else the CPU. Models live on the device; tensors cross to it at the
models' edges (token ids in, vectors and log-probabilities out to the CPU, where retrieval and the decoding
bookkeeping run), so nothing else in ragline needs to know the device.
"""

from __future__ import annotations

import torch

from ragline.errors import RaglineError
from ragline.vocab import DEVICES


def resolve(name: str | torch.device | None = None) -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda or cuda:N; None: auto), refusing a GPU torch cannot see."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.split(":")[0] != "cuda":
        raise RaglineError(f"unknown device {name!r}", f"use one of {', '.join(DEVICES)} (or cuda:N)")
    if not torch.cuda.is_available():
        raise RaglineError(f"--device {name}: torch sees no GPU (torch {torch.__version__}, built "
                           f"{'with' if torch.version.cuda else 'without'} CUDA)",
                           "use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
    return torch.device(name)
