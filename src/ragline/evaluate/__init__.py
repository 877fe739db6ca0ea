"""Evaluation: question sets (datasets) and metrics (retrieval)."""
