"""The synthetic "moving objects" world: real H.264 clips, captions, boxes, QA and multiple-choice.

Each clip shows 1-3 objects (a shape in a colour, e.g. "red circle") on a plain textured background,
each doing one action over the whole clip: moving left/right/up/down, growing, shrinking, rotating
or standing still. No two objects of a clip share their colour-and-shape or their action, so "which
object does what" has one answer. Every object interpolates between a start and an end pose, so the
clip of "is moving right" (or "is shrinking") is exactly the clip of "is moving left" (or "is growing") played
backwards: only the order of the frames tells them apart.

`render_world` writes, under one folder:
    videos/<video_id>.mp4   H.264 (libx264), short keyframe interval
    MSRVTT_data.json        CLIP4Clip's MSR-VTT format, splits train / validate / test
    detections.jsonl        the true boxes per frame plus detector-like noise (README: Detections format);
                            class = "<colour> <shape>" (or the shape alone, `detection_classes`)
    qa_<split>.jsonl        ALPRO/ClipBERT-style {"video_id", "question", "answer", "answer_type"}
    mc_<split>.jsonl        MSR-VTT multiple-choice {"video_id", "options": [5 captions], "answer"}
                            for the val and test splits
    world.json              the settings and each clip's objects and actions (ground truth)
Everything is a function of the seed: the same seed writes identical files.
"""

from __future__ import annotations

import json
import logging
import math
from fractions import Fraction
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from stoa_vlp.data.detections import FrameDetections, VideoDetections, write_detections

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
ACTIONS = ("left", "right", "up", "down", "grow", "shrink", "rotate", "still")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
SPLITS = ("train", "val", "test")
MSRVTT_SPLIT = {"train": "train", "val": "validate", "test": "test"}

# caption phrases per action (present tense, third person; the first is the canonical wording). Each
# is one that spaCy's small English tagger reads with its verb as a VERB and the shape before it as a
# noun: "moves", "slides", "shrinks", "spins" after a shape name read as plural nouns (the verb and
# the shape's noun tag lost in about a quarter of captions), so most phrases are progressive, the
# style of MSR-VTT's captions ("a man is cooking"); tests/test_data_synth.py checks the rates
PHRASES = {
    "left": ("is moving left", "is sliding left", "is going left", "is heading left", "is travelling left"),
    "right": ("is moving right", "is sliding right", "is going right", "is heading right", "is travelling right"),
    "up": ("is moving up", "is rising", "goes up", "floats upward", "is climbing"),
    "down": ("is moving down", "falls", "goes down", "is sinking", "drops down"),
    "grow": ("is growing", "gets bigger", "expands", "becomes larger", "grows"),
    "shrink": ("is shrinking", "gets smaller", "is contracting", "becomes smaller", "is getting smaller"),
    "rotate": ("is rotating", "is spinning", "turns around", "is turning around", "is turning"),
    "still": ("is not moving", "stands still", "does not move", "sits still", "is staying still"),
}
CANONICAL = {action: phrases[0] for action, phrases in PHRASES.items()}
BASE_VERB = {
    "left": "move left",
    "right": "move right",
    "up": "move up",
    "down": "move down",
    "grow": "grow",
    "shrink": "shrink",
    "rotate": "rotate",
    "still": "stay still",
}
ACTION_ANSWER = {
    "left": "move",
    "right": "move",
    "up": "move",
    "down": "move",
    "grow": "grow",
    "shrink": "shrink",
    "rotate": "rotate",
    "still": "stay",
}
COUNT_WORDS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Pose:
    x: float  # centre, pixels
    y: float
    radius: float  # half extent, pixels
    angle: float  # radians


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    action: str
    start: Pose
    end: Pose

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class ClipSpec:
    video_id: str
    split: str  # train, val or test
    width: int
    height: int
    frames: int
    fps: float
    background: tuple[float, float, float]
    texture_seed: int
    objects: tuple[WorldObject, ...]

    @property
    def facts(self) -> frozenset[tuple[str, str, str]]:
        """(colour, shape, action) of every object: what a true caption may say."""
        return frozenset((o.colour, o.shape, o.action) for o in self.objects)


