"""Corpus: documents in (readers), passages out (passages), kept in a memory-mapped store (store)."""
