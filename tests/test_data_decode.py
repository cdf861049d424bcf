"""Frame sampling and decoding against a decode-everything PyAV reference; bad video files."""

from __future__ import annotations

import sys

import av
import numpy as np
import pytest
import torch
from _videos import damaged_copy, moving_frames
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from stoa_vlp.data.decode import VideoError, check_decoder, decode_clip, segment_indices
from stoa_vlp.data.geometry import resize_crop
from stoa_vlp.data.prepare import encode_video
from stoa_vlp.data.transforms import FrameTransform


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for name, keyframe_interval in (("long_gop", 5.0), ("short_gop", 0.25)):
        paths[name] = folder / f"{name}.mp4"
        encode_video(paths[name], moving_frames(60), fps=12, keyframe_interval=keyframe_interval)
    return paths


def reference_frames(path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every frame decoded in order by PyAV: times (s) and RGB arrays."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
        time_base = float(stream.time_base)
    decoded.sort(key=lambda item: item[0])
    return np.array([pts * time_base for pts, _ in decoded]), [image for _, image in decoded]


def test_segment_indices_hand_computed():
    # 10 frames, 4 segments [0,2.5) [2.5,5) [5,7.5) [7.5,10): centres 1.25, 3.75, 6.25, 8.75
    assert segment_indices(10, 4, "uniform").tolist() == [1, 3, 6, 8]
    # fewer frames than segments: frames repeat, in order
    assert segment_indices(2, 4, "uniform").tolist() == [0, 0, 1, 1]
    assert segment_indices(1, 3, "rand", np.random.default_rng(0)).tolist() == [0, 0, 0]
    draws = np.stack([segment_indices(10, 4, "rand", np.random.default_rng(seed)) for seed in range(200)])
    for segment, (low, high) in enumerate([(0, 2), (2, 4), (5, 7), (7, 9)]):
        assert draws[:, segment].min() == low and draws[:, segment].max() == high
    with pytest.raises(ValueError, match="unknown sampling"):
        segment_indices(10, 4, "middle")


@pytest.mark.parametrize("gop", ["long_gop", "short_gop"])
@pytest.mark.parametrize("sampling", ["uniform", "rand"])
def test_decode_matches_full_decode(clips, gop, sampling):
    times, images = reference_frames(clips[gop])
    assert len(images) == 60
    for frames in (1, 4, 7):
        clip = decode_clip(clips[gop], frames, sampling, rng=np.random.default_rng(frames))
        assert clip.frames.shape == (frames, 3, 48, 64) and clip.frames.dtype == torch.uint8
        assert (clip.width, clip.height) == (64, 48)
        expected = segment_indices(60, frames, sampling, np.random.default_rng(frames))
        np.testing.assert_allclose(clip.times, times[expected])
        for k, index in enumerate(expected):
            assert np.array_equal(clip.frames[k].permute(1, 2, 0).numpy(), images[index])


@pytest.mark.parametrize("gop", ["long_gop", "short_gop"])
@pytest.mark.parametrize("start, end", [(1.0, 3.0), (2.5, None), (None, 1.5)])
def test_decode_start_end(clips, gop, start, end):
    times, images = reference_frames(clips[gop])
    clip = decode_clip(clips[gop], 4, start=start, end=end)
    inside = np.flatnonzero((times >= (start or 0) - 1e-6) & (times < (end or 99) - 1e-6))
    expected = inside[segment_indices(len(inside), 4, "uniform")]
    np.testing.assert_allclose(clip.times, times[expected])
    for k, index in enumerate(expected):
        assert np.array_equal(clip.frames[k].permute(1, 2, 0).numpy(), images[index])


def test_decode_bytes_and_empty_range(clips):
    clip = decode_clip(clips["short_gop"], 4, start=1.0, end=3.0)
    from_bytes = decode_clip(clips["short_gop"].read_bytes(), 4, start=1.0, end=3.0)
    assert torch.equal(from_bytes.frames, clip.frames)
    with pytest.raises(VideoError, match="no frames between 9.0s and 10.0s"):
        decode_clip(clips["short_gop"], 4, start=9.0, end=10.0)


def test_short_video_repeats_frames(tmp_path):
    path = tmp_path / "three.mp4"
    encode_video(path, moving_frames(3), fps=10)
    times, images = reference_frames(path)
    clip = decode_clip(path, 8)
    assert clip.frames.shape[0] == 8
    assert np.all(np.diff(clip.times) >= 0)
    for k, index in enumerate(segment_indices(3, 8, "uniform")):
        assert np.array_equal(clip.frames[k].permute(1, 2, 0).numpy(), images[index])


def test_bad_files_name_the_file(tmp_path, clips):
    with pytest.raises(VideoError, match="missing.mp4: file does not exist"):
        decode_clip(tmp_path / "missing.mp4", 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4: file is empty"):
        decode_clip(empty, 4)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match="notes.mp4: not a readable video"):
        decode_clip(text, 4)
    truncated = tmp_path / "truncated.mp4"
    data = clips["long_gop"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated.mp4"):
        decode_clip(truncated, 4)
    no_frames = tmp_path / "no_frames.mp4"
    with av.open(str(no_frames), "w") as container:  # a zero-length video: header, no frames
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    assert no_frames.stat().st_size > 0
    with pytest.raises(VideoError, match="no_frames.mp4: has no video (stream|frames)"):
        decode_clip(no_frames, 4)


@pytest.mark.parametrize("threads", [1, 2])  # FFmpeg's slice threads alone did not flag the frame
def test_a_damaged_frame_is_refused_naming_its_time(tmp_path, clips, threads):
    time = damaged_copy(clips["long_gop"], tmp_path / "damaged.mp4")
    with pytest.raises(VideoError, match=f"damaged.mp4: the frame at {time:.3f} s is damaged"):
        decode_clip(tmp_path / "damaged.mp4", 60, threads=threads)  # every frame
    decode_clip(tmp_path / "damaged.mp4", 2, start=0.0, end=time - 0.5, threads=threads)  # frames before it are fine


@pytest.mark.parametrize("decoder, module", [("decord", "decord"), ("torchcodec", "torchcodec.decoders")])
def test_missing_optional_decoder_is_a_clear_error(clips, monkeypatch, decoder, module):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails as if the library were not installed
    with pytest.raises(VideoError, match=f"data.decoder={decoder}"):
        decode_clip(clips["short_gop"], 4, decoder=decoder)
    with pytest.raises(ValueError, match=f"data.decoder={decoder} but its library cannot be loaded"):
        check_decoder(decoder)
    check_decoder("pyav")
    with pytest.raises(ValueError, match="unknown decoder 'ffmpeg'"):
        check_decoder("ffmpeg")


def require_decoder(decoder: str) -> None:
    """Skip unless the decoder's library loads: decord comes with the dev extras; torchcodec also needs
    the system FFmpeg libraries (not installed in CI, so its tests are reported as skipped there)."""
    try:
        check_decoder(decoder)
    except ValueError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
@pytest.mark.parametrize("gop", ["long_gop", "short_gop"])
@pytest.mark.parametrize("window", [(None, None), (1.0, 3.0)])
def test_optional_decoders_give_the_frames_and_times_of_pyav(clips, decoder, gop, window):
    require_decoder(decoder)
    start, end = window
    expected = decode_clip(clips[gop], 6, start=start, end=end)
    for source in (clips[gop], str(clips[gop]), clips[gop].read_bytes()):
        got = decode_clip(source, 6, start=start, end=end, decoder=decoder)
        assert torch.equal(got.frames, expected.frames)
        np.testing.assert_allclose(got.times, expected.times, atol=1e-6)  # decord's stamps are float32
        assert (got.width, got.height) == (expected.width, expected.height)


@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
def test_optional_decoders_turn_bad_files_into_clear_errors(clips, tmp_path, decoder):
    require_decoder(decoder)
    data = clips["long_gop"].read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated.mp4: not a readable video"):
        decode_clip(truncated, 4, decoder=decoder)
    with pytest.raises(VideoError, match="absent.mp4: file does not exist"):
        decode_clip(tmp_path / "absent.mp4", 4, decoder=decoder)
    with pytest.raises(VideoError, match="<video bytes>: not a readable video"):
        decode_clip(b"not a video", 4, decoder=decoder)


def test_frame_transform_matches_torchvision_functional():
    frames = torch.randint(0, 256, (3, 3, 48, 80), dtype=torch.uint8)
    out = FrameTransform(32)(frames)
    resized = F.resize(frames, [32], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8  # the model normalises them
    assert torch.equal(out, F.center_crop(resized, [32, 32]))
    with pytest.raises(ValueError, match="expected uint8 frames"):
        FrameTransform(32)(frames.float())


def test_frame_transform_agrees_with_box_geometry():
    # a white rectangle in an 80x48 frame must land where resize_crop maps its box
    frame = torch.zeros(1, 3, 48, 80, dtype=torch.uint8)
    frame[..., 10:30, 30:50] = 255
    out = FrameTransform(32).resize_crop(frame)[0, 0].float()
    (box,), keep = resize_crop(80, 48, 32).map_boxes(np.array([[30, 10, 50, 30]]))
    assert keep[0]
    rows = torch.nonzero(out.amax(dim=1) > 127).flatten()
    cols = torch.nonzero(out.amax(dim=0) > 127).flatten()
    assert abs(cols.min().item() - box[0]) <= 1 and abs(cols.max().item() + 1 - box[2]) <= 1
    assert abs(rows.min().item() - box[1]) <= 1 and abs(rows.max().item() + 1 - box[3]) <= 1


@pytest.mark.parametrize("b_frames", [0, 2])
def test_avi_mpeg4_like_msvd(tmp_path, b_frames):
    # MSVD ships AVI files; with B-frames, AVI packs them and adds packets without timestamps
    path = tmp_path / f"clip{b_frames}.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.max_b_frames, stream.codec_context.gop_size = b_frames, 12
        for index, image in enumerate(moving_frames(40)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    times, images = reference_frames(path)
    for frames in (4, 7):
        clip = decode_clip(path, frames)
        expected = segment_indices(len(images), frames, "uniform")
        np.testing.assert_allclose(clip.times, times[expected])
        for k, index in enumerate(expected):
            assert np.array_equal(clip.frames[k].permute(1, 2, 0).numpy(), images[index])


def write_faststart(path, frames: int = 36, fps: int = 12) -> None:
    """H.264 mp4, a keyframe every 2 s and no B-frames, with its index (moov) before the data, as web
    video is written: a cut keeps the index."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x264-params": f"keyint={2 * fps}:scenecut=0:bframes=0"}
        for image in moving_frames(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def cut_at(path, seconds: float, cut) -> None:
    """Write to `cut` the bytes of `path` before its first packet decoded at or after `seconds`: whole
    packets, so the frames before decode cleanly and only the declared duration tells."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        positions = [p.pos for p in container.demux(stream) if p.size and p.dts * stream.time_base >= seconds]
    cut.write_bytes(path.read_bytes()[: min(positions)])


@pytest.mark.parametrize("decoder", ["pyav", "torchcodec", "decord"])
def test_truncated_faststart_file_is_refused_naming_both_times(tmp_path, decoder):
    require_decoder(decoder)
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    write_faststart(whole)  # 3 s
    cut_at(whole, 2.0, cut)
    assert decode_clip(whole, 4, decoder=decoder).times[-1] > 2.5
    stop = r"cut.mp4: truncated: its frames stop at 2.00s but its container says it lasts 3.00s"
    with pytest.raises(VideoError, match=stop):
        decode_clip(cut, 4, decoder=decoder)
    with pytest.raises(VideoError, match=stop):
        decode_clip(cut, 4, start=1.0, end=2.9, decoder=decoder)  # the window reaches past the data
    inside = decode_clip(cut, 4, start=0.5, end=1.5, decoder=decoder)  # the data of this window is all there
    np.testing.assert_allclose(inside.times, decode_clip(whole, 4, start=0.5, end=1.5).times, atol=1e-6)


def test_window_after_the_data_of_a_truncated_file_is_refused(tmp_path):
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    write_faststart(whole, frames=36 * 4)  # 12 s
    cut_at(whole, 9.0, cut)
    with pytest.raises(VideoError, match="cut.mp4: has no video frames from 11.0s on: the data its index"):
        decode_clip(cut, 4, start=11.0)


def write_rotated(path, degrees: int) -> None:
    """moving_frames (64x48) in an mp4 whose display matrix turns them `degrees` counterclockwise."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(degrees)
        for image in moving_frames(24):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("degrees, turns", [(90, 1), (180, 2), (-90, 3)])
def test_rotated_video_decodes_upright(tmp_path, degrees, turns):
    path = tmp_path / f"phone{degrees}.mp4"
    write_rotated(path, degrees)
    times, images = reference_frames(path)  # as stored: 64 wide, 48 high
    clip = decode_clip(path, 4)
    shown = (48, 64) if turns % 2 == 0 else (64, 48)  # (height, width) as players show it
    assert clip.frames.shape == (4, 3, *shown) and (clip.height, clip.width) == shown
    for k, index in enumerate(segment_indices(len(images), 4, "uniform")):
        assert np.array_equal(clip.frames[k].permute(1, 2, 0).numpy(), np.rot90(images[index], turns))


@pytest.mark.parametrize(
    "decoder, degrees", [("torchcodec", 90), ("torchcodec", 180), ("torchcodec", -90), ("decord", 180)]
)
def test_optional_decoders_turn_rotated_videos_like_pyav(tmp_path, decoder, degrees):
    require_decoder(decoder)  # both apply the display rotation themselves, as FFmpeg's players do
    path = tmp_path / f"phone{degrees}.mp4"
    write_rotated(path, degrees)
    expected, got = decode_clip(path, 4), decode_clip(path, 4, decoder=decoder)
    assert torch.equal(got.frames, expected.frames)
    assert (got.width, got.height) == (expected.width, expected.height)


@pytest.mark.parametrize("degrees", [90, -90])
def test_decord_quarter_turns_are_a_clear_error(tmp_path, degrees):
    """decord 0.6 sizes its buffers wrongly for a quarter-turned video (here 64x48): an error, not a crash."""
    require_decoder("decord")
    path = tmp_path / f"phone{degrees}.mp4"
    write_rotated(path, degrees)
    with pytest.raises(VideoError, match=f"phone{degrees}.mp4: decord could not decode the frames"):
        decode_clip(path, 4, decoder="decord")


@pytest.mark.parametrize(
    "start, end, problem",
    [
        (float("nan"), None, "times must be finite and not negative"),
        (None, float("inf"), "times must be finite and not negative"),
        (-1.0, 2.0, "times must be finite and not negative"),
        (2.0, 1.0, "start must come before its end"),
        (1.0, 1.0, "start must come before its end"),
    ],
)
def test_clip_times_that_are_no_window_are_refused_naming_the_file(clips, tmp_path, start, end, problem):
    with pytest.raises(ValueError, match=f"short_gop.mp4: clip {problem}, got start={start}, end={end}"):
        decode_clip(clips["short_gop"], 4, start=start, end=end)
    from PIL import Image

    folder = tmp_path / "clip7"  # a frame folder
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "1.png")
    with pytest.raises(ValueError, match=f"clip7: clip {problem}"):
        decode_clip(folder, 4, start=start, end=end)
