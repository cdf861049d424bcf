"""A toy regression task with the training engine's calling convention (forward(batch) -> {"loss"}),
used where the engine itself is under test and the STOA model would only add run time."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class ToyBatch:
    x: torch.Tensor  # (B, D)
    y: torch.Tensor  # (B,)
    video_ids: list[str]

    def to(self, device, non_blocking: bool = False) -> "ToyBatch":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def __len__(self) -> int:
        return len(self.video_ids)


class ToyDataset(Dataset):
    """Fixed inputs; each load adds noise from torch's global RNG (like random frame sampling)."""

    def __init__(self, size: int = 32, dim: int = 6):
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(size, dim, generator=generator)
        self.y = self.x @ torch.linspace(-1, 1, dim) + 0.1 * torch.randn(size, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index] + 0.05 * torch.randn_like(self.x[index]), self.y[index], f"video{index}"


def collate(samples) -> ToyBatch:
    xs, ys, ids = zip(*samples)
    return ToyBatch(torch.stack(xs), torch.stack(ys), list(ids))


class ToyModel(nn.Module):
    """A small MLP with dropout (so that the training RNG matters); `poison` makes given video ids'
    losses NaN."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 1))
        self.poison: set[str] = set()

    def forward(self, batch: ToyBatch) -> dict[str, torch.Tensor]:
        error = (self.net(batch.x).squeeze(-1) - batch.y) ** 2  # (B,)
        if any(video_id in self.poison for video_id in batch.video_ids):
            error = error * float("nan")
        loss = error.mean()
        return {"loss": loss, "mse": loss.detach()}
