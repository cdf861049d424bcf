"""`stoa-vlp detect`: frame sampling, batching across videos and the JSONL it writes (random weights)."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

from stoa_vlp.cli import main
from stoa_vlp.data.decode import decode_clip
from stoa_vlp.data.detect import COCO_CATEGORIES, DetectSettings, build_detector, sample_frames
from stoa_vlp.data.detections import read_detections
from stoa_vlp.data.synth import write_video

SETTINGS = dict(min_size=64, max_size=64, score_threshold=0.0, max_boxes=3, proposals=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("weights") / "frcnn.pth"
    torch.save(model.state_dict(), path)
    return path


def _video(path, frames, fps=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(frames, size, size, 3), dtype=np.uint8)
    write_video(path, images, fps=fps, keyframe_interval=4)
    return path


def test_sample_frames_picks_nearest_frames_once(tmp_path):
    path = _video(tmp_path / "a.mp4", frames=24, fps=8)  # frames at 0, 0.125, ..., 2.875
    width, height, frames = sample_frames(path, fps=3.0)
    assert (width, height) == (64, 64)
    times = [time for time, _ in frames]
    # targets 0, 1/3, 2/3, ..., 8/3: nearest frames (2.875 s is the last frame)
    assert times == pytest.approx([0.0, 0.375, 0.625, 1.0, 1.375, 1.625, 2.0, 2.375, 2.625])
    assert frames[0][1].shape == (64, 64, 3) and frames[0][1].dtype == np.uint8
    _, _, dense = sample_frames(path, fps=20.0)
    assert len(dense) == 24  # never the same frame twice


def test_frame_times_count_from_the_stream_start_as_the_decoder_does(tmp_path):
    path = tmp_path / "late.ts"  # MPEG-TS: the first frame's stamp is not 0 (the muxer's start delay)
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * index, np.uint8), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 8)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].start_time > 0  # else this test checks nothing
    _, _, frames = sample_frames(path, fps=4.0)
    times = [time for time, _ in frames]
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75])  # frames at 0, 0.125, ..., 0.875 s
    decoded = decode_clip(path, 8, "uniform")
    assert decoded.times[::2].tolist() == pytest.approx(times)


def test_a_rotated_video_is_detected_upright_as_it_is_decoded(tmp_path):
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for index in range(4):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, : 16 * (index + 1)] = 200  # not symmetric: a turn shows
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    width, height, frames = sample_frames(path, fps=4.0)
    decoded = decode_clip(path, 4, "uniform")
    assert (width, height) == (decoded.width, decoded.height) == (48, 64)  # boxes in the frames training sees
    for (_, image), expected in zip(frames, decoded.frames):
        assert np.array_equal(image, expected.permute(1, 2, 0).numpy())


def test_detect_command_writes_detections(tmp_path, weights):
    videos = tmp_path / "videos"
    videos.mkdir()
    _video(videos / "one.mp4", frames=8, seed=1)  # 2 s at 4 fps: frames detected at 0, 0.5, 1.0, 1.5
    _video(videos / "two.mp4", frames=3, seed=2)  # 0.75 s: frames at 0, 0.5
    (videos / "broken.mp4").write_text("not a video")
    out = tmp_path / "dets.jsonl"
    argv = ["detect", str(videos), "--weights", str(weights), "--out", str(out), "--fps", "2", "--batch-size", "3"]
    argv += ["--min-size", "64", "--max-size", "64", "--score-threshold", "0", "--max-boxes", "3", "--proposals", "2"]
    assert main(argv) == 0
    detected = read_detections(out)
    assert list(detected) == ["one", "two"]  # the broken file is skipped
    assert [f.time for f in detected["one"].frames] == [0.0, 0.5, 1.0, 1.5]
    assert [f.time for f in detected["two"].frames] == [0.0, 0.5]
    names = set(COCO_CATEGORIES) - {"__background__", "N/A"}
    total = 0
    for video in detected.values():
        assert (video.width, video.height) == (64, 64)
        for frame in video.frames:
            assert set(frame.classes) <= names and len(frame.classes) <= 3
            assert np.all(frame.rects >= 0) and np.all(frame.rects <= 64)
            total += len(frame.classes)
    assert total > 0

    # batching across videos gives what the detector gives one frame at a time
    model = build_detector(weights, DetectSettings(**SETTINGS), torch.device("cpu"))
    _, _, frames = sample_frames(videos / "two.mp4", fps=2.0)
    with torch.inference_mode():
        for (time, image), frame in zip(frames, detected["two"].frames):
            (output,) = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
            keep = [COCO_CATEGORIES[int(label)] in names for label in output["labels"]]
            np.testing.assert_allclose(frame.rects, output["boxes"][keep].numpy(), atol=0.02)
            np.testing.assert_allclose(frame.confs, output["scores"][keep].numpy(), atol=1e-3)


def test_frames_of_other_sizes_in_one_batch_keep_their_own_detections(weights):
    from stoa_vlp.data.detect import _detect_batch

    model = build_detector(weights, DetectSettings(**SETTINGS), torch.device("cpu"))
    rng = np.random.default_rng(0)
    # resized to at most 64 px a side: the square frame to 64 x 64, the wide one to 32 x 64, which a
    # shared batch pads to 64 x 64
    square, wide = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
    together = _detect_batch(model, [square, wide, square], torch.device("cpu"))
    alone = [_detect_batch(model, [image], torch.device("cpu"))[0] for image in (square, wide)]
    for got, expected in zip(together, [alone[0], alone[1], alone[0]]):
        assert got.classes == expected.classes
        np.testing.assert_allclose(got.rects, expected.rects, atol=1e-3)


def test_a_video_whose_frame_size_changes_is_refused(tmp_path):
    segments = []
    for first, (height, width) in ((0, (48, 64)), (4, (24, 32))):  # two MPEG-TS segments joined, as cameras cut them
        path = tmp_path / f"part{first}.ts"
        with av.open(str(path), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=4)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for index in range(first, first + 4):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 30 * index, np.uint8), format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, 4)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        segments.append(path.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(segments))
    with pytest.raises(ValueError, match="frames of different sizes: 64x48 at the start, 32x24 at"):
        sample_frames(joined, fps=4.0)


def test_wrong_weights_are_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="other.pth: not Faster R-CNN ResNet-50 FPN v2 weights"):
        build_detector(path, DetectSettings(**SETTINGS), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_detector(tmp_path / "missing.pth", DetectSettings(**SETTINGS), torch.device("cpu"))
    fine_tuned = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=81).state_dict()
    torch.save(fine_tuned, tmp_path / "coco80.pth")  # the same keys, other class count: a size mismatch
    with pytest.raises(ValueError, match="coco80.pth: not Faster R-CNN ResNet-50 FPN v2 weights with 91 COCO classes"):
        build_detector(tmp_path / "coco80.pth", DetectSettings(**SETTINGS), torch.device("cpu"))


@pytest.mark.parametrize("name, content", [("garbage.pth", bytes(range(256)) * 4), ("empty.pth", b""),
                                           ("garbage.safetensors", b"not safetensors")])
def test_unreadable_weights_are_an_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: not a readable (PyTorch weights|safetensors) file"):
        build_detector(path, DetectSettings(**SETTINGS), torch.device("cpu"))


def test_two_videos_with_one_id_are_refused_before_any_detection(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _video(tmp_path / folder / "clip.mp4", frames=2)
    argv = ["detect", str(tmp_path), "--weights", str(tmp_path / "not-read.pth"), "--out", str(tmp_path / "d.jsonl")]
    with pytest.raises(ValueError, match="two videos share the id 'clip'"):  # one JSONL line per id
        main(argv)
    assert not (tmp_path / "d.jsonl").exists()


def test_a_run_without_one_readable_video_leaves_the_old_file(tmp_path, weights):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "broken.mp4").write_text("not a video")
    out = tmp_path / "dets.jsonl"
    out.write_text("earlier detections\n")
    argv = ["detect", str(tmp_path / "videos"), "--weights", str(weights), "--out", str(out)]
    with pytest.raises(ValueError, match=r"none of the 1 videos could be read: .*dets.jsonl was not written"):
        main(argv + ["--min-size", "64", "--max-size", "64", "--proposals", "2"])
    assert out.read_text() == "earlier detections\n"


def test_a_frame_s_labels_are_read_from_the_device_once():
    """int() of each label was a device read per box (twice), about 100 blocking reads per frame on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from stoa_vlp.data.detect import _detect_same_size

    reads = []

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    labels = torch.tensor([1, 12, 3, 1, 83])  # person, N/A (not a class), car, person, N/A

    def detector(images):
        return [{"labels": labels, "boxes": torch.rand(5, 4), "scores": torch.rand(5)} for _ in images]

    with ScalarReads():
        (frame,) = _detect_same_size(detector, [np.zeros((8, 8, 3), dtype=np.uint8)], torch.device("cpu"))
    assert frame.classes == [COCO_CATEGORIES[1], COCO_CATEGORIES[3], COCO_CATEGORIES[1]] and len(frame.rects) == 3
    assert reads == []
