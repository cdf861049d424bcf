"""Object detections: the JSONL file format, VinVL conversion, packing and the label vocabulary.
Choosing a clip's boxes and trajectory categories from them is stoa_vlp.data.object_targets.

File format (README: Detections format), one video per line, boxes x0,y0,x1,y1 in pixels of the original video:
    {"video_id": "video17", "width": 320, "height": 240,
     "frames": [{"time": 0.50, "objects": [{"class": "dog", "rect": [12, 40, 88, 120], "conf": 0.93}]}]}
video_id and class are non-empty strings, width and height positive integers, time a finite number
>= 0 (one frame per time), rect finite numbers (x0 <= x1, y0 <= y1) within the image give or take
`edge_slack` (clipped to it), not all within 1.5 pixels of its corner (normalised boxes), and conf a
number from 0 to 1; anything else is an error naming file:line. Boxes with no area (x1 = x0 or
y1 = y0) are read, counted in one warning per file, and left out of every clip (`select_objects`).
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from stoa_vlp.data.jsonl import is_finite_number, non_empty_string, open_text, read_json, read_jsonl, write_jsonl_atomic

log = logging.getLogger(__name__)


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


@dataclass
class PackedVideoDetections:
    """One video's detections as a few arrays: what a data-loading process keeps per video and
    unpickles per sample. Unpickling VideoDetections rebuilt every detected frame's objects (0.9 ms
    for 3 minutes at 1 fps and 50 boxes, 46x the packed form: bench/RESULTS.md), though a clip reads
    only its sampled frames."""

    width: int
    height: int
    times: np.ndarray  # (F,) float64, sorted
    ends: np.ndarray  # (F,) int64: frame f's boxes are rows ends[f - 1]:ends[f]
    rects: np.ndarray  # (n, 4) float32
    confs: np.ndarray  # (n,) float32
    class_index: np.ndarray  # (n,) int32 into class_names
    class_names: list[str]  # the video's distinct class names

    @classmethod
    def pack(cls, video: VideoDetections) -> PackedVideoDetections:
        class_names = sorted({name for frame in video.frames for name in frame.classes})
        index = {name: i for i, name in enumerate(class_names)}
        return cls(
            video.width,
            video.height,
            np.array([frame.time for frame in video.frames], dtype=np.float64),
            np.cumsum([len(frame.classes) for frame in video.frames], dtype=np.int64),
            np.concatenate([frame.rects.reshape(-1, 4) for frame in video.frames] or [np.zeros((0, 4))]).astype(np.float32),
            np.concatenate([frame.confs for frame in video.frames] or [np.zeros(0)]).astype(np.float32),
            np.array([index[name] for frame in video.frames for name in frame.classes], dtype=np.int32),
            class_names,
        )

    def rows(self, f: int) -> slice:
        """The rows of detected frame f's boxes."""
        return slice(int(self.ends[f - 1]) if f > 0 else 0, int(self.ends[f]))

    def boxes_per_frame(self) -> np.ndarray:
        """(F,) int64."""
        return np.diff(self.ends, prepend=0)

    def box_counts_by_class(self) -> np.ndarray:
        """(len(class_names),) int64: the video's boxes of each class."""
        return np.bincount(self.class_index, minlength=len(self.class_names))


def packed(video: VideoDetections | PackedVideoDetections) -> PackedVideoDetections:
    """`video` as PackedVideoDetections (packed if it is not)."""
    return video if isinstance(video, PackedVideoDetections) else PackedVideoDetections.pack(video)


