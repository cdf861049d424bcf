"""Decode the T frames of a clip that a model needs, with their timestamps.

Sampling works on the frames whose timestamps fall in [start, end) seconds (the whole video
when both are None): the range is cut into T equal segments and each segment gives one frame,
its centre ("uniform", for evaluation) or a random frame inside it ("rand", for training). A video
with fewer than T frames in the range repeats frames (segments share a frame), so every clip has
exactly T frames in time order.

The PyAV path reads the packets first (demuxing without decoding is cheap), then decodes only
the groups of pictures (GOPs) that hold a wanted frame, each only up to its last wanted frame,
skipping the other GOPs the way a seek would but without its cost (a leading frame of an open
GOP starts from the previous GOP), and asks the decoder to skip non-reference frames that are not
wanted. Only the wanted frames are converted to RGB. decord and torchcodec are used instead when
`decoder` names them and they are installed.

Frames come out upright: a display rotation (the display matrix phones write, a multiple of 90
degrees) is applied as players apply it. A file whose frames stop well before the duration its
container declares (a faststart mp4 or Matroska file cut off, `check_complete`) is refused.

A video may also be a folder of frame images (pre-extracted frames, `frame_folder_images`): its
frames are the images in the order of the numbers in their names, frame i at i / `frame_rate`
seconds, and only the chosen images are read.

Timestamps are seconds from the start of the video stream; detections use the same clock.
"""

from __future__ import annotations

import importlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

DECODERS = ("pyav", "decord", "torchcodec")
SAMPLING = ("uniform", "rand")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# containers without a reliable index (MPEG program/transport streams, AVI): decord and torchcodec
# gave frames of other times than they reported there (checked against PyAV); PyAV handles them
PYAV_ONLY_EXTENSIONS = (".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".vob", ".avi")


class VideoError(RuntimeError):
    """A video could not be read: missing, empty, not a video, truncated, or no frames in range."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass
class DecodedClip:
    frames: torch.Tensor  # (T, 3, H, W) uint8 RGB, upright
    times: np.ndarray  # (T,) float64 seconds from the start of the stream
    width: int  # of the decoded video as shown (after its display rotation), before any resize
    height: int


def segment_indices(
    count: int, frames: int, sampling: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices into `count` frames: one per each of `frames` equal segments, in time order.

    "uniform" takes each segment's centre; "rand" a uniformly random frame of the segment.
    With count < frames, segments shorter than one frame share (repeat) a frame.
    """
    if count <= 0:
        raise ValueError("cannot sample from zero frames")
    if sampling not in SAMPLING:
        raise ValueError(f"unknown sampling '{sampling}' (known: {', '.join(SAMPLING)})")
    bounds = np.arange(frames + 1) * count / frames  # segment i covers [bounds[i], bounds[i+1])
    if sampling == "uniform":
        centres = (bounds[:-1] + bounds[1:]) / 2
        return np.minimum(np.floor(centres).astype(np.int64), count - 1)
    rng = rng if rng is not None else np.random.default_rng()
    low = np.floor(bounds[:-1]).astype(np.int64)
    high = np.maximum(np.ceil(bounds[1:]).astype(np.int64), low + 1)  # exclusive
    return np.minimum(rng.integers(low, high), count - 1)


def _select(
    times: np.ndarray,
    frames: int,
    sampling: str,
    start: float | None,
    end: float | None,
    rng: np.random.Generator | None,
    source: str,
) -> np.ndarray:
    """Indices into the sorted frame `times` (seconds) of the frames to return."""
    low = 0 if start is None else int(np.searchsorted(times, start - 1e-6, side="left"))
    high = len(times) if end is None else int(np.searchsorted(times, end - 1e-6, side="left"))
    if high <= low:
        raise VideoError(
            source,
            f"no frames between {start}s and {end}s (frames read: {times[0]:.2f}s to {times[-1]:.2f}s)",
        )
    return low + segment_indices(high - low, frames, sampling, rng)


def check_window(start: float | None, end: float | None, source: str) -> None:
    """ValueError naming `source` unless start and end (seconds, each may be None) are finite, not
    negative, and start < end."""
    given = [value for value in (start, end) if value is not None]
    if not all(np.isfinite(value) and value >= 0 for value in given):
        raise ValueError(f"{source}: clip times must be finite and not negative, got start={start}, end={end}")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"{source}: clip start must come before its end, got start={start}, end={end}")


