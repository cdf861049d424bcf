"""Frame transform: Resize(short side) + CenterCrop on uint8 frames.

Frames stay uint8 up to the model, which CLIP-normalises them on its device
(`stoa_vlp.model.towers.VideoTower.normalize`): the data-loading processes save that pass, and
batches are a quarter of the bytes of float32 frames to collate, pin and copy to the GPU.
`stoa_vlp.data.geometry.resize_crop` reproduces the same geometry for boxes.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2


def resize_crop_transform(size: int) -> v2.Compose:
    """(T, 3, H, W) uint8 -> (T, 3, size, size) uint8: short side to `size` (bicubic, antialiased), centre crop."""
    return v2.Compose(
        [
            v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
        ]
    )


class FrameTransform:
    """The data pipeline's frame transform: uint8 (T, 3, H, W) -> uint8 (T, 3, size, size)."""

    def __init__(self, size: int):
        self.size = size
        self.resize_crop = resize_crop_transform(size)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        return self.resize_crop(frames)
