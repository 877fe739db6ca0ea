"""A single index directory (format ``ragline-index``), opened and checked against its manifest; implements
:class:`ragline.index.protocol.Index`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragline.corpus.store import PassageStore
from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.index.dense import DenseIndex
from ragline.index.protocol import ManifestFacts, search_modes
from ragline.index.sparse import BM25Index


@dataclass
class IndexDir(ManifestFacts):
    """A complete single index: passage store, embeddings, FAISS and BM25 parts (see :mod:`.manifest`)."""

    path: Path
    manifest: dict[str, Any]
    store: PassageStore
    embeddings: np.ndarray | None = None  # memmap (n, dim) float32
    dense: DenseIndex | None = None
    bm25: BM25Index | None = None
    modes: tuple[str, ...] = field(default=())

    @classmethod
    def open(cls, path: str | Path, manifest: dict[str, Any] | None = None, search: bool = True) -> IndexDir:
        """Open the index at ``path`` as ``manifest`` (default: read now) describes it; an index changed in place
        opens as its base only (:func:`ragline.index.segments.open_single` opens it whole). ``search=False``
        leaves the search parts (the FAISS index, BM25) unread: what a change to the index needs."""
        path = Path(path).expanduser().resolve()
        manifest = manifest or mf.read_manifest(path)
        n = manifest["corpus"]["passages"]
        store = PassageStore(path / mf.PASSAGES)
        if len(store) != n:
            raise corrupt(path, f"{mf.PASSAGES} has {len(store)} passages, the manifest says {n}")
        out = cls(path, manifest, store)
        if manifest.get("dense"):
            try:
                out.embeddings = np.load(path / mf.EMBEDDINGS, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise corrupt(path, f"cannot read {mf.EMBEDDINGS} ({e})") from None
            if out.embeddings.shape != (n, manifest["encoder"]["dim"]):
                raise corrupt(path, f"{mf.EMBEDDINGS} has shape {out.embeddings.shape}")
            d = manifest["dense"]
            if not (path / mf.DENSE).is_file():
                raise corrupt(path, f"{mf.DENSE} is missing")
        if manifest.get("dense") and search:
            out.dense = DenseIndex.load(path / mf.DENSE, d["type"], d.get("search_param"), d.get("search_value"),
                                        d.get("rerank", 0), out.embeddings)
            if out.dense.ntotal != n:
                raise corrupt(path, f"{mf.DENSE} holds {out.dense.ntotal} vectors, the manifest says {n}")
        if manifest.get("bm25") and search:
            out.bm25 = BM25Index.load(path / mf.BM25)
            if out.bm25.ntotal != n:
                raise corrupt(path, f"the BM25 index holds {out.bm25.ntotal} passages, the manifest says {n}")
        out.modes = search_modes(out.dense, out.bm25)
        return out

    def __len__(self) -> int:
        return len(self.store)


def corrupt(path: Path, what: str) -> RaglineError:
    """The error for a damaged index: what is wrong, and how to rebuild it."""
    return RaglineError(f"index {path} is damaged: {what}", f"rebuild it with `ragline index --out {path} --force`")

