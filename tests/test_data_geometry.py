"""Box mapping agrees with torchvision's Resize + CenterCrop on real pixels."""

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from stoa_vlp.data.geometry import resize_crop, resized_size


def _transformed_extent(width, height, rect, size):
    """Bounding box of a filled rectangle after torchvision's Resize(size) + CenterCrop(size)."""
    image = torch.zeros(1, height, width, dtype=torch.uint8)
    x0, y0, x1, y1 = rect
    image[:, y0:y1, x0:x1] = 255
    transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    out = transform(image)[0].float()
    assert out.shape == (size, size)
    ys, xs = torch.nonzero(out > 127, as_tuple=True)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@pytest.mark.parametrize(
    "width,height,size",
    [(320, 240, 64), (240, 320, 64), (101, 77, 48), (77, 101, 48), (640, 360, 224), (96, 96, 64)],
)
def test_boxes_match_torchvision_pixels(width, height, size):
    geometry = resize_crop(width, height, size)
    rng = np.random.default_rng(width * 1000 + height)
    # rectangles that stay inside the centre crop
    crop_w = size / geometry.scale_x
    crop_h = size / geometry.scale_y
    left = geometry.offset_x / geometry.scale_x
    top = geometry.offset_y / geometry.scale_y
    for _ in range(5):
        bw, bh = rng.uniform(0.2, 0.6) * crop_w, rng.uniform(0.2, 0.6) * crop_h
        x0 = int(left + rng.uniform(0, crop_w - bw))
        y0 = int(top + rng.uniform(0, crop_h - bh))
        rect = (x0, y0, int(x0 + bw), int(y0 + bh))
        expected = _transformed_extent(width, height, rect, size)
        boxes, keep = geometry.map_boxes(np.array([rect], dtype=np.float32))
        assert keep.all()
        np.testing.assert_allclose(boxes[0], expected, atol=1.5)


def test_output_size_matches_torchvision():
    for width, height in [(320, 240), (241, 321), (1000, 3), (3, 1000), (64, 64)]:
        image = torch.zeros(1, height, width, dtype=torch.uint8)
        out = v2.Resize(17, antialias=True)(image)
        assert resized_size(width, height, 17) == (out.shape[2], out.shape[1])


def test_boxes_leaving_the_crop_are_clipped_or_dropped():
    geometry = resize_crop(320, 240, 240)  # crop keeps x in [40, 280)
    assert (geometry.offset_x, geometry.offset_y) == (40, 0)
    rects = np.array(
        [
            [0, 10, 30, 50],  # entirely left of the crop
            [20, 10, 60, 50],  # half inside: clipped to x0 = 0
            [30, 10, 60, 50],  # 2/3 inside
            [35, 10, 45, 50],  # 1/2 inside
            [38, 10, 48, 50],  # 4/5 inside
            [100, 100, 150, 260],  # below the frame bottom, clipped at 240
        ],
        dtype=np.float32,
    )
    boxes, keep = geometry.map_boxes(rects)
    assert keep.tolist() == [False, True, True, True, True, True]
    np.testing.assert_allclose(boxes[1], [0, 10, 20, 50])
    np.testing.assert_allclose(boxes[5], [60, 100, 110, 240])
    _, keep_strict = geometry.map_boxes(rects, min_visible=0.6)
    assert keep_strict.tolist() == [False, False, True, False, True, True]