@dataclass
class DetectionNoise:
    """Detector-like noise added to the true boxes."""

    jitter: float = 0.05  # std of each box edge, as a fraction of the box's width or height
    miss_rate: float = 0.1  # chance that a true box is missing from a frame
    false_positives: float = 0.2  # mean number of spurious boxes per frame (Poisson)
    true_conf: tuple[float, float] = (0.5, 1.0)  # uniform range of a true box's confidence
    false_conf: tuple[float, float] = (0.05, 0.5)  # uniform range of a spurious box's confidence

    @classmethod
    def none(cls) -> "DetectionNoise":
        return cls(jitter=0.0, miss_rate=0.0, false_positives=0.0, true_conf=(1.0, 1.0))


@dataclass
class WorldPaths:
    root: Path
    videos: Path  # folder of <video_id>.mp4
    annotations: Path  # MSRVTT_data.json
    detections: Path
    qa: dict[str, Path]  # split -> ALPRO-style QA jsonl
    mc: dict[str, Path]  # split (val, test) -> multiple-choice jsonl
    world: Path  # world.json: settings and ground truth
    video_ids: dict[str, list[str]] = field(default_factory=dict)  # split -> ids


def world_paths(root: str | Path, video_ids: dict[str, list[str]] | None = None) -> WorldPaths:
    """The files of a world in `root`; without `video_ids`, they are read from its world.json."""
    root = Path(root)
    if video_ids is None:
        world_file = root / "world.json"
        if not world_file.is_file():
            raise FileNotFoundError(f"{root}: no world.json; not a folder written by `stoa-vlp synth` or the demo")
        clips = json.loads(world_file.read_text())["clips"]
        video_ids = {split: [c["video_id"] for c in clips if c["split"] == split] for split in SPLITS}
    return WorldPaths(
        root=root,
        videos=root / "videos",
        annotations=root / "MSRVTT_data.json",
        detections=root / "detections.jsonl",
        qa={split: root / f"qa_{split}.jsonl" for split in SPLITS},
        mc={split: root / f"mc_{split}.jsonl" for split in ("val", "test")},
        world=root / "world.json",
        video_ids=video_ids,
    )


# ---------------------------------------------------------------- sampling scenes


def _sample_object(
    rng: np.random.Generator, shape: str, colour: str, action: str, width: int, height: int
) -> WorldObject:
    short = min(width, height)
    radius = float(rng.uniform(0.08, 0.12) * short)
    angle = float(rng.uniform(0, 2 * math.pi))
    if action in ("grow", "shrink"):
        small = float(rng.uniform(0.06, 0.08) * short)
        large = small * float(rng.uniform(2.0, 2.5))
        r0, r1 = (small, large) if action == "grow" else (large, small)
        x = float(rng.uniform(large + 1, width - large - 1))
        y = float(rng.uniform(large + 1, height - large - 1))
        return WorldObject(shape, colour, action, Pose(x, y, r0, angle), Pose(x, y, r1, angle))
    if action in ("left", "right", "up", "down"):
        horizontal = action in ("left", "right")
        extent = width if horizontal else height
        distance = float(rng.uniform(0.4, 0.6) * (extent - 2 * radius - 2))
        low = float(rng.uniform(radius + 1, extent - radius - 1 - distance))
        a, b = (low + distance, low) if action in ("left", "up") else (low, low + distance)
        other = float(rng.uniform(radius + 1, (height if horizontal else width) - radius - 1))
        start = Pose(a, other, radius, angle) if horizontal else Pose(other, a, radius, angle)
        end = Pose(b, other, radius, angle) if horizontal else Pose(other, b, radius, angle)
        return WorldObject(shape, colour, action, start, end)
    x = float(rng.uniform(radius + 1, width - radius - 1))
    y = float(rng.uniform(radius + 1, height - radius - 1))
    turn = 0.0
    if action == "rotate":
        turn = float(rng.uniform(math.radians(30), math.radians(60)) * rng.choice([-1.0, 1.0]))
    return WorldObject(shape, colour, action, Pose(x, y, radius, angle), Pose(x, y, radius, angle + turn))


