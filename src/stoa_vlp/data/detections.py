"""Object detections: the JSONL file format, VinVL conversion, the label vocabulary and the
per-clip selection of boxes and trajectory categories.

File format (design.md §3), one video per line, boxes x0,y0,x1,y1 in pixels of the original video:
    {"video_id": "video17", "width": 320, "height": 240,
     "frames": [{"time": 0.50, "objects": [{"class": "dog", "rect": [12, 40, 88, 120], "conf": 0.93}]}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np


class DetectionsError(ValueError):
    """A detections file is malformed; the message names the file and line."""


@dataclass
class FrameDetections:
    time: float  # seconds from the start of the video
    classes: list[str]  # (n,)
    rects: np.ndarray  # (n, 4) float32, x0, y0, x1, y1 in original pixels
    confs: np.ndarray  # (n,) float32


@dataclass
class VideoDetections:
    video_id: str
    width: int
    height: int
    frames: list[FrameDetections]  # sorted by time


def _frame_from_json(value: object, where: str) -> FrameDetections:
    if not isinstance(value, dict) or "time" not in value or "objects" not in value:
        raise DetectionsError(f"{where}: each frame needs 'time' and 'objects'")
    objects = value["objects"]
    if not isinstance(objects, list):
        raise DetectionsError(f"{where}: 'objects' must be a list")
    classes, rects, confs = [], [], []
    for number, obj in enumerate(objects):
        if not isinstance(obj, dict) or not {"class", "rect", "conf"} <= obj.keys():
            raise DetectionsError(f"{where}: object {number} needs 'class', 'rect' and 'conf'")
        rect = obj["rect"]
        if not isinstance(rect, list) or len(rect) != 4:
            raise DetectionsError(f"{where}: object {number} 'rect' must be [x0, y0, x1, y1]")
        try:
            rect = [float(v) for v in rect]
            conf = float(obj["conf"])
        except (TypeError, ValueError):
            raise DetectionsError(f"{where}: object {number} has a non-numeric 'rect' or 'conf'") from None
        if rect[2] < rect[0] or rect[3] < rect[1]:
            raise DetectionsError(f"{where}: object {number} 'rect' {rect} has x1 < x0 or y1 < y0")
        classes.append(str(obj["class"]))
        rects.append(rect)
        confs.append(conf)
    try:
        time = float(value["time"])
    except (TypeError, ValueError):
        raise DetectionsError(f"{where}: 'time' must be a number") from None
    return FrameDetections(
        time=time,
        classes=classes,
        rects=np.array(rects, dtype=np.float32).reshape(-1, 4),
        confs=np.array(confs, dtype=np.float32),
    )


def video_from_json(value: object, where: str) -> VideoDetections:
    """Parse one line's object; `where` ("file:line") prefixes every error message."""
    if not isinstance(value, dict):
        raise DetectionsError(f"{where}: expected a JSON object")
    missing = [key for key in ("video_id", "width", "height", "frames") if key not in value]
    if missing:
        raise DetectionsError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(value["frames"], list):
        raise DetectionsError(f"{where}: 'frames' must be a list")
    width, height = value["width"], value["height"]
    if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        raise DetectionsError(f"{where}: 'width' and 'height' must be positive integers")
    frames = [_frame_from_json(frame, f"{where} frame {i}") for i, frame in enumerate(value["frames"])]
    frames.sort(key=lambda frame: frame.time)
    return VideoDetections(str(value["video_id"]), width, height, frames)


def video_to_json(video: VideoDetections) -> dict:
    return {
        "video_id": video.video_id,
        "width": int(video.width),
        "height": int(video.height),
        "frames": [
            {
                "time": round(float(frame.time), 4),
                "objects": [
                    {"class": name, "rect": [round(float(v), 2) for v in rect], "conf": round(float(conf), 4)}
                    for name, rect, conf in zip(frame.classes, frame.rects, frame.confs)
                ],
            }
            for frame in video.frames
        ],
    }


def read_detections(path: str | Path) -> dict[str, VideoDetections]:
    """All videos of a detections JSONL file by video id. Blank lines are allowed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"detections file {path} does not exist")
    videos: dict[str, VideoDetections] = {}
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DetectionsError(f"{where}: malformed JSON ({error.msg})") from None
            video = video_from_json(value, where)
            if video.video_id in videos:
                raise DetectionsError(f"{where}: video '{video.video_id}' appears twice")
            videos[video.video_id] = video
    return videos


def write_detections(path: str | Path, videos: Iterable[VideoDetections]) -> int:
    """Write one line per video; returns the number of videos written."""
    count = 0
    with open(path, "w") as handle:
        for video in videos:
            handle.write(json.dumps(video_to_json(video)) + "\n")
            count += 1
    return count
