"""Re-encode a video collection into a training-friendly form, resumably, writing a manifest.

Each video is decoded with PyAV, resampled to `fps` (output frame k shows the source frame
on screen at time k / fps), resized so its short side is `short_side` (aspect kept, even
dimensions; smaller videos are not enlarged) and encoded with libx264, tuned for fast decoding,
with a keyframe every `keyframe_interval` seconds, upright (a display rotation is applied, the
output has none). Audio is dropped. A source whose frames stop well before the duration its
container declares (cut off), or a frame folder whose images differ in size, fails as decoding
it would. Outputs are written to a temporary name and renamed when complete, so an interrupted
run leaves no half-written video; a rerun skips videos whose output exists (failed ones are
tried again).

The manifest (`manifest.jsonl`, one JSON object per video) records video_id, source, output,
duration (s), fps, frames, status ("ok" or "failed") and error, for every video prepared into the
folder (runs over other videos, e.g. another split, add to it). `prepare.json` records the
settings; a rerun into the same folder must ask for the same ones (the videos it skips were made
with them), and `describe_preparation` reads them back, so that evaluation can show whether its
videos were prepared like the training videos.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from stoa_vlp.data.decode import (
    VideoError,
    _open_pyav,
    check_complete,
    check_same_size,
    damaged_frame,
    declared_duration,
    frame_folder_images,
    frame_interval,
    quarter_turns,
    read_frame_image,
)
from stoa_vlp.data.jsonl import read_json_object, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    fps: float = 2.0
    short_side: int = 256
    keyframe_interval: float = 0.5  # seconds between keyframes: at 2 fps every frame is one
    crf: int = 28
    preset: str = "veryfast"
    tune: str = "fastdecode"  # x264 tune: no CABAC, no deblocking; about 2x faster decoding ("" for none)
    frame_rate: float = 1.0  # rate at which input frame folders were extracted (data.frame_rate)


SETTINGS_FILE = "prepare.json"


@dataclass
class ManifestEntry:
    video_id: str
    source: str
    output: str
    duration: float = 0.0
    fps: float = 0.0
    frames: int = 0
    status: str = "ok"
    error: str = ""


def even_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side = short_side (never enlarged), aspect kept, both even."""
    scale = min(1.0, short_side / min(width, height))
    new_width = max(2, int(round(width * scale / 2)) * 2)
    new_height = max(2, int(round(height * scale / 2)) * 2)
    return new_width, new_height


def encode_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    keyframe_interval: float = 1.0,
    crf: int = 23,
    preset: str = "veryfast",
    tune: str = "",
) -> int:
    """Encode RGB uint8 arrays (H, W, 3), H and W even, as H.264 mp4; returns the frame count.

    The first frame fixes the size. Timestamps are frame k at k / fps seconds.
    """
    import av

    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = None
        for image in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=rate)
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "yuv420p"
                gop = max(1, int(round(keyframe_interval * fps)))
                stream.codec_context.gop_size = gop
                stream.options = {
                    "crf": str(crf),
                    "preset": preset,
                    "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
                    **({"tune": tune} if tune else {}),
                }
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = count
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
            count += 1
        if stream is not None:
            container.mux(stream.encode(None))
    return count