def _path_box(obj: WorldObject) -> np.ndarray:
    """Region (4,) the object covers over the whole clip."""
    r = max(obj.start.radius, obj.end.radius)
    return np.array(
        [min(obj.start.x, obj.end.x) - r, min(obj.start.y, obj.end.y) - r,
         max(obj.start.x, obj.end.x) + r, max(obj.start.y, obj.end.y) + r]
    )


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection area over the smaller area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h / smaller)


def sample_clip(
    rng: np.random.Generator,
    video_id: str,
    split: str,
    size: int = 64,
    frames: int = 24,
    fps: float = 8.0,
    max_objects: int = 3,
) -> ClipSpec:
    """Draw one clip: 1..max_objects objects with distinct looks and distinct actions."""
    count = int(rng.integers(1, max_objects + 1))
    looks = [(s, c) for s in SHAPES for c in COLOURS]
    chosen_looks = [looks[i] for i in rng.choice(len(looks), size=count, replace=False)]
    free_actions = list(ACTIONS)
    objects: list[WorldObject] = []
    for shape, colour in chosen_looks:
        allowed = [a for a in free_actions if not (shape == "circle" and a == "rotate")]
        action = allowed[int(rng.integers(len(allowed)))]
        free_actions.remove(action)
        for _attempt in range(20):
            obj = _sample_object(rng, shape, colour, action, size, size)
            if all(_overlap(_path_box(obj), _path_box(other)) < 0.2 for other in objects):
                break
        objects.append(obj)
    background = tuple(float(v) for v in rng.uniform(70, 120) + rng.uniform(-12, 12, size=3))
    return ClipSpec(
        video_id=video_id,
        split=split,
        width=size,
        height=size,
        frames=frames,
        fps=fps,
        background=background,
        texture_seed=int(rng.integers(2**31)),
        objects=tuple(objects),
    )


def reverse_clip(clip: ClipSpec) -> ClipSpec:
    """The same clip played backwards: start and end poses swap, actions flip to their opposite."""
    objects = tuple(
        replace(o, action=OPPOSITE.get(o.action, o.action), start=o.end, end=o.start) for o in clip.objects
    )
    return replace(clip, objects=objects)


# ---------------------------------------------------------------- rendering


def _pose_at(obj: WorldObject, index: int, frames: int) -> Pose:
    # the weights of start and end come from integers, so a reversed clip swaps them exactly
    w_start = (frames - 1 - index) / max(frames - 1, 1)
    w_end = index / max(frames - 1, 1)
    return Pose(
        *(getattr(obj.start, k) * w_start + getattr(obj.end, k) * w_end for k in ("x", "y", "radius", "angle"))
    )


def _vertices(shape: str, pose: Pose) -> np.ndarray:
    """(V, 2) polygon corners of a square or triangle."""
    if shape == "square":
        corner_angles = pose.angle + np.pi / 4 + np.arange(4) * np.pi / 2
        reach = pose.radius * 0.85 * np.sqrt(2)
    else:
        corner_angles = pose.angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        reach = pose.radius * 1.15
    return np.stack([pose.x + reach * np.cos(corner_angles), pose.y + reach * np.sin(corner_angles)], axis=1)


def shape_box(shape: str, pose: Pose) -> np.ndarray:
    """(4,) x0, y0, x1, y1 of the drawn shape, in continuous pixel coordinates."""
    if shape == "circle":
        r = pose.radius
        return np.array([pose.x - r, pose.y - r, pose.x + r, pose.y + r])
    corners = _vertices(shape, pose)
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)])


