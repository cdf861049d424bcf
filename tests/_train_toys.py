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


class RandomClips(Dataset):
    """Clips for the real tiny STOA model without video files: fixed random frames, boxes and
    captions per index (every caption has 2 nouns and 1 verb, so every rank matches as many DOTA /
    STASP pairs); each load adds frame noise from torch's global RNG, as random frame sampling would."""

    def __init__(self, config, size: int = 16):
        from stoa_vlp.batch import TAG_NOUN, TAG_VERB

        m = config.model
        generator = torch.Generator().manual_seed(99)
        self.config, self.size = config, size
        pixels = (size, m.frames, 3, m.image_size, m.image_size)
        self.frames = torch.randint(0, 256, pixels, dtype=torch.uint8, generator=generator)  # as decoded
        corner = torch.rand(size, m.frames, m.boxes_per_frame, 2, generator=generator) * m.image_size / 2
        self.boxes = torch.cat([corner, corner + m.image_size / 4], dim=-1)
        self.box_labels = torch.randint(1, m.num_object_classes, (size, m.frames, m.boxes_per_frame), generator=generator)
        self.traj_labels = torch.randint(1, m.num_object_classes, (size, m.trajectories), generator=generator)
        words = 6
        self.tokens = torch.zeros(size, m.text_len, dtype=torch.long)
        self.tokens[:, 0] = 49406
        self.tokens[:, 1 : 1 + words] = torch.randint(300, 3000, (size, words), generator=generator)
        self.tokens[:, 1 + words] = 49407
        self.text_mask = self.tokens > 0
        self.pos_tags = torch.zeros(size, m.text_len, dtype=torch.long)
        self.pos_tags[:, 2] = self.pos_tags[:, 4] = TAG_NOUN
        self.pos_tags[:, 3] = TAG_VERB

    def __len__(self) -> int:
        return self.size

    def noisy_frames(self, index: int) -> torch.Tensor:
        """(T, 3, S, S) uint8: the clip's frames with +-8 of noise per pixel."""
        noise = torch.randint(-8, 9, self.frames[index].shape, dtype=torch.int16)
        return (self.frames[index].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)

    def __getitem__(self, index: int):
        from stoa_vlp.data.dataset import Sample

        m = self.config.model
        return Sample(
            frames=self.noisy_frames(index),
            boxes=self.boxes[index].numpy(),
            box_labels=self.box_labels[index].numpy(),
            box_mask=torch.ones(m.frames, m.boxes_per_frame, dtype=torch.bool).numpy(),
            traj_labels=self.traj_labels[index].numpy(),
            traj_mask=torch.ones(m.trajectories, dtype=torch.bool).numpy(),
            tokens=self.tokens[index],
            text_mask=self.text_mask[index],
            pos_tags=self.pos_tags[index].numpy(),
            video_index=index,
            video_id=f"clip{index}",
        )


def tiny_pretrainer(config):
    from stoa_vlp.model import build_model
    from stoa_vlp.objectives import Pretrainer

    torch.manual_seed(config.train.seed)
    return Pretrainer(build_model(config.model), config.loss)


class one_thread:
    """Context manager: torch on one thread (tiny matrices gain nothing from more, and on a shared
    machine idle OpenMP threads spin), restored afterwards."""

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)
