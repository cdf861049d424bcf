"""Test videos shared by the decoding and preparing tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def moving_frames(count: int, width: int = 64, height: int = 48, seed: int = 0):
    """Frames with a bar whose position encodes the frame index, plus texture."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    for index in range(count):
        image = texture.copy()
        column = (index * 3) % (width - 4)
        image[:, column : column + 4] = 255
        yield image


def flagged_frames(path: Path, thread_type: str) -> set[int] | None:
    """The pts of the frames FFmpeg flags as decoded with errors, decoding with 2 threads of
    `thread_type`; None when it refuses the data outright (already a clear error)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = thread_type, 2
        try:
            return {frame.pts for frame in container.decode(stream) if frame.is_corrupt}
        except av.FFmpegError:
            return None


def damaged_copy(source: Path, damaged: Path) -> float:
    """Write `damaged`: `source` with the middle half of the bytes of one non-key frame inverted, as a
    bit flip on disk or a bad download leaves it. The frame chosen is the first (in time) that FFmpeg
    flags as decoded with errors when it decodes with frame threads, and not with slice threads alone
    (PyAV's default), so that a test of it also fails where the decoder keeps that default. FFmpeg
    cannot flag every damaged frame: entropy-coded data often still parses. Returns that frame's time
    in seconds from the start of the stream, as clip times are."""
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        packets = sorted((packet.pts, packet.pos, packet.size) for packet in container.demux(stream)
                         if packet.size and not packet.is_keyframe)
        time_base, origin = stream.time_base, stream.start_time or 0
    for pts, position, size in packets:
        data = bytearray(source.read_bytes())
        for offset in range(position + size // 4, position + size // 4 + size // 2):
            data[offset] ^= 0xFF
        damaged.write_bytes(bytes(data))
        with_frame_threads, slice_threads_only = flagged_frames(damaged, "AUTO"), flagged_frames(damaged, "SLICE")
        if with_frame_threads and slice_threads_only is not None and pts in with_frame_threads - slice_threads_only:
            return float((pts - origin) * time_base)
    raise AssertionError(f"no damaged frame of {source} is flagged with frame threads only")
