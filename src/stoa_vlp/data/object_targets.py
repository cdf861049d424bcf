"""Per-clip selection of object targets from a video's detections (`select_objects`).

Each sampled frame takes the nearest detected frame in time; its boxes are mapped through the frame
transform (boxes leaving the crop are dropped), a box overlapping (IoU >= 0.5) a more confident kept
box of another class is suppressed, and the K most confident remaining boxes are kept (several of one
class allowed). The N trajectory categories are the label ids with the highest confidence summed over
the kept boxes of all sampled frames.
`misaligned_times` tells when a video's detection times cannot be those of its sampled frames, and
`turned_sideways` when its detections were made on its frames turned a quarter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from stoa_vlp.data.detections import LabelVocab, PackedVideoDetections, VideoDetections, packed
from stoa_vlp.data.geometry import CropGeometry


@dataclass
class ObjectTargets:
    boxes: np.ndarray  # (T, K, 4) float32, crop pixels
    labels: np.ndarray  # (T, K) int64, 0 = padding
    mask: np.ndarray  # (T, K) bool
    traj_labels: np.ndarray  # (N,) int64, 0 = padding
    traj_mask: np.ndarray  # (N,) bool


def empty_targets(frames: int, boxes_per_frame: int, trajectories: int) -> ObjectTargets:
    return ObjectTargets(
        boxes=np.zeros((frames, boxes_per_frame, 4), dtype=np.float32),
        labels=np.zeros((frames, boxes_per_frame), dtype=np.int64),
        mask=np.zeros((frames, boxes_per_frame), dtype=bool),
        traj_labels=np.zeros(trajectories, dtype=np.int64),
        traj_mask=np.zeros(trajectories, dtype=bool),
    )


def nearest_frames(detected_times: np.ndarray, times: Sequence[float]) -> list[int]:
    """Index of the detected frame (of sorted `detected_times`) nearest in time to each time (the earlier
    one on a tie)."""
    detected = detected_times.astype(np.float64)
    wanted = np.asarray(times, dtype=np.float64)
    after = np.clip(np.searchsorted(detected, wanted), 0, len(detected) - 1)
    before = np.clip(after - 1, 0, len(detected) - 1)
    take_before = np.abs(wanted - detected[before]) <= np.abs(detected[after] - wanted)
    return np.where(take_before, before, after).tolist()


MIN_TIME_SLACK = 1.0  # seconds


def misaligned_times(detected_times: np.ndarray, times: Sequence[float]) -> str | None:
    """Why the detected frames (sorted `detected_times`) cannot be of a clip sampled at `times`, or None.

    A detector sampling a video every g seconds leaves no moment of it further than g from a detected
    frame. A sampled time further than that from every detected frame (g: the largest gap between
    detected frames, or the sampled span for a lone detected frame standing for the whole video; at
    least MIN_TIME_SLACK) lies outside the detected span: the times are likely frame indices,
    milliseconds or counted from another start, and the nearest detected frame's boxes show another
    moment. The video's duration is not known here, so times in another unit that still cover the
    sampled ones (indices of every frame from 0) go unnoticed."""
    if len(detected_times) == 0 or len(times) == 0:
        return None
    wanted = np.asarray(times, dtype=np.float64)
    distance = np.abs(detected_times[nearest_frames(detected_times, wanted)] - wanted)
    gaps = np.diff(detected_times) if len(detected_times) > 1 else np.ptp(wanted, keepdims=True)
    worst = int(distance.argmax())
    if distance[worst] <= max(MIN_TIME_SLACK, float(gaps.max())):
        return None
    return (f"the frame sampled at {wanted[worst]:.2f} s is {distance[worst]:.2f} s from the nearest of "
            f"{len(detected_times)} detected frames ({detected_times[0]:g} to {detected_times[-1]:g} s): "
            "are the times frame indices, or in another unit than seconds?")


SQUARE_SLACK = 1.1  # frames with sides closer than this ratio count as square: no orientation to compare


def turned_sideways(detected_width: int, detected_height: int, width: int, height: int) -> str | None:
    """Why detections made on detected_width x detected_height frames cannot be of a video whose frames
    are width x height shown upright, or None.

    Boxes are rescaled per axis to the decoded size, so a detector that read the frames resized, or at
    their display aspect (anamorphic video), is fine. One that read them without the video's display
    rotation (frames extracted with `ffmpeg -noautorotate`, or by a reader that ignores the display
    matrix; phones write portrait video as landscape frames plus a rotation) made landscape boxes for
    portrait frames or the other way round: rescaled, they land on other pixels. Frames near square
    (either shape's sides within SQUARE_SLACK) have no orientation to tell; a half turn, too, goes
    unnoticed."""
    detected_aspect, aspect = detected_width / detected_height, width / height
    near_square = min(max(detected_aspect, 1 / detected_aspect), max(aspect, 1 / aspect)) < SQUARE_SLACK
    if near_square or (detected_aspect > 1) == (aspect > 1):
        return None
    return (f"its detections were made on {detected_width}x{detected_height} frames, but its frames are "
            f"{width}x{height} shown upright: the boxes are of the frames turned sideways (a detector that "
            "read the frames without the video's display rotation); detect with `stoa-vlp detect`, which "
            "reads frames upright, or turn the boxes")


def suppress_across_classes(
    boxes: np.ndarray, labels: np.ndarray, confs: np.ndarray, iou: float = 0.5, limit: int | None = None
) -> np.ndarray:
    """Indices of kept boxes, most confident first: a box is dropped when it overlaps a kept box of
    another class with IoU >= `iou`; boxes of one class never suppress each other. With `limit`, the
    first `limit` of them (the greedy pass stops there)."""
    order = np.argsort(-confs, kind="stable")
    ranked = torch.from_numpy(boxes[order]).double()
    overlaps = box_iou(ranked, ranked).numpy()
    ranked_labels = labels[order]
    suppresses = (overlaps >= iou) & (ranked_labels[:, None] != ranked_labels[None, :])  # (n, n): row suppresses column
    alive = np.ones(len(order), dtype=bool)  # not kept and not suppressed by a kept box
    kept: list[int] = []
    while alive.any() and (limit is None or len(kept) < limit):
        rank = int(alive.argmax())  # the most confident box left
        kept.append(rank)
        alive &= ~suppresses[rank]
        alive[rank] = False
    return order[kept]


def select_objects(
    detections: PackedVideoDetections | VideoDetections | None,
    frame_times: Sequence[float],
    geometry: CropGeometry,
    vocab: LabelVocab,
    boxes_per_frame: int,
    trajectories: int,
) -> ObjectTargets:
    """Boxes, labels and trajectory categories for a clip sampled at `frame_times` (seconds).

    Detections made on a video of another size (e.g. before `stoa-vlp prepare` resized it) are
    rescaled to the size `geometry` was computed for. No detections -> all-padding targets.
    """
    targets = empty_targets(len(frame_times), boxes_per_frame, trajectories)
    detections = None if detections is None else packed(detections)
    if detections is None or len(detections.times) == 0 or len(frame_times) == 0:
        return targets
    rescale = np.array(
        [geometry.width / detections.width, geometry.height / detections.height] * 2, dtype=np.float32
    )
    name_labels = np.array([vocab.id(name) for name in detections.class_names], dtype=np.int64)
    confidence_sum: Counter[int] = Counter()
    for t, index in enumerate(nearest_frames(detections.times, frame_times)):
        rows = detections.rows(index)
        if rows.start == rows.stop:
            continue
        boxes, inside = geometry.map_boxes(detections.rects[rows] * rescale)
        classes = detections.class_index[rows][inside]  # by name, not label: <unknown> stands for many names
        labels = name_labels[classes]
        boxes, confs = boxes[inside], detections.confs[rows][inside]
        kept = suppress_across_classes(boxes, classes, confs, limit=boxes_per_frame)
        count = len(kept)
        targets.boxes[t, :count] = boxes[kept]
        targets.labels[t, :count] = labels[kept]
        targets.mask[t, :count] = True
        for label, conf in zip(labels[kept], confs[kept]):
            confidence_sum[int(label)] += float(conf)
    ranked = sorted(confidence_sum, key=lambda label: (-confidence_sum[label], label))[:trajectories]
    targets.traj_labels[: len(ranked)] = ranked
    targets.traj_mask[: len(ranked)] = True
    return targets
