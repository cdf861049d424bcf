"""Where a pixel of the original video lands after the frame transform.

The frame transform is torchvision.transforms.v2 `Resize(size)` (short side to `size`, the long
side scaled and truncated to an integer) followed by `CenterCrop(size)`. `resize_crop` computes the
same output size and crop offsets torchvision does, so that boxes given in original pixels can be
mapped onto the model's input frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropGeometry:
    """Original pixel (x, y) -> crop pixel (x * scale_x - offset_x, y * scale_y - offset_y)."""

    width: int  # the original frame's size
    height: int
    scale_x: float
    scale_y: float
    offset_x: int
    offset_y: int
    size: int

    @property
    def scale(self) -> float:
        """The short side's scale (the long side's differs by the integer truncation only)."""
        return min(self.scale_x, self.scale_y)

    def map_boxes(self, rects: np.ndarray, min_visible: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
        """Map (n, 4) x0,y0,x1,y1 boxes in original pixels to crop pixels.

        Returns the boxes clipped to [0, size] as (n, 4) float32 and `keep` (n,) bool, False where a
        box has no area left in the crop or keeps less than `min_visible` of its mapped area.
        """
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        offset = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        mapped = rects * scale - offset
        clipped = np.clip(mapped, 0.0, float(self.size))
        mapped_area = (mapped[:, 2] - mapped[:, 0]) * (mapped[:, 3] - mapped[:, 1])
        clipped_w = clipped[:, 2] - clipped[:, 0]
        clipped_h = clipped[:, 3] - clipped[:, 1]
        keep = (clipped_w > 0) & (clipped_h > 0) & (clipped_w * clipped_h >= min_visible * mapped_area)
        return clipped.astype(np.float32), keep


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(size): short side -> size, long side truncated."""
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def resize_crop(width: int, height: int, size: int) -> CropGeometry:
    """Geometry of Resize(size) + CenterCrop(size) on a width x height frame."""
    new_width, new_height = resized_size(width, height, size)
    return CropGeometry(
        width=width,
        height=height,
        scale_x=new_width / width,
        scale_y=new_height / height,
        offset_x=int(round((new_width - size) / 2.0)),
        offset_y=int(round((new_height - size) / 2.0)),
        size=size,
    )
