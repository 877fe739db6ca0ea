"""Indexes over a passage store: dense MIPS (FAISS), BM25 (bm25s), hybrid fusion, and the on-disk
index directory (manifest, atomic build, loading)."""