def _resampled_frames(container, fps: float, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) at `fps`: output frame k is the source frame on screen at k / fps, resized
    to `size` (width, height, before the display rotation) and turned upright.

    Only emitted frames are converted (and resized by swscale); a source frame shown for
    several output frames is converted once. A VideoError when a frame to emit was decoded with
    errors (damaged data), or when the frames stop well before the container's declared duration
    (`check_complete`).
    """
    stream = container.streams.video[0]
    origin = stream.start_time or 0
    time_base = float(stream.time_base)
    step = 1 / fps
    next_time = 0.0
    held, held_image, held_time = None, None, 0.0

    def image() -> np.ndarray:
        nonlocal held_image
        if held.is_corrupt:  # as decoding for training refuses it
            raise damaged_frame(container.name, held_time)
        if held_image is None:
            resized = held.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA")
            held_image = np.ascontiguousarray(np.rot90(resized, quarter_turns(held.rotation)))
        return held_image

    for frame in container.decode(stream):
        stamp = frame.pts if frame.pts is not None else frame.dts
        time = (stamp - origin) * time_base if stamp is not None else held_time + step
        while held is not None and time > next_time + 1e-6:
            yield image()
            next_time += step
        held, held_image, held_time = frame, None, time
    interval = frame_interval(stream)
    if held is not None:
        check_complete(container.name, held_time + interval, interval, declared_duration(container, stream), None)
    shown_for = interval or step
    while held is not None and next_time < held_time + shown_for - 1e-6:
        yield image()
        next_time += step


def _folder_frames(folder: str, fps: float, frame_rate: float, short_side: int) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) at `fps` from a frame folder whose image i is on screen from i / frame_rate
    seconds, resized (Pillow's box filter, as swscale's area) to even_size of the first image. A
    VideoError, as decoding gives, when an image is unreadable or the images read differ in size."""
    from PIL import Image

    images = frame_folder_images(folder)
    if not images:
        raise VideoError(folder, "frame folder holds no images")
    size, shown, image = None, -1, None
    sizes = set()  # (height, width) of the images read
    duration = len(images) / frame_rate
    for k in range(int(np.ceil(duration * fps - 1e-6))):
        index = min(int(k / fps * frame_rate + 1e-6), len(images) - 1)  # the image on screen at k / fps
        if index != shown:
            try:
                pixels = read_frame_image(Path(folder) / images[index])  # (H, W, 3)
                sizes.add(pixels.shape[:2])
                check_same_size(sizes)
            except ValueError as error:
                raise VideoError(folder, str(error)) from None
            frame = Image.fromarray(pixels)
            size = size or even_size(frame.width, frame.height, short_side)
            image, shown = np.asarray(frame.resize(size, Image.Resampling.BOX)), index
        yield image


def prepare_one(video_id: str, source: str, output: str, options: PrepareOptions) -> ManifestEntry:
    """Re-encode one video (or frame folder); never raises: failures come back as a 'failed' entry."""
    temporary = f"{output}.tmp-{os.getpid()}.mp4"
    try:
        if os.path.isdir(source):
            frames = encode_video(temporary, _folder_frames(source, options.fps, options.frame_rate, options.short_side),
                                  options.fps, options.keyframe_interval, options.crf, options.preset, options.tune)
        else:
            container = _open_pyav(source, source)
            try:
                codec = container.streams.video[0].codec_context
                size = even_size(codec.width, codec.height, options.short_side)
                frames = encode_video(
                    temporary,
                    _resampled_frames(container, options.fps, size),
                    options.fps,
                    options.keyframe_interval,
                    options.crf,
                    options.preset,
                    options.tune,
                )
            finally:
                container.close()
        if frames == 0:
            raise VideoError(source, "has no decodable video frames")
        os.replace(temporary, output)
        return ManifestEntry(video_id, source, output, frames / options.fps, options.fps, frames)
    except Exception as error:  # a worker reports every failure in the manifest instead of dying
        if os.path.exists(temporary):
            os.remove(temporary)
        message = str(error) if isinstance(error, VideoError) else f"{source}: {type(error).__name__}: {error}"
        return ManifestEntry(video_id, source, output, status="failed", error=message)


def probe(video_id: str, source: str, output: str) -> ManifestEntry:
    """Manifest entry for an output that already exists (a resumed run)."""
    container = _open_pyav(output, output)
    try:
        stream = container.streams.video[0]
        frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        fps = float(stream.average_rate or 0)
    finally:
        container.close()
    return ManifestEntry(video_id, source, output, frames / fps if fps else 0.0, fps, frames)


def read_manifest(path: str | Path) -> dict[str, ManifestEntry]:
    """Latest entry per video_id of a manifest JSONL; errors name the file and line."""
    entries: dict[str, ManifestEntry] = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
                entries[values["video_id"]] = ManifestEntry(**values)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a manifest entry ({error})") from None
    return entries


def _untouched_entries(
    manifest_path: Path, previous: dict[str, ManifestEntry], videos: list[tuple[str, str]]
) -> list[ManifestEntry]:
    """Earlier manifest entries (`previous`, read from manifest_path) for videos not in this run (e.g.
    another split prepared into the same folder) that still hold: failures, and outputs still on disk."""
    this_run = {video_id for video_id, _ in videos}
    untouched = [entry for video_id, entry in previous.items() if video_id not in this_run]
    kept = [entry for entry in untouched if entry.status != "ok" or os.path.exists(entry.output)]
    if len(kept) < len(untouched):
        log.warning("prepare: %s: %d earlier entries dropped, their outputs no longer exist",
                    manifest_path, len(untouched) - len(kept))
    return kept