def _signed_distance(shape: str, pose: Pose, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Distance outside (positive) or inside (negative) the shape; exact for circles, the
    largest edge distance for polygons."""
    dx, dy = xs - pose.x, ys - pose.y
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - pose.radius
    corners = _vertices(shape, pose)
    edges = np.roll(corners, -1, axis=0) - corners  # (V, 2)
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)  # outward for clockwise-on-screen order
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offsets = (normals * corners).sum(axis=1)  # (V,)
    distances = normals[:, 0, None, None] * xs + normals[:, 1, None, None] * ys - offsets[:, None, None]
    return distances.max(axis=0)


def render_frames(clip: ClipSpec) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of the clip."""
    texture = np.random.default_rng(clip.texture_seed).normal(0, 4, size=(clip.height, clip.width, 1))
    background = np.asarray(clip.background, dtype=np.float32) + texture.astype(np.float32)
    ys, xs = np.mgrid[0 : clip.height, 0 : clip.width].astype(np.float32) + 0.5  # pixel centres
    video = np.empty((clip.frames, clip.height, clip.width, 3), dtype=np.uint8)
    for index in range(clip.frames):
        canvas = background.copy()
        for obj in clip.objects:
            pose = _pose_at(obj, index, clip.frames)
            x0, y0, x1, y1 = shape_box(obj.shape, pose)
            cols = slice(max(int(x0) - 1, 0), min(int(math.ceil(x1)) + 1, clip.width))
            rows = slice(max(int(y0) - 1, 0), min(int(math.ceil(y1)) + 1, clip.height))
            distance = _signed_distance(obj.shape, pose, xs[rows, cols], ys[rows, cols])
            alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]  # one pixel of anti-aliasing
            colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
            canvas[rows, cols] = canvas[rows, cols] * (1 - alpha) + colour * alpha
        video[index] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return video


def true_boxes(clip: ClipSpec) -> np.ndarray:
    """(T, n_objects, 4) boxes of every object in every frame, clipped to the frame."""
    boxes = np.array(
        [[shape_box(o.shape, _pose_at(o, i, clip.frames)) for o in clip.objects] for i in range(clip.frames)]
    ).reshape(clip.frames, len(clip.objects), 4)
    return np.clip(boxes, 0, [clip.width, clip.height, clip.width, clip.height])


def write_video(path: str | Path, frames: np.ndarray, fps: float, keyframe_interval: int = 8) -> None:
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4, byte-identical for identical frames."""
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {width}x{height}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.codec_context.thread_count = 1
        # x264's lookahead (B-frame decisions, macroblock tree) gave different bytes from run to run
        # under CPU load, so it is off: the same frames always encode to the same file
        params = f"keyint={keyframe_interval}:scenecut=0:bframes=0:rc-lookahead=0:mbtree=0"
        stream.options = {"crf": "18", "preset": "veryfast", "x264-params": params}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _render_to_file(job: tuple[ClipSpec, Path, int]) -> None:
    clip, path, keyframe_interval = job
    write_video(path, render_frames(clip), clip.fps, keyframe_interval)


# ---------------------------------------------------------------- text


def _clause(rng: np.random.Generator, obj: WorldObject) -> str:
    article = "a" if rng.random() < 0.6 else "the"
    phrases = PHRASES[obj.action]
    return f"{article} {obj.name} {phrases[int(rng.integers(len(phrases)))]}"


def _join(clauses: list[str], rng: np.random.Generator) -> str:
    if len(clauses) == 1:
        return clauses[0]
    if len(clauses) == 2:
        joiner = (" while ", " and ", ", and ", " as ")[int(rng.integers(4))]
        return clauses[0] + joiner + clauses[1]
    if rng.random() < 0.5:
        return f"{clauses[0]}, {clauses[1]} and {clauses[2]}"
    return f"{clauses[0]} while {clauses[1]} and {clauses[2]}"


def canonical_caption(facts: list[tuple[str, str, str]]) -> str:
    """One fixed wording for a list of (colour, shape, action): used for multiple-choice options."""
    clauses = [f"a {colour} {shape} {CANONICAL[action]}" for colour, shape, action in facts]
    if len(clauses) <= 2:
        return " while ".join(clauses)
    return f"{', '.join(clauses[:-1])} and {clauses[-1]}"


def make_captions(clip: ClipSpec, rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct captions (fewer if the wordings run out), each naming every object's action."""
    captions: list[str] = []
    for _attempt in range(count * 20):
        order = rng.permutation(len(clip.objects))
        text = _join([_clause(rng, clip.objects[i]) for i in order], rng)
        if rng.random() < 0.2:
            text = ("in this video ", "here ")[int(rng.integers(2))] + text
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions


def _other_action(obj: WorldObject, rng: np.random.Generator) -> str:
    """An action `obj` does not do, drawn uniformly from those its shape can do (a circle never rotates),
    so that a yes/no question's verb says nothing about its answer."""
    others = [a for a in ACTIONS if a != obj.action and not (obj.shape == "circle" and a == "rotate")]
    return others[int(rng.integers(len(others)))]


def make_questions(clip: ClipSpec, rng: np.random.Generator, count: int) -> list[dict]:
    """Up to `count` open-ended questions with one-word answers, drawn from all that apply."""
    candidates = [
        {"question": "how many shapes are there?", "answer": COUNT_WORDS[len(clip.objects)], "answer_type": "count"}
    ]
    for obj in clip.objects:
        does = CANONICAL[obj.action]
        candidates += [
            {"question": f"what colour is the shape that {does}?", "answer": obj.colour, "answer_type": "colour"},
            {"question": f"what shape {does}?", "answer": obj.shape, "answer_type": "shape"},
            {"question": f"what does the {obj.name} do?", "answer": ACTION_ANSWER[obj.action], "answer_type": "action"},
        ]
        if obj.action in ("left", "right", "up", "down"):
            candidates.append(
                {"question": f"which way does the {obj.name} move?", "answer": obj.action, "answer_type": "direction"}
            )
        asked = obj.action if rng.random() < 0.5 else _other_action(obj, rng)
        candidates.append(
            {
                "question": f"does the {obj.name} {BASE_VERB[asked]}?",
                "answer": "yes" if asked == obj.action else "no",
                "answer_type": "yesno",
            }
        )
    picked = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [{"video_id": clip.video_id, **candidates[i]} for i in sorted(picked)]


