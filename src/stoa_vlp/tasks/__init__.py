"""Downstream tasks: retrieval, captioning, video QA, multiple-choice and video search."""
