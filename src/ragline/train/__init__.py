"""Training: end-to-end RAG fine-tuning (query encoder + generator, index frozen)."""