def _finite(value, name: str, where: str) -> float:
    """`value` of field `name`, which must be a finite number (not a bool, not a string)."""
    if not is_finite_number(value):
        raise DetectionsError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _pixels(value, name: str, where: str) -> int:
    """`value` of field `name`, an image width or height: a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise DetectionsError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _object_from_json(obj: object, where: str) -> tuple[str, list[float], float]:
    """(class, rect, conf) of one detected object; `where` names it ("file:line frame 0: object 2")."""
    if not isinstance(obj, dict) or not {"class", "rect", "conf"} <= obj.keys():
        raise DetectionsError(f"{where} needs 'class', 'rect' and 'conf'")
    rect = obj["rect"]
    if not isinstance(rect, list) or len(rect) != 4:
        raise DetectionsError(f"{where} 'rect' must be [x0, y0, x1, y1]")
    rect = [_finite(v, "'rect' value", where) for v in rect]
    if rect[2] < rect[0] or rect[3] < rect[1]:
        raise DetectionsError(f"{where} 'rect' {rect} has x1 < x0 or y1 < y0")
    conf = _finite(obj["conf"], "'conf'", where)
    if not 0 <= conf <= 1:
        raise DetectionsError(f"{where} 'conf' {conf} is not between 0 and 1")
    return non_empty_string(obj["class"], "'class'", where, DetectionsError), rect, conf


def _frame_from_json(value: object, where: str) -> FrameDetections:
    if not isinstance(value, dict) or "time" not in value or "objects" not in value:
        raise DetectionsError(f"{where}: each frame needs 'time' and 'objects'")
    objects = value["objects"]
    if not isinstance(objects, list):
        raise DetectionsError(f"{where}: 'objects' must be a list")
    time = _finite(value["time"], "'time'", where)
    if time < 0:
        raise DetectionsError(f"{where}: 'time' {time} is negative (seconds from the start of the video)")
    parsed = [_object_from_json(obj, f"{where}: object {number}") for number, obj in enumerate(objects)]
    classes = [name for name, _, _ in parsed]
    rects = [rect for _, rect, _ in parsed]
    confs = [conf for _, _, conf in parsed]
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
    video_id = non_empty_string(value["video_id"], "'video_id'", where, DetectionsError)
    width, height = _pixels(value["width"], "'width'", where), _pixels(value["height"], "'height'", where)
    wheres = [f"{where} frame {i}" for i in range(len(value["frames"]))]
    frames = [(frame_where, _frame_from_json(frame, frame_where))
              for frame_where, frame in zip(wheres, value["frames"])]
    return _checked_video(video_id, width, height, frames, where)


EDGE_SLACK_SHARE, EDGE_SLACK_PIXELS = 0.02, 2.0
NORMALISED_LIMIT, NORMALISED_MIN_SIDE = 1.5, 16


def edge_slack(side: int) -> float:
    """How far (pixels) a box may reach past an image side of `side` pixels and be clipped back rather
    than be an error: 2% of the side, at least 2 pixels, about twice what detectors' boxes pass the
    edge by (rounding, the inclusive x1 = width convention, the mapping back from a resized or padded
    input: a pixel or two, up to about 1% of the side). A box reaching further is in other pixels
    (another frame size, another video) and would be dropped by the crop without a word."""
    return max(EDGE_SLACK_PIXELS, EDGE_SLACK_SHARE * side)


def _fit_to_image(frames: list[tuple[str, FrameDetections]], rects: np.ndarray, width: int,
                  height: int) -> list[tuple[str, FrameDetections]]:
    """(where, frame) pairs with their boxes clipped to the width x height image; a box reaching further
    outside than `edge_slack` is an error naming it. `rects` (n, 4) are all their boxes, checked at once:
    most videos have none to clip, and then the frames come back as they are."""
    size = np.array([width, height] * 2, dtype=np.float32)
    if ((rects >= 0) & (rects <= size)).all():
        return frames
    slack = np.array([edge_slack(width), edge_slack(height)] * 2, dtype=np.float32)
    for where, frame in frames:
        outside = ((frame.rects < -slack) | (frame.rects > size + slack)).any(axis=1)
        if outside.any():
            number = int(outside.argmax())
            raise DetectionsError(
                f"{where}: object {number} 'rect' {frame.rects[number].tolist()} reaches outside the {width}x{height} "
                f"image by more than {EDGE_SLACK_SHARE:.0%} of its side (at least {EDGE_SLACK_PIXELS:g} pixels): "
                "boxes are x0, y0, x1, y1 in pixels of that image")
    return [(where, replace(frame, rects=np.clip(frame.rects, 0, size))) for where, frame in frames]


def _not_normalised(rects: np.ndarray, width: int, height: int, where: str) -> None:
    """Boxes normalised to 0-1 (as some detectors write them) fit any image, so they pass every other
    check and end up as specks in its corner: a video whose boxes (`rects`, (n, 4)) all lie within
    NORMALISED_LIMIT pixels of the corner, on an image wider and taller than NORMALISED_MIN_SIDE, is an
    error."""
    if len(rects) and rects.max() <= NORMALISED_LIMIT and min(width, height) > NORMALISED_MIN_SIDE:
        raise DetectionsError(
            f"{where}: every box lies within {NORMALISED_LIMIT:g} pixels of the corner of the {width}x{height} "
            "image: the boxes look normalised to 0-1; give them in pixels (x * width, y * height)")


def _sorted_by_time(frames: list[tuple[str, FrameDetections]]) -> list[FrameDetections]:
    """The frames of (where, frame) pairs sorted by time. Two frames at one time are an error naming
    both: a sampled frame takes one nearest detected frame, so the other's boxes would never be used."""
    ordered = sorted(frames, key=lambda pair: pair[1].time)
    for (first_where, first), (where, frame) in zip(ordered, ordered[1:]):
        if frame.time == first.time:
            raise DetectionsError(f"{where}: time {frame.time} is also the time of {first_where} "
                                  "(give one frame per time, with all its objects)")
    return [frame for _, frame in ordered]


