"""Evaluation metrics: retrieval ranks and recalls, caption scores (pycocoevalcap)."""
