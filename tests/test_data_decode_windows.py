"""Clip windows [start, end) on streams where frame index, decode order and time disagree: variable
frame rate, a stream that does not start at 0, B-frames in open GOPs. Every decoder is checked
against a decode-everything PyAV reference that selects frames by presentation timestamp."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from stoa_vlp.data.decode import VideoError, check_decoder, decode_clip, segment_indices

FPS = 24


def numbered_frames(count: int, width: int = 64, height: int = 48):
    """Frames that differ from each other everywhere: a moving bar and a row band, over texture."""
    texture = np.random.default_rng(0).integers(0, 120, (height, width, 3), dtype=np.uint8)
    for index in range(count):
        image = texture.copy()
        image[:, (index * 3) % (width - 4) :][:, :4] = 255
        image[(index // 20) * 4 % (height - 4) :][:4, :8] = 200
        yield image


def write_h264(path, stamps: list[int], time_base: Fraction, x264_params: str, container_format: str = "mp4") -> None:
    """H.264 in `container_format` with frame k presented at stamps[k] * time_base seconds."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.codec_context.thread_count = 1  # same bytes on every run
        stream.options = {"crf": "23", "preset": "veryfast", "x264-params": x264_params}
        for stamp, image in zip(stamps, numbered_frames(len(stamps))):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = stamp, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("windows")
    ms = Fraction(1, 1000)
    gop = "keyint=12:min-keyint=12:scenecut=0"
    specs = {
        # 12 frames at 10 fps, then 36 at 40 fps: frame index / average fps is off by up to 0.6 s
        "variable_rate": ([100 * k for k in range(12)] + [1200 + 25 * k for k in range(36)], ms, gop + ":bframes=0"),
        # the first frame is shown at 0.5 s: times count from there
        "late_start": ([500 + 42 * k for k in range(48)], ms, gop + ":bframes=0"),
        # open GOPs: the B-frames decoded after each later keyframe are shown before it
        "open_gop": (list(range(72)), Fraction(1, FPS), gop + ":bframes=2:b-adapt=0:open-gop=1"),
        "closed_gop_b_frames": (list(range(72)), Fraction(1, FPS), gop + ":bframes=2:b-adapt=0"),
    }
    paths = {}
    for name, (stamps, time_base, params) in specs.items():
        paths[name] = folder / f"{name}.mp4"
        write_h264(paths[name], stamps, time_base, params)
    # MPEG-TS has no index: FFmpeg's seek may land on a packet that is no keyframe
    paths["mpeg_ts"] = folder / "mpeg_ts.mpg"
    write_h264(paths["mpeg_ts"], list(range(96)), Fraction(1, FPS), gop + ":bframes=2:b-adapt=0", "mpegts")
    return paths


def reference(path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every frame decoded by PyAV, in presentation order: times (s from the stream's start) and RGB."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = sorted(((f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(stream)), key=lambda x: x[0])
        origin, time_base = stream.start_time or 0, float(stream.time_base)
    return np.array([(pts - origin) * time_base for pts, _ in decoded]), [image for _, image in decoded]


def expected_frames(times: np.ndarray, frames: int, sampling: str, start, end, seed: int) -> np.ndarray:
    """The rule of decode.py: the frames shown in [start, end), cut into `frames` segments."""
    inside = np.flatnonzero((times >= (start or 0) - 1e-6) & (times < (np.inf if end is None else end) - 1e-6))
    return inside[segment_indices(len(inside), frames, sampling, np.random.default_rng(seed))]


def check_window(path, decoder: str, start, end) -> None:
    times, images = reference(path)
    for frames, sampling in ((4, "uniform"), (7, "rand")):
        clip = decode_clip(path, frames, sampling, start, end, np.random.default_rng(frames), decoder)
        expected = expected_frames(times, frames, sampling, start, end, frames)
        np.testing.assert_allclose(clip.times, times[expected], atol=1e-6, err_msg=f"{frames} frames, {sampling}")
        for k, index in enumerate(expected):
            assert np.array_equal(clip.frames[k].permute(1, 2, 0).numpy(), images[index]), f"frame {k}: not {index}"


def require_decoder(decoder: str) -> None:
    try:
        check_decoder(decoder)
    except ValueError as error:  # torchcodec needs the system FFmpeg, absent in CI: reported as skipped
        pytest.skip(str(error))


WINDOWS = {
    "variable_rate": [(None, None), (0.5, 1.5), (1.2, 1.6)],
    "late_start": [(None, None), (0.5, 1.5)],
    # ends among the leading frames of the keyframe at 0.5 s (frames 10 and 11, at 10/24 and 11/24 s);
    # starts among them (FFmpeg's seek then gives that keyframe, shown after the start)
    "open_gop": [(None, None), (None, 11.5 / FPS), (0.25, 11.5 / FPS), (10 / FPS, 1.0), (22 / FPS, 35.5 / FPS)],
    "closed_gop_b_frames": [(None, 11.5 / FPS), (10.5 / FPS, 1.7)],
    "mpeg_ts": [(None, None), (0.7, 2.3), (1.5, 3.5), (3.1, 3.9)],
}
CASES = [(video, window) for video, windows in WINDOWS.items() for window in windows]


@pytest.mark.parametrize("decoder", ["pyav", "torchcodec", "decord"])
@pytest.mark.parametrize("video, window", CASES, ids=[f"{v}-{w[0]}-{w[1]}" for v, w in CASES])
def test_window_matches_presentation_times(videos, decoder, video, window):
    require_decoder(decoder)
    if decoder == "decord" and video == "open_gop" and window != (0.25, 11.5 / FPS):
        pytest.skip("decord returns later frames after seeking into open GOPs: see the xfail test below")
    if decoder != "pyav" and video == "mpeg_ts":
        with pytest.raises(VideoError, match=f"data.decoder={decoder} gives wrong frame times for MPEG-TS/PS"):
            decode_clip(videos[video], 4, "uniform", *window, decoder=decoder)
        return
    check_window(videos[video], decoder, *window)


@pytest.mark.xfail(strict=True, reason="decord 0.6 seeks to an open GOP's keyframe and drops its leading frames, "
                   "so it returns frames 2 later than asked (e.g. 12 for 10); use pyav or torchcodec for such videos")
def test_decord_open_gop_frames(videos):
    require_decoder("decord")
    check_window(videos["open_gop"], "decord", None, 11.5 / FPS)


def test_pyav_reads_past_end_only_one_extra_gop(videos, monkeypatch):
    """The end-of-window stop still bounds the packets read (long videos are not read whole)."""
    from stoa_vlp.data import decode

    read = []
    original = decode._read_packets
    monkeypatch.setattr(decode, "_read_packets", lambda *args: read.append(original(*args)) or read[-1])
    decode_clip(videos["closed_gop_b_frames"], 4, start=None, end=11.5 / FPS)
    assert len(read[0]) == 24  # the GOP holding the window and the next one, of 72 frames