def _checked_video(
    video_id: str, width: int, height: int, frames: list[tuple[str, FrameDetections]], where: str
) -> VideoDetections:
    """The video of `frames`, (where the frame was read, frame) pairs, after the checks that need its
    image size or all its frames (`where` names the video in errors): boxes come back clipped to the
    image, frames sorted by time."""
    rects = np.concatenate([frame.rects for _, frame in frames]) if frames else np.zeros((0, 4), np.float32)
    _not_normalised(rects, width, height, where)
    return VideoDetections(video_id, width, height, _sorted_by_time(_fit_to_image(frames, rects, width, height)))


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


def iter_detections(path: str | Path) -> Iterator[VideoDetections]:
    """Each video of a detections JSONL file, in file order. Blank lines are allowed; a video given
    twice is an error naming file and line. A missing file is an error at the call, not at the first
    video."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"detections file {path} does not exist")
    return _videos(path)


def _videos(path: Path) -> Iterator[VideoDetections]:
    seen: set[str] = set()
    no_area, example = 0, None
    for line_number, value in read_jsonl(path, DetectionsError):
        where = f"{path}:{line_number}"
        video = video_from_json(value, where)
        if video.video_id in seen:
            raise DetectionsError(f"{where}: video '{video.video_id}' appears twice")
        seen.add(video.video_id)
        count = boxes_without_area(video)
        no_area += count
        example = example or (f"line {line_number}, video {video.video_id}" if count else None)
        yield video
    if no_area:
        log.warning("%s: %d boxes have no area (x1 = x0 or y1 = y0; e.g. %s): every clip leaves them out",
                    path, no_area, example)


def boxes_without_area(video: VideoDetections) -> int:
    """The boxes of `video` that are a line or a point (x1 = x0 or y1 = y0): `select_objects` drops them
    with the boxes that leave the crop."""
    return sum(int(((frame.rects[:, 2] <= frame.rects[:, 0]) | (frame.rects[:, 3] <= frame.rects[:, 1])).sum())
               for frame in video.frames)


def read_detections(path: str | Path) -> dict[str, VideoDetections]:
    """All videos of a detections JSONL file by video id."""
    return {video.video_id: video for video in iter_detections(path)}


def read_packed_detections(path: str | Path) -> dict[str, PackedVideoDetections]:
    """`read_detections` with each video packed as soon as it is read: what training and evaluation
    hold (33 bytes per box against 114 for the per-frame objects, bench/RESULTS.md)."""
    return {video.video_id: PackedVideoDetections.pack(video) for video in iter_detections(path)}


def write_detections(path: str | Path, videos: Iterable[VideoDetections]) -> int:
    """Write one line per video, as they come, through a temporary file renamed into place when all are
    written (an error or interrupt leaves `path` as it was); returns the number of videos written."""
    return write_jsonl_atomic(path, (video_to_json(video) for video in videos))


# ---------------------------------------------------------------- VinVL conversion

VINVL_FLAT_KEY = re.compile(r"^(?P<video>.+?)_(?P<frame>\d+)(\.\w+)?$")  # <video_id>_<frame number>[.ext]
VINVL_KEY_FORMS = "<video_id>_<frame number> or <video_id>/<file name with the frame number>"


def vinvl_key(key: str, where: str) -> tuple[str, int]:
    """(video id, frame number) of a VinVL image key. A key with a slash is a frame folder's image:
    the video is the folder (all before the last '/') and the frame number the last digits of the file
    name without its extension (`video17/frame_0003.jpg`, `video17/0003.jpg` -> video17, 3); a key
    without one is `<video_id>_<frame number>` (`video17_0003`)."""
    folder, slash, file = key.rpartition("/")
    if slash:
        numbers = re.findall(r"\d+", file.rsplit(".", 1)[0])
        if folder and numbers:
            return folder, int(numbers[-1])
    else:
        match = VINVL_FLAT_KEY.match(key)
        if match is not None:
            return match["video"], int(match["frame"])
    raise DetectionsError(f"{where}: key {key!r} is not {VINVL_KEY_FORMS}")


def _vinvl_frame(
    time: float, prediction: dict | list, size: tuple[int, int] | None, where: str
) -> tuple[FrameDetections, tuple[int, int] | None]:
    """(frame, image size) of one VinVL prediction: {"objects", "image_w", "image_h"} or the bare
    list of objects, whose size is `size` (also when the prediction has no image_w/image_h)."""
    if not isinstance(prediction, dict):
        return _frame_from_json({"time": time, "objects": prediction}, where), size
    if "image_w" in prediction or "image_h" in prediction:
        width, height = prediction.get("image_w"), prediction.get("image_h")
        size = (_pixels(width, "image_w", where), _pixels(height, "image_h", where))
    return _frame_from_json({"time": time, "objects": prediction.get("objects")}, where), size


def _same_size(size: tuple[int, int], first: tuple[int, int], first_where: str, where: str) -> None:
    """Boxes of one video are in the pixels of one frame size: another size is an error."""
    if size != first:
        raise DetectionsError(f"{where}: image size {size[0]}x{size[1]} differs from {first[0]}x{first[1]} "
                              f"at {first_where} (all frames of a video must have its size)")


def convert_vinvl(
    video_id: str,
    frames: Sequence[tuple[float, dict | list]],
    width: int | None = None,
    height: int | None = None,
) -> VideoDetections:
    """One video from VinVL-style per-frame outputs.

    `frames` holds (time in seconds, prediction) where a prediction is VinVL's
    {"objects": [{"class", "rect": [x0, y0, x1, y1], "conf", ...}], "image_w", "image_h"} or just its
    list of objects (then `width` and `height` are required). Attributes are ignored. Every frame
    must have the same size; times and boxes are checked as `video_from_json` checks them.
    """
    given = None
    if width is not None and height is not None:
        given = (_pixels(width, "width", f"video {video_id}"), _pixels(height, "height", f"video {video_id}"))
    converted, size = [], None
    for number, (time, prediction) in enumerate(frames):
        where = f"video {video_id} frame {number}"
        frame, frame_size = _vinvl_frame(time, prediction, given, where)
        if frame_size is None:
            raise DetectionsError(f"{where}: no image_w/image_h in the prediction; pass width and height")
        size = size or frame_size
        _same_size(frame_size, size, f"video {video_id} frame 0", where)
        converted.append((where, frame))
    size = size or given
    if size is None:
        raise DetectionsError(f"video {video_id}: no frames to take the image size from; pass width and height")
    return _checked_video(video_id, *size, converted, f"video {video_id}")


def read_hw_tsv(path: str | Path) -> dict[str, tuple[int, int]]:
    """{image key: (width, height)} from a scene_graph_benchmark `.hw.tsv` (`<key>\\t[{"height": H,
    "width": W}]` per image), the image sizes its prediction TSV leaves out."""
    path = Path(path)
    sizes = {}
    with open_text(path, DetectionsError) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            key, _, payload = line.rstrip("\n").partition("\t")
            try:
                value = json.loads(payload)
                size = value[0] if isinstance(value, list) else value
                width, height = size["width"], size["height"]
            except (json.JSONDecodeError, LookupError, TypeError):
                raise DetectionsError(f"{path}:{line_number}: expected <key>\\t[{{\"height\": H, \"width\": W}}]") from None
            where = f"{path}:{line_number}"
            sizes[key] = (_pixels(width, "width", where), _pixels(height, "height", where))
    return sizes


@dataclass
class _VinvlVideo:
    size: tuple[int, int]  # of its first frame, at line `first_line`
    first_line: str
    frames: dict[int, tuple[str, FrameDetections]]  # frame number -> (file:line, frame)


def _vinvl_time(number: int, start_number: int, fps: float, key: str, where: str) -> float:
    """Seconds from the start of the video of the frame numbered `number`, the frame numbered
    `start_number` being at 0 s."""
    if number < start_number:
        raise DetectionsError(f"{where}: key {key!r} has frame number {number}, below the start number "
                              f"{start_number} (the number of the frame at 0 s: `stoa-vlp vinvl --start-number 0` "
                              "for frames numbered from 0)")
    return (number - start_number) / fps


def _warn_if_numbered_from_elsewhere(
    path: Path, by_video: dict[str, _VinvlVideo], start_number: int, fps: float
) -> None:
    """One warning when no video has a frame numbered `start_number`: frames numbered from another
    number would put every box a constant time late, which nothing else shows."""
    firsts = [min(video.frames) for video in by_video.values()]
    if not firsts or min(firsts) == start_number:
        return
    lowest = min(firsts)
    log.warning("%s: no frame is numbered %d, the start number (the frame at 0 s); the lowest frame number is %d, "
                "in %d of the %d videos: if the frames were numbered from %d, every box lands %g s late",
                path, start_number, lowest, firsts.count(lowest), len(firsts), lowest, (lowest - start_number) / fps)


def read_vinvl_tsv(
    path: str | Path, fps: float, sizes: dict[str, tuple[int, int]] | None = None, start_number: int = 1
) -> list[VideoDetections]:
    """VinVL's prediction TSV (`<key>\\t<json>` per image), keys as `vinvl_key` reads them; a frame's
    time is (its number - `start_number`) / `fps`, so `start_number` is the number of the frame at 0 s
    (1 for frames extracted by ffmpeg, which numbers its images from 1 by default). A lower number is
    an error; no frame at `start_number` in any video is one logged warning. Image sizes come from each
    prediction's image_w/image_h or else from `sizes` ({key: (width, height)}, `read_hw_tsv`):
    scene_graph_benchmark writes only {"objects", "relations"}. The frames of a video must have one
    size, and each frame one line; errors name file:line."""
    path = Path(path)
    by_video: dict[str, _VinvlVideo] = {}
    with open_text(path, DetectionsError) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            key, _, payload = line.rstrip("\n").partition("\t")
            video_id, number = vinvl_key(key, where)
            try:
                prediction = json.loads(payload)
            except json.JSONDecodeError as error:
                raise DetectionsError(f"{where}: malformed JSON ({error.msg})") from None
            if not isinstance(prediction, dict) or "objects" not in prediction:
                raise DetectionsError(f"{where}: prediction is not a JSON object with 'objects'")
            time = _vinvl_time(number, start_number, fps, key, where)
            frame, size = _vinvl_frame(time, prediction, (sizes or {}).get(key), where)
            if size is None:
                raise DetectionsError(f"{where}: no image_w/image_h for {key!r} and no size for it in the hw file")
            video = by_video.setdefault(video_id, _VinvlVideo(size, where, {}))
            _same_size(size, video.size, video.first_line, where)
            if number in video.frames:
                first_where = video.frames[number][0]
                raise DetectionsError(f"{where}: frame {number} of video {video_id!r} is also at {first_where}")
            video.frames[number] = (where, frame)
    _warn_if_numbered_from_elsewhere(path, by_video, start_number, fps)
    return [
        _checked_video(video_id, *video.size, [video.frames[number] for number in sorted(video.frames)],
                       f"{path}: video {video_id!r}")
        for video_id, video in by_video.items()
    ]


# ---------------------------------------------------------------- label vocabulary

UNKNOWN_ID = 1
VOCAB_FORMAT = "stoa-vlp labels"


def box_counts_by_class_name(
    detections: Mapping[str, VideoDetections | PackedVideoDetections] | Iterable[VideoDetections | PackedVideoDetections],
) -> Counter[str]:
    """How many boxes of each class name the videos hold."""
    counts: Counter[str] = Counter()
    if hasattr(detections, "box_counts_by_class_name"):  # a DetectionsStore counts in one pass
        counts.update(detections.box_counts_by_class_name())
    else:
        videos = detections.values() if isinstance(detections, Mapping) else detections
        for video in map(packed, videos):
            counts.update(dict(zip(video.class_names, video.box_counts_by_class().tolist())))
    return counts


class LabelVocab:
    """Object class names <-> ids; id 0 is padding, id 1 every class not in the vocabulary."""

    def __init__(self, names: Sequence[str]):
        self.names = ["<pad>", "<unknown>", *names]
        self.ids = {name: index for index, name in enumerate(self.names)}
        if len(self.ids) != len(self.names):
            repeated = sorted({name for name in self.names if self.names.count(name) > 1})
            raise ValueError(f"duplicate class names in the label vocabulary: {', '.join(repeated)}")

    @classmethod
    def from_detections(
        cls,
        detections: Mapping[str, VideoDetections | PackedVideoDetections] | Iterable[VideoDetections | PackedVideoDetections],
        max_size: int | None = None,
    ) -> "LabelVocab":
        """Classes by descending box count (then name); with `max_size` (ids included) the rarest
        classes are left out and become unknown."""
        return cls.from_counts(box_counts_by_class_name(detections), max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], max_size: int | None = None) -> "LabelVocab":
        """As `from_detections`, from their box counts by class name (`box_counts_by_class_name`)."""
        names = sorted(counts, key=lambda name: (-counts[name], name))
        if max_size is not None:
            names = names[: max(max_size - 2, 0)]
        return cls(names)

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        return self.ids.get(name, UNKNOWN_ID)

    def name(self, index: int) -> str:
        return self.names[index]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": VOCAB_FORMAT, "names": self.names[2:]}, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "LabelVocab":
        path = Path(path)
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT or not isinstance(data.get("names"), list):
            raise ValueError(f"{path}: not a stoa-vlp label vocabulary")
        odd = [name for name in data["names"] if not isinstance(name, str) or not name]
        if odd:
            raise ValueError(f"{path}: class names must be non-empty strings, got {odd[0]!r}")
        try:
            return cls(data["names"])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
