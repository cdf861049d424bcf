"""Frame transform: Resize(short side) + CenterCrop on uint8 frames, then CLIP normalisation.

Resize and crop run on uint8 tensors (less memory traffic); conversion to float and the CLIP
mean/std normalisation are the last step. `stoa_vlp.data.geometry.resize_crop` reproduces the
same geometry for boxes.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_crop_transform(size: int) -> v2.Compose:
    """(T, 3, H, W) uint8 -> (T, 3, size, size) uint8: short side to `size` (bicubic, antialiased), centre crop."""
    return v2.Compose(
        [
            v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
        ]
    )


def normalize_transform() -> v2.Compose:
    """uint8 frames -> float32 in [0, 1] -> CLIP mean/std normalised."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


class FrameTransform:
    """The full frame pipeline of the model: uint8 (T, 3, H, W) -> float32 (T, 3, size, size)."""

    def __init__(self, size: int):
        self.size = size
        self.resize_crop = resize_crop_transform(size)
        self.normalize = normalize_transform()

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        return self.normalize(self.resize_crop(frames))