def _perturb(facts: list[tuple[str, str, str]], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """`facts` (colour, shape, action) with one object's action or look, or two objects' actions, changed."""
    facts = list(facts)
    i = int(rng.integers(len(facts)))
    colour, shape, action = facts[i]
    kind = int(rng.integers(3))
    if kind == 0 and len(facts) > 1:
        j = (i + 1 + int(rng.integers(len(facts) - 1))) % len(facts)
        facts[i], facts[j] = (colour, shape, facts[j][2]), (facts[j][0], facts[j][1], action)
    elif kind == 1:
        new_action = OPPOSITE.get(action) or str(rng.choice([a for a in ACTIONS if a != action]))
        facts[i] = (colour, shape, new_action)
    elif rng.random() < 0.5:
        facts[i] = (str(rng.choice([c for c in COLOURS if c != colour])), shape, action)
    else:
        facts[i] = (colour, str(rng.choice([s for s in SHAPES if s != shape])), action)
    return facts


def _as_seen(fact: tuple[str, str, str]) -> tuple[str, str, str]:
    """A fact as the pixels show it: a rotating circle looks like a still one."""
    colour, shape, action = fact
    return (colour, shape, "still") if (shape, action) == ("circle", "rotate") else fact


def make_choice(clip: ClipSpec, rng: np.random.Generator) -> dict:
    """A 5-way multiple-choice item: the true canonical caption and 4 false ones.

    All five are one change (`_perturb`) away from a false pivot description, itself one change away
    from the truth, so that no option stands out by its words: were the false options changes of the
    truth, the truth would be the option sharing most with the others, found without the video.
    """
    truth = clip.facts  # as the pixels show them: a rotating circle is a still one
    true_facts = [(o.colour, o.shape, o.action) for o in clip.objects]
    pivot = _perturb(true_facts, rng)
    options = [canonical_caption(true_facts)]
    seen = {frozenset(true_facts)}
    for _attempt in range(200):
        if len(options) == 5:
            break
        candidate = _perturb(pivot, rng)
        key = frozenset(map(_as_seen, candidate))
        if key in seen or key <= truth:  # already an option, or true of this clip
            continue
        seen.add(key)
        options.append(canonical_caption(candidate))
    if len(options) < 5:
        raise RuntimeError(f"could not build 5 distinct options for {clip.video_id}")
    order = rng.permutation(5)
    return {"video_id": clip.video_id, "options": [options[k] for k in order], "answer": int(np.argmax(order == 0))}


# ---------------------------------------------------------------- detections


def noisy_detections(
    clip: ClipSpec, rng: np.random.Generator, noise: DetectionNoise, detection_classes: str = "object"
) -> VideoDetections:
    """Per-frame true boxes with jitter, misses, spurious boxes and confidences."""
    names = [o.name if detection_classes == "object" else o.shape for o in clip.objects]
    all_names = [f"{c} {s}" for s in SHAPES for c in COLOURS] if detection_classes == "object" else list(SHAPES)
    limits = np.array([clip.width, clip.height, clip.width, clip.height], dtype=np.float64)
    frames = []
    for index, boxes in enumerate(true_boxes(clip)):
        classes, rects, confs = [], [], []
        for name, box in zip(names, boxes):
            if rng.random() < noise.miss_rate:
                continue
            size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            noisy = np.clip(box + rng.normal(0, noise.jitter, size=4) * size, 0, limits)
            if noisy[2] - noisy[0] < 1 or noisy[3] - noisy[1] < 1:
                continue
            classes.append(name)
            rects.append(noisy)
            confs.append(rng.uniform(*noise.true_conf))
        for _spurious in range(rng.poisson(noise.false_positives)):
            w, h = rng.uniform(0.1, 0.3, size=2) * [clip.width, clip.height]
            x0, y0 = rng.uniform(0, clip.width - w), rng.uniform(0, clip.height - h)
            classes.append(all_names[int(rng.integers(len(all_names)))])
            rects.append(np.array([x0, y0, x0 + w, y0 + h]))
            confs.append(rng.uniform(*noise.false_conf))
        frames.append(
            FrameDetections(
                time=index / clip.fps,
                classes=classes,
                rects=np.array(rects, dtype=np.float32).reshape(-1, 4),
                confs=np.array(confs, dtype=np.float32),
            )
        )
    return VideoDetections(clip.video_id, clip.width, clip.height, frames)


# ---------------------------------------------------------------- the world


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def render_world(
    out_dir: str | Path,
    train: int = 200,
    val: int = 50,
    test: int = 50,
    seed: int = 0,
    size: int = 64,
    seconds: float = 3.0,
    fps: float = 8.0,
    max_objects: int = 3,
    captions_per_clip: int = 5,
    questions_per_clip: int = 4,
    keyframe_interval: int = 8,
    noise: DetectionNoise | None = None,
    detection_classes: str = "object",
    workers: int = 1,
) -> WorldPaths:
    """Render the world into `out_dir` (created; existing files of the same names are replaced)."""
    _check_world_settings(size, max_objects, detection_classes)
    noise = DetectionNoise() if noise is None else noise
    frames = max(2, int(round(seconds * fps)))
    root = Path(out_dir)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    clips = _sample_clips(seed, (train, val, test), size, frames, fps, max_objects)
    _render_videos(clips, video_dir, keyframe_interval, workers)
    sentences = _sentence_rows(clips, seed, captions_per_clip)
    questions = _question_rows(clips, seed, questions_per_clip)
    choices = _choice_rows(clips, seed)
    paths = world_paths(root, {split: [c.video_id for c in clips if c.split == split] for split in SPLITS})
    _write_annotations(paths.annotations, seed, clips, sentences)
    write_detections(paths.detections, _all_noisy_detections(clips, seed, noise, detection_classes))
    for split in SPLITS:
        _write_jsonl(paths.qa[split], questions[split])
    for split in choices:
        _write_jsonl(paths.mc[split], choices[split])
    settings = {"seed": seed, "size": size, "frames": frames, "fps": fps, "max_objects": max_objects,
                "detection_classes": detection_classes, "noise": asdict(noise)}
    _write_world_file(paths.world, settings, clips)
    log.info("synthetic world: %d clips (%d/%d/%d) in %s", len(clips), train, val, test, root)
    return paths


def _check_world_settings(size: int, max_objects: int, detection_classes: str) -> None:
    if detection_classes not in ("object", "shape"):
        raise ValueError(f"detection_classes must be 'object' or 'shape', got {detection_classes!r}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number of pixels >= 16, got {size}")


# Each clip draws from its own generators, seeded [seed, clip index, k]: k = 0 samples the clip, 1 its
# captions, 2 its questions, 3 its multiple-choice item and 4 its detection noise.


def _sample_clips(
    seed: int, counts: tuple[int, int, int], size: int, frames: int, fps: float, max_objects: int
) -> list[ClipSpec]:
    """The clips of the train, val and test splits (`counts` of each), numbered across the splits."""
    clips: list[ClipSpec] = []
    for split, count in zip(SPLITS, counts):
        for _ in range(count):
            index = len(clips)
            rng = np.random.default_rng([seed, index, 0])
            clips.append(sample_clip(rng, f"video{index}", split, size, frames, fps, max_objects))
    return clips


def _render_videos(clips: list[ClipSpec], video_dir: Path, keyframe_interval: int, workers: int) -> None:
    """Write videos/<video_id>.mp4 of each clip, in `workers` processes when more than one."""
    jobs = [(clip, video_dir / f"{clip.video_id}.mp4", keyframe_interval) for clip in clips]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render_to_file, jobs, chunksize=8))
    else:
        for job in jobs:
            _render_to_file(job)


