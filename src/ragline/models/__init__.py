"""Models: the bundled weights (catalog) and the retriever's bi-encoder (encoders)."""
