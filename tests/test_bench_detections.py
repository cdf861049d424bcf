"""The detections benchmark's baseline keeps the boxes the data pipeline keeps, and its smoke run prints its tables."""

import numpy as np

from _bench import load_bench
from stoa_vlp.data.object_targets import suppress_across_classes


def test_the_earlier_suppression_keeps_the_same_boxes():
    bench = load_bench("detections")
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, limit = int(rng.integers(0, 40)), int(rng.integers(1, 12))
        corners = rng.uniform(0, 100, size=(n, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(5, 80, size=(n, 2))], axis=1).astype(np.float32)
        labels, confs = rng.integers(0, 4, n), rng.uniform(0, 1, n).astype(np.float32)
        np.testing.assert_array_equal(suppress_across_classes(boxes, labels, confs, limit=limit),
                                      bench.earlier_suppression(boxes, labels, confs, limit))


def test_smoke_run_prints_both_tables(capsys):
    assert load_bench("detections").main(["--repeat", "1", "--videos", "5"]) == 0
    printed = capsys.readouterr().out
    assert "| 600 x 50 |" in printed and "| 100 |" in printed and "earlier code ms" in printed
    assert "| read_packed_detections (packed as read) |" in printed
    assert "| DetectionsStore (stoa-vlp pack), arrays mapped |" in printed and "read from a store ms" in printed
