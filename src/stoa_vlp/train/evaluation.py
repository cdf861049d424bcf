"""Validation during training: zero-shot text-to-video and video-to-text retrieval on a split."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from stoa_vlp.config import Config


def retrieval_loader(config: Config, split: str, max_videos: int = 0) -> DataLoader:
    """Sequential loader over every (video, caption) of `split`; with `max_videos`, only the captions
    of the split's first `max_videos` videos."""
    from stoa_vlp.data.dataset import build_dataset, collate

    dataset = build_dataset(config, split)
    if max_videos > 0:
        keep = np.flatnonzero(dataset.items[:, 0] < max_videos).tolist()
        dataset = Subset(dataset, keep)
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        shuffle=False,
        num_workers=config.data.num_workers,
        collate_fn=collate,
    )


class RetrievalEvaluator:
    """`evaluator(module) -> metrics` for the Trainer: retrieval metrics (t2v_r1 ... v2t_mnr) of
    `module.model` (or `module` itself) on a split. The loader is built on first use."""

    def __init__(self, config: Config, split: str, device: torch.device, max_videos: int = 0):
        self.config, self.split, self.device, self.max_videos = config, split, device, max_videos
        self.loader: DataLoader | None = None

    def __call__(self, module: nn.Module) -> dict[str, float]:
        from stoa_vlp.tasks.retrieval import evaluate_retrieval

        if self.loader is None:
            self.loader = retrieval_loader(self.config, self.split, self.max_videos)
        model = getattr(module, "model", module)
        return evaluate_retrieval(model, self.loader, self.device)