def prepare_videos(
    videos: list[tuple[str, str]],
    out_dir: str | Path,
    options: PrepareOptions,
    workers: int = 1,
    progress: bool = True,
) -> list[ManifestEntry]:
    """Re-encode (video_id, source) pairs into out_dir/videos/<id>.mp4 and write out_dir/manifest.jsonl;
    returns this run's entries.

    An id that is not a plain file name (with a folder or "..") is refused before any work. Finished
    outputs (from an earlier, maybe interrupted, run) are skipped. The manifest keeps the
    earlier entries of videos not in this run (see `_untouched_entries`) before this run's entries.
    """
    from tqdm import tqdm

    for video_id, source in videos:
        if video_id in ("", ".", "..") or os.path.basename(video_id) != video_id or "\\" in video_id:
            raise ValueError(f"video id {video_id!r} (of {source}) is not a plain file name: prepare writes "
                             "OUT/videos/<video id>.mp4, and a video's id is its file name's stem")
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    record_settings(out_dir, options)
    manifest_path = out_dir / "manifest.jsonl"
    previous = read_manifest(manifest_path) if manifest_path.exists() else {}
    entries: dict[str, ManifestEntry] = {}
    todo = []
    for video_id, source in videos:
        output = str(out_dir / "videos" / f"{video_id}.mp4")
        if os.path.exists(output):
            old = previous.get(video_id)
            entries[video_id] = old if old and old.status == "ok" else probe(video_id, source, output)
        else:
            todo.append((video_id, source, output))
    log.info("prepare: %d videos, %d already done, %d to encode", len(videos), len(entries), len(todo))
    with open(manifest_path, "a") as journal, tqdm(total=len(todo), disable=not progress, unit="video") as bar:

        def record(entry: ManifestEntry) -> None:
            entries[entry.video_id] = entry
            journal.write(json.dumps(asdict(entry)) + "\n")
            journal.flush()
            if entry.status != "ok":
                log.warning("prepare: %s", entry.error)
            bar.update(1)

        if workers <= 1:
            for job in todo:
                record(prepare_one(*job, options))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for entry in pool.map(prepare_one, *zip(*todo), [options] * len(todo), chunksize=1):
                    record(entry)
    ordered = [entries[video_id] for video_id, _ in videos if video_id in entries]
    kept = _untouched_entries(manifest_path, previous, videos)
    write_jsonl_atomic(manifest_path, [asdict(entry) for entry in kept + ordered])
    failed = sum(entry.status != "ok" for entry in ordered)
    if failed:
        log.warning("prepare: %d of %d videos failed; see %s", failed, len(ordered), manifest_path)
    return ordered


def read_settings(out_dir: str | Path) -> dict | None:
    """The settings recorded in OUT/prepare.json, or None where there is none."""
    path = Path(out_dir) / SETTINGS_FILE
    return read_json_object(path) if path.is_file() else None


def record_settings(out_dir: Path, options: PrepareOptions) -> None:
    """Write OUT/prepare.json, or check that a rerun asks for the settings it records."""
    wanted = asdict(options)
    recorded = read_settings(out_dir)
    if recorded is None:
        if (out_dir / "manifest.jsonl").exists():
            log.warning("prepare: %s has videos but no %s; recording this run's settings for all of them",
                        out_dir, SETTINGS_FILE)
        write_json_atomic(out_dir / SETTINGS_FILE, wanted)
        return
    changed = [f"{name} {recorded.get(name)!r} -> {value!r}" for name, value in wanted.items() if recorded.get(name) != value]
    if changed:
        raise ValueError(
            f"{out_dir} holds videos prepared with other settings ({'; '.join(changed)}); a rerun keeps the videos "
            "already there, so use another output folder, or delete this one to prepare everything again"
        )


def describe_preparation(video_root: str) -> str:
    """How the videos under `video_root` were made: "prepared: fps=2.0, short_side=256, ..." when it is a
    folder written by `stoa-vlp prepare` (OUT or OUT/videos), "as given" otherwise, "" when it is not set."""
    if not video_root:
        return ""
    root = Path(video_root)
    for folder in (root, root.parent) if root.name == "videos" else (root,):
        settings = read_settings(folder)
        if settings is not None:
            return "prepared: " + ", ".join(f"{name}={value}" for name, value in settings.items() if name != "frame_rate")
    return "as given"
