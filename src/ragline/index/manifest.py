"""The index directory's manifest and the checks made when an index is opened.

An index directory holds::

    manifest.json     written last: its presence means the directory is complete
    passages.arrow    the passage store (row number = passage id in every index below)
    embeddings.npy    d(z) for every passage, float32 (n, dim); read by RAG training for p_eta(z|x)
    dense.faiss       the FAISS index over embeddings.npy (a flat one: its header only, filled from them on open)
    bm25/             the bm25s index over the same passages (title + text), and their term counts
    segments/, tombstones/   passages added and rows deleted in place (:mod:`ragline.index.segments`)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ragline.errors import RaglineError
from ragline.vocab import DEFAULT_PRIOR_SCALE

FORMAT = "ragline-index"
FORMAT_VERSION = 1
LIVING_VERSION = 2  # an index with segments or deleted rows: older ragline would search its base only
READABLE_VERSIONS = (FORMAT_VERSION, LIVING_VERSION)
MANIFEST = "manifest.json"
PASSAGES = "passages.arrow"
EMBEDDINGS = "embeddings.npy"
DENSE = "dense.faiss"
BM25 = "bm25"
SEGMENTS = "segments"
TOMBSTONES = "tombstones"


def index_fingerprint(manifest: dict[str, Any]) -> str:
    """Identity of an index: its corpus, passage encoder and dense index configuration."""
    key = {
        "corpus": manifest["corpus"]["fingerprint"],
        "encoder": manifest["encoder"]["passage"]["fingerprint"],
        "dense": {k: manifest["dense"].get(k) for k in ("type", "factory")} if manifest.get("dense") else None,
        "bm25": manifest.get("bm25") is not None,
    }
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()


def is_index_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RaglineError(f"index {path} does not exist",
                           f"build it with `ragline index --source SOURCE --out {path}` (or run `ragline demo`)")
    if not (path / MANIFEST).is_file():
        raise RaglineError(f"{path} is not a complete ragline index (no {MANIFEST})",
                           f"rebuild it with `ragline index --out {path}`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise RaglineError(f"{path / MANIFEST} is not valid JSON ({e.msg})", "rebuild the index") from None
    if manifest.get("format") != FORMAT:
        raise RaglineError(f"{path} is not a ragline index", "point --index at a directory made by `ragline index`")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise RaglineError(f"index {path} has format version {manifest.get('format_version')}, this ragline reads "
                           f"{' and '.join(map(str, READABLE_VERSIONS))}",
                           "rebuild the index with this version of ragline")
    return manifest


def is_living(manifest: dict[str, Any]) -> bool:
    """Whether the index has delta segments or deleted rows (a generation written by add, update or delete)."""
    return bool(manifest.get("segments") or manifest.get("tombstones"))


def live_passages(manifest: dict[str, Any]) -> int:
    """Passages a search can return: all of the corpus, less deleted ones, plus added ones."""
    return int((manifest.get("live") or {}).get("passages", manifest["corpus"]["passages"]))


def prior_scale(manifest: dict[str, Any]) -> float:
    """The s of p_eta(z|x) = softmax(s · q(x)·d(z)) that fits the index's encoder (1 for DPR's raw inner
    products, 20 for unit-normalised vectors); indexes built before it was recorded used MiniLM's 20."""
    return float((manifest.get("encoder") or {}).get("prior_scale") or DEFAULT_PRIOR_SCALE)


def check_question_encoder(manifest: dict[str, Any], dim: int, paired_with: str, name: str,
                           allow_mismatch: bool = False, fingerprint: str | None = None) -> None:
    """Fail unless a question encoder (output size ``dim``, paired with passage encoder fingerprint
    ``paired_with``, weights ``fingerprint``) can search this index: it is paired with the index's passage
    encoder, or it is the question encoder the index was built with (a DPR pair: two models)."""
    passage = manifest["encoder"]["passage"]
    built_with = (manifest["encoder"].get("question") or {}).get("fingerprint")
    where = manifest.get("name", "this index")
    if dim != manifest["encoder"]["dim"]:
        raise RaglineError(
            f"question encoder {name} gives {dim}-d vectors but index {where} holds {manifest['encoder']['dim']}-d "
            f"vectors from {passage['name']}",
            f"use the question encoder the index was built with, or rebuild with `ragline index --encoder {name}`")
    if paired_with != passage["fingerprint"] and not (fingerprint and fingerprint == built_with) and not allow_mismatch:
        raise RaglineError(
            f"question encoder {name} (paired with passage encoder {paired_with[:12]}) does not match index "
            f"{where}, built with passage encoder {passage['name']} ({passage['fingerprint'][:12]})",
            "use the matching --query-encoder, rebuild the index with this encoder, or pass "
            "--allow-encoder-mismatch if you know the two are compatible")