def _sentence_rows(clips: list[ClipSpec], seed: int, captions_per_clip: int) -> list[dict]:
    """MSR-VTT "sentences": the captions of every clip, numbered across the world."""
    sentences: list[dict] = []
    for index, clip in enumerate(clips):
        for caption in make_captions(clip, np.random.default_rng([seed, index, 1]), captions_per_clip):
            sentences.append({"caption": caption, "video_id": clip.video_id, "sen_id": len(sentences)})
    return sentences


def _question_rows(clips: list[ClipSpec], seed: int, questions_per_clip: int) -> dict[str, list[dict]]:
    """The QA rows of each split."""
    questions: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for index, clip in enumerate(clips):
        questions[clip.split] += make_questions(clip, np.random.default_rng([seed, index, 2]), questions_per_clip)
    return questions


def _choice_rows(clips: list[ClipSpec], seed: int) -> dict[str, list[dict]]:
    """The multiple-choice rows of the val and test splits."""
    choices: dict[str, list[dict]] = {"val": [], "test": []}
    for index, clip in enumerate(clips):
        if clip.split in choices:
            choices[clip.split].append(make_choice(clip, np.random.default_rng([seed, index, 3])))
    return choices


def _video_row(index: int, clip: ClipSpec) -> dict:
    """The clip's MSR-VTT "videos" entry."""
    return {
        "category": 0,
        "url": "",
        "video_id": clip.video_id,
        "start time": 0.0,
        "end time": round(clip.frames / clip.fps, 3),
        "split": MSRVTT_SPLIT[clip.split],
        "id": index,
    }


def _write_annotations(path: Path, seed: int, clips: list[ClipSpec], sentences: list[dict]) -> None:
    """MSRVTT_data.json: the clips as videos and their captions as sentences."""
    videos = [_video_row(index, clip) for index, clip in enumerate(clips)]
    with open(path, "w") as handle:
        info = {"description": f"stoa-vlp synthetic world, seed {seed}"}
        json.dump({"info": info, "videos": videos, "sentences": sentences}, handle)


def _all_noisy_detections(
    clips: list[ClipSpec], seed: int, noise: DetectionNoise, detection_classes: str
) -> Iterator[VideoDetections]:
    """Each clip's detections, made as they are written."""
    for index, clip in enumerate(clips):
        yield noisy_detections(clip, np.random.default_rng([seed, index, 4]), noise, detection_classes)


def _write_world_file(path: Path, settings: dict, clips: list[ClipSpec]) -> None:
    """world.json: the settings and each clip's objects and actions."""
    with open(path, "w") as handle:
        json.dump({"settings": settings, "clips": [_clip_to_json(c) for c in clips]}, handle)


def _clip_to_json(clip: ClipSpec) -> dict:
    return {
        "video_id": clip.video_id,
        "split": clip.split,
        "objects": [{"colour": o.colour, "shape": o.shape, "action": o.action} for o in clip.objects],
    }