def check_complete(source: str, data_end: float, interval: float, declared: float | None, end: float | None) -> None:
    """VideoError when the frames read stop well before the duration the container declares (before
    `end` when that comes first): a file whose index is at the front (faststart mp4, Matroska) cut off,
    of which sampling would silently take the first part only. `data_end` (s) is where the frames read
    stop (the last one's time plus one frame `interval`).

    Healthy files end within a frame of their declared duration; the slack, 2 frame intervals plus 5% of
    the declared duration, covers a long-shown last frame of a variable-rate stream and durations that
    are estimated or rounded, while a cut that loses over 5% of a video is refused.
    """
    if declared is None or declared <= 0:
        return
    needed = declared if end is None else min(end, declared)
    if data_end < needed - 2 * interval - 0.05 * declared:
        raise VideoError(
            source, f"truncated: its frames stop at {data_end:.2f}s but its container says it lasts {declared:.2f}s"
        )


def declared_duration(container, stream) -> float | None:
    """Seconds the container says the video stream lasts: the stream's duration, else the file's when
    the video is its only stream (a file's duration also covers e.g. a longer audio stream); None when
    it does not say."""
    if stream.duration is not None:
        return stream.duration * float(stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / 1_000_000
    return None


def frame_interval(stream) -> float:
    """Seconds between frames at the stream's average rate; 0 when unknown."""
    return 1 / float(stream.average_rate) if stream.average_rate else 0.0


def quarter_turns(rotation: float) -> int:
    """Counterclockwise quarter turns (np.rot90's k) that show a frame upright, from its display
    rotation (PyAV's VideoFrame.rotation: degrees counterclockwise), rounded to a multiple of 90
    degrees as FFmpeg's players and torchcodec do."""
    return round(rotation / 90) % 4


def damaged_frame(name: str, time: float) -> VideoError:
    """The error for a frame FFmpeg flags as decoded with concealed errors (`is_corrupt`): damaged
    data, not the video's picture. `time`: seconds from the start of the stream."""
    return VideoError(name, f"the frame at {time:.3f} s is damaged (decoded with errors)")


def _open_pyav(source: str | Path | BinaryIO, name: str):
    """The container of `source`, its video stream decoding with frame and slice threads: with slice
    threads alone (PyAV's default) FFmpeg leaves damaged frames unflagged."""
    import av

    if isinstance(source, (str, Path)):
        if not os.path.exists(source):
            raise VideoError(name, "file does not exist")
        if os.path.getsize(source) == 0:
            raise VideoError(name, "file is empty (0 bytes)")
    try:
        container = av.open(source if not isinstance(source, Path) else str(source))
    except (av.FFmpegError, ValueError, OSError) as error:
        raise VideoError(name, f"not a readable video ({error})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(name, "has no video stream")
    container.streams.video[0].thread_type = "AUTO"
    return container


def _decode_pyav(
    source: str | Path | BinaryIO,
    name: str,
    frames: int,
    sampling: str,
    start: float | None,
    end: float | None,
    rng: np.random.Generator | None,
    threads: int,
) -> DecodedClip:
    import av

    container = _open_pyav(source, name)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        try:
            packets = _read_packets(container, stream, start, end)
        except av.FFmpegError as error:
            raise VideoError(name, f"cannot read packets, file damaged or truncated ({error})") from None
        if not packets:
            missing = f" from {start}s on: the data its index points to is missing (file truncated)" if start else ""
            raise VideoError(name, f"has no video frames{missing}")
        # presentation stamps; decode stamps only when no packet has one. A packet without a stamp
        # (e.g. AVI's placeholders for packed B-frames) is decoded but is not a frame to choose
        have_pts = any(p.pts is not None for p in packets)
        stamps = [p.pts if have_pts else p.dts for p in packets]
        frame_stamps = [s for s in stamps if s is not None]
        if not frame_stamps:
            raise VideoError(name, "has video packets without timestamps")
        time_base = float(stream.time_base)
        origin = stream_origin(stream)
        sorted_stamps = np.sort(np.asarray(frame_stamps, dtype=np.int64))
        times = (sorted_stamps - origin) * time_base
        interval = frame_interval(stream)
        check_complete(name, times[-1] + interval, interval, declared_duration(container, stream), end)
        chosen = _select(times, frames, sampling, start, end, rng, name)
        wanted = set(sorted_stamps[chosen].tolist())
        decoded = _decode_wanted(stream, packets, stamps, wanted, name)
        missing = wanted - decoded.keys()
        if missing:
            raise VideoError(
                name, f"{len(missing)} of {len(wanted)} wanted frames did not decode (damaged stream)"
            )
        pixels = _to_array([decoded[int(s)] for s in sorted_stamps[chosen]])
        return DecodedClip(pixels, times[chosen], pixels.shape[3], pixels.shape[2])
    finally:
        container.close()


def stream_origin(stream) -> int:
    """The stamp (in stream.time_base units) that is time 0: the stream's start time, else 0."""
    return stream.start_time if stream.start_time is not None else 0


def _read_packets(container, stream, start: float | None, end: float | None) -> list:
    """The stream's non-empty packets in decode order; with `start`, from a keyframe shown at or
    before it, with `end`, up to the second keyframe shown after it (so long videos are not read
    whole): the first one's leading frames, in an open GOP, follow it in decode order but may be
    shown before `end`."""
    origin = stream_origin(stream)
    packets = [] if not start else _seek_keyframe(container, stream, origin + int(start / stream.time_base))
    limit = None if end is None else origin + end / stream.time_base
    keyframes_past_end = 0
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if limit is not None and packet.is_keyframe and packet.pts is not None and packet.pts > limit and packets:
            keyframes_past_end += 1
            if keyframes_past_end == 2:
                break
        packets.append(packet)
    return packets


def _seek_keyframe(container, stream, stamp: int) -> list:
    """Seek to a keyframe shown at or before `stamp`; returns the packets read to check it.

    FFmpeg may give an open GOP's keyframe shown after `stamp` when its leading frames (decoded
    after it, shown before it, referencing the GOP before) are shown from `stamp` on, and, in a
    container without an index (MPEG-TS/PS), a packet that is no keyframe: then seek again from
    before it. Not seekable: read from the beginning, as after three seeks without a keyframe.
    """
    import av

    target = stamp
    for attempt in range(3):
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            break
        first = next((packet for packet in container.demux(stream) if packet.size), None)
        if first is None or first.pts is None or first.dts is None:
            return [first] if first is not None else []
        if first.is_keyframe and first.pts <= stamp:
            return [first]
        target = min(first.pts, first.dts) - 1
    if attempt > 0:  # packets were read: back to the start
        container.seek(0)
    return []


def _to_array(images: list) -> torch.Tensor:
    """(T, 3, H, W) uint8 from rgb24 VideoFrames, turned upright by the first one's display rotation
    (the stream's), copied once into one preallocated buffer (per-frame arrays plus a stack cost
    about twice as much, mostly in fresh-page faults)."""
    height, width = images[0].height, images[0].width
    turns = quarter_turns(images[0].rotation)
    shown = (height, width) if turns % 2 == 0 else (width, height)
    pixels = np.empty((len(images), *shown, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        plane = image.planes[0]
        rows = np.frombuffer(plane, dtype=np.uint8).reshape(height, plane.line_size)
        pixels[k] = np.rot90(rows[:, : width * 3].reshape(height, width, 3), turns)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def _decode_runs(packets: list, stamps: list, wanted: set[int]) -> list[tuple[int, int]]:
    """Packet index ranges [first, last] to decode, each from a keyframe to a wanted packet.

    A wanted frame that follows its GOP's keyframe in decode order but is shown before it (a
    leading frame of an open GOP) may reference the previous GOP, whose decoding it then starts
    from. Ranges that overlap or touch are merged, so no reference is lost between them.
    """
    runs = []
    gop_start, previous_start = 0, None
    for index, packet in enumerate(packets):
        if packet.is_keyframe and index > 0:
            gop_start, previous_start = index, gop_start
        if stamps[index] in wanted:
            key_stamp = stamps[gop_start]
            leading = key_stamp is not None and stamps[index] < key_stamp and previous_start is not None
            runs.append((previous_start if leading else gop_start, index))
    merged: list[list[int]] = []
    for first, last in sorted(runs):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def _decode_wanted(stream, packets: list, stamps: list[int], wanted: set[int], name: str) -> dict:
    """rgb24 VideoFrames of the `wanted` timestamps, decoding as little as possible.

    Each run of packets (see `_decode_runs`) is fed from its keyframe up to its last wanted
    packet in decode order (later packets cannot be references of earlier ones), with
    non-reference frames that are not wanted skipped; the decoder is then drained of wanted
    frames still held for reordering, if any, and reset.
    GOPs without a wanted frame are never decoded.
    """
    import av

    codec = stream.codec_context
    decoded: dict = {}

    def receive(frames) -> None:
        for frame in frames:
            stamp = frame.pts if frame.pts is not None else frame.dts
            if stamp in wanted and stamp not in decoded:
                if frame.is_corrupt:
                    raise damaged_frame(name, float((stamp - stream_origin(stream)) * stream.time_base))
                decoded[stamp] = frame.reformat(format="rgb24", interpolation="BILINEAR")

    try:
        for first, last in _decode_runs(packets, stamps, wanted):
            for index in range(first, last + 1):
                codec.skip_frame = "DEFAULT" if stamps[index] in wanted else "NONREF"
                receive(codec.decode(packets[index]))
            if len(decoded) < len(wanted.intersection(stamps[: last + 1])):
                codec.skip_frame = "DEFAULT"
                receive(codec.decode(None))  # drain frames held for reordering
            codec.flush_buffers()  # reset for the next run
    except av.FFmpegError as error:
        raise VideoError(name, f"decoding failed, file damaged or truncated ({error})") from None
    return decoded


def _decode_decord(source, name, frames, sampling, start, end, rng, threads) -> DecodedClip:
    try:
        import decord
    except ImportError:
        raise VideoError(name, "data.decoder=decord but decord is not installed (pip install decord)") from None
    if isinstance(source, (str, Path)) and not os.path.exists(source):
        raise VideoError(name, "file does not exist")
    handle = source if isinstance(source, (str, Path)) else io.BytesIO(source.read())
    try:
        reader = decord.VideoReader(str(handle) if isinstance(handle, Path) else handle, num_threads=threads)
    except (RuntimeError, decord.DECORDError) as error:  # DECORDError: e.g. a packet cut off
        raise VideoError(name, f"not a readable video ({error})") from None
    if len(reader) == 0:
        raise VideoError(name, "has no video frames")
    spans = reader.get_frame_timestamp(np.arange(len(reader))).astype(np.float64)  # (N, 2) start, end s
    fps = reader.get_avg_fps()
    check_complete(name, spans[-1, 1], 1 / fps if fps else 0.0, _header_duration(handle, name), end)
    times = spans[:, 0]
    chosen = _select(times, frames, sampling, start, end, rng, name)
    try:
        batch = reader.get_batch(chosen.tolist()).asnumpy()  # (T, H, W, 3), upright
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoError(name, f"decord could not decode the frames ({error})") from None
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2)
    return DecodedClip(pixels, times[chosen], pixels.shape[3], pixels.shape[2])


def _header_duration(handle: str | Path | BinaryIO, name: str) -> float | None:
    """`declared_duration` of a path or file object, from PyAV's read of the header (about 1 ms)."""
    if hasattr(handle, "seek"):
        handle.seek(0)
    container = _open_pyav(handle, name)
    try:
        return declared_duration(container, container.streams.video[0])
    finally:
        container.close()


def _decode_torchcodec(source, name, frames, sampling, start, end, rng, threads) -> DecodedClip:
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError) as error:
        raise VideoError(name, f"data.decoder=torchcodec but torchcodec cannot be loaded ({error})") from None
    if isinstance(source, (str, Path)) and not os.path.exists(source):
        raise VideoError(name, "file does not exist")
    try:
        # frame times (s), in the order of the decoder's indices; not needed to sample the whole video
        times = None if start is None and end is None else _torchcodec_times(source, name)
        decoder = VideoDecoder(str(source) if isinstance(source, Path) else source, seek_mode="exact")
    except (RuntimeError, ValueError) as error:
        raise VideoError(name, f"not a readable video ({error})") from None
    metadata = decoder.metadata
    count = metadata.num_frames or 0
    if count == 0:
        raise VideoError(name, "has no video frames")
    begin = metadata.begin_stream_seconds or 0.0
    interval = 1 / metadata.average_fps if metadata.average_fps else 0.0
    data_end = metadata.end_stream_seconds_from_content  # from the scan of seek_mode="exact"
    if data_end is not None:
        check_complete(name, data_end - begin, interval, metadata.duration_seconds_from_header, end)
    if times is None:
        chosen = segment_indices(count, frames, sampling, rng)
    else:
        chosen = _select(times - begin, frames, sampling, start, end, rng, name)
    try:
        batch = decoder.get_frames_at(indices=chosen.tolist())
    except RuntimeError as error:
        raise VideoError(name, f"decoding failed, file damaged or truncated ({error})") from None
    pixels = batch.data  # (T, 3, H, W) uint8
    stamps = batch.pts_seconds.double().numpy() - begin
    return DecodedClip(pixels, stamps, pixels.shape[3], pixels.shape[2])


def _torchcodec_times(source, name) -> np.ndarray:
    """Presentation times (s) of all frames, in the order of VideoDecoder's exact-mode indices,
    from a scan (demuxing, no decoding): frame rates may vary and streams need not start at 0."""
    try:
        from torchcodec.decoders import Demuxer
    except ImportError as error:
        raise VideoError(name, f"data.decoder=torchcodec with start/end needs torchcodec's Demuxer (0.17 has it) ({error})") from None
    times = Demuxer(str(source) if isinstance(source, Path) else source).streams[0].scan().pts_seconds.numpy()
    if hasattr(source, "seek"):
        source.seek(0)  # a file object, rewound for the VideoDecoder
    return times


def natural_key(name: str) -> list:
    """Sort key comparing the digit runs of a name as numbers: frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_frame_image(name: str) -> bool:
    """Whether a file name is a frame image (FRAME_EXTENSIONS): a folder holding one is a frame folder."""
    return os.path.splitext(name)[1].lower() in FRAME_EXTENSIONS


def frame_folder_images(folder: str | Path) -> list[str]:
    """The frame images directly in `folder`, in frame order."""
    names = [entry.name for entry in os.scandir(folder) if entry.is_file() and is_frame_image(entry.name)]
    return sorted(names, key=natural_key)


def read_frame_image(path: Path) -> np.ndarray:
    """An image file as RGB (H, W, 3) uint8 (Pillow); ValueError naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path.name}: not a readable image ({error})") from None


def read_frame_images(folder: Path, names: list[str]) -> np.ndarray:
    """The named images of a frame folder as RGB (N, H, W, 3) uint8; ValueError naming the file when one
    is unreadable, or the sizes when they differ."""
    images = [read_frame_image(folder / name) for name in names]
    check_same_size({image.shape[:2] for image in images})
    return np.stack(images)


def check_same_size(sizes: set[tuple[int, int]]) -> None:
    """ValueError listing the (height, width) `sizes` of a frame folder's images when they differ."""
    if len(sizes) > 1:
        raise ValueError(f"frames of different sizes (height, width): {sorted(sizes)}")


def _decode_frame_folder(folder: Path, name, frames, sampling, start, end, rng, frame_rate) -> DecodedClip:
    if frame_rate <= 0:
        raise ValueError(f"frame_rate must be positive, got {frame_rate}")
    images = frame_folder_images(folder)
    if not images:
        raise VideoError(name, f"frame folder holds no images ({', '.join(FRAME_EXTENSIONS)})")
    times = np.arange(len(images)) / frame_rate
    chosen = _select(times, frames, sampling, start, end, rng, name)
    try:
        pixels = read_frame_images(folder, [images[index] for index in chosen])
    except ValueError as error:
        raise VideoError(name, str(error)) from None
    stacked = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    return DecodedClip(stacked, times[chosen], stacked.shape[3], stacked.shape[2])


_BACKENDS = {"pyav": _decode_pyav, "decord": _decode_decord, "torchcodec": _decode_torchcodec}
_MODULES = {"pyav": "av", "decord": "decord", "torchcodec": "torchcodec.decoders"}


def check_decoder(decoder: str) -> None:
    """Raise ValueError unless `decoder` is known and its library loads (a setup error, not a bad video)."""
    if decoder not in _BACKENDS:
        raise ValueError(f"unknown decoder '{decoder}' (known: {', '.join(DECODERS)})")
    try:
        importlib.import_module(_MODULES[decoder])
    except (ImportError, RuntimeError, OSError) as error:
        raise ValueError(f"data.decoder={decoder} but its library cannot be loaded ({error})") from None


def decode_clip(
    source: str | Path | bytes | BinaryIO,
    frames: int,
    sampling: str = "uniform",
    start: float | None = None,
    end: float | None = None,
    rng: np.random.Generator | None = None,
    decoder: str = "pyav",
    threads: int = 1,
    name: str | None = None,
    frame_rate: float = 1.0,
) -> DecodedClip:
    """Decode `frames` frames of a video file (path, bytes or file object) or frame folder in
    [start, end) seconds.

    Raises VideoError naming the file (or `name`) when it cannot give the frames (with PyAV, also
    when FFmpeg flags a wanted frame as decoded with errors), ValueError when start/end are not a
    window (not finite, negative, or start >= end). `threads` is
    the decoder's thread count: 1 inside DataLoader workers, which already run in parallel.
    `frame_rate` is the rate at which a frame folder's images were extracted.
    """
    if decoder not in _BACKENDS:
        raise ValueError(f"unknown decoder '{decoder}' (known: {', '.join(DECODERS)})")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    label = name or (str(source) if isinstance(source, (str, Path)) else "<video bytes>")
    check_window(start, end, label)
    if isinstance(source, (str, Path)) and os.path.isdir(source):
        return _decode_frame_folder(Path(source), label, frames, sampling, start, end, rng, frame_rate)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, io.BytesIO) and source.getbuffer().nbytes == 0:
        raise VideoError(label, "file is empty (0 bytes)")
    if decoder != "pyav" and isinstance(source, (str, Path)) and Path(source).suffix.lower() in PYAV_ONLY_EXTENSIONS:
        raise VideoError(label, f"data.decoder={decoder} gives wrong frame times for MPEG-TS/PS and AVI files: "
                                "use data.decoder=pyav, or `stoa-vlp prepare` the videos (mp4)")
    return _BACKENDS[decoder](source, label, frames, sampling, start, end, rng, threads)
