"""Videos given as folders of frame images: decoding, discovery by annotations and tasks, detection."""

import numpy as np
import pytest
import torch
from PIL import Image

from stoa_vlp.data.annotations import AnnotationError, read_annotations
from stoa_vlp.data.decode import VideoError, decode_clip, frame_folder_images, segment_indices
from stoa_vlp.data.detect import sample_frames
from stoa_vlp.data.transforms import FrameTransform
from stoa_vlp.data.video_files import VideoLookup, find_videos
from stoa_vlp.tasks.data import find_video_paths


def write_image(frame: torch.Tensor, path, **options) -> None:
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(path, **options)


def write_frames(folder, count: int, name="frame_{}.png", size=(24, 32), seed=0) -> torch.Tensor:
    """`count` random RGB frames written as images numbered 1..count (unpadded); returns (count, 3, H, W)."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (count, 3, *size), dtype=torch.uint8, generator=generator)
    for index, frame in enumerate(frames, 1):
        write_image(frame, folder / name.format(index))
    return frames


def test_frame_order_follows_the_numbers_in_the_names(tmp_path):
    folder = tmp_path / "clip"
    write_frames(folder, 12)
    (folder / "notes.txt").write_text("not a frame")
    assert frame_folder_images(folder)[:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert frame_folder_images(folder)[-1] == "frame_12.png" and len(frame_folder_images(folder)) == 12


def test_decode_reads_the_sampled_frames_at_their_times(tmp_path):
    folder = tmp_path / "clip"
    frames = write_frames(folder, 20)
    clip = decode_clip(folder, 5, frame_rate=2.0)
    chosen = segment_indices(20, 5, "uniform")
    assert torch.equal(clip.frames, frames[chosen])
    np.testing.assert_allclose(clip.times, chosen / 2.0)
    assert (clip.width, clip.height) == (32, 24)
    window = decode_clip(str(folder), 4, start=2.0, end=6.0, frame_rate=2.0)  # frames 4..11
    np.testing.assert_allclose(window.times, (4 + segment_indices(8, 4, "uniform")) / 2.0)
    drawn = decode_clip(folder, 5, "rand", rng=np.random.default_rng(0), frame_rate=2.0)
    assert torch.equal(drawn.frames, frames[np.round(drawn.times * 2).astype(int)])


def test_jpeg_frames_decode_close_to_their_source(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    frame = torch.full((3, 16, 16), 100, dtype=torch.uint8)
    write_image(frame, folder / "00001.jpg", quality=95)
    clip = decode_clip(folder, 2)
    assert clip.frames.shape == (2, 3, 16, 16)
    assert (clip.frames.float() - 100).abs().max() <= 2


def test_bad_frame_folders_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="empty: frame folder holds no images"):
        decode_clip(empty, 4)
    broken = tmp_path / "broken"
    write_frames(broken, 4)
    (broken / "frame_3.png").write_bytes(b"not an image")
    with pytest.raises(VideoError, match="broken: frame_3.png: not a readable image"):
        decode_clip(broken, 4)
    mixed = tmp_path / "mixed"
    write_frames(mixed, 2)
    write_image(torch.zeros(3, 8, 8, dtype=torch.uint8), mixed / "frame_3.png")
    with pytest.raises(VideoError, match=r"mixed: frames of different sizes \(height, width\): \[\(8, 8\), \(24, 32\)\]"):
        decode_clip(mixed, 3)
    with pytest.raises(VideoError, match="no frames between 10.0s and 20.0s"):
        decode_clip(mixed, 3, start=10.0, end=20.0)


def test_prepare_refuses_a_frame_folder_of_mixed_sizes_as_decoding_does(tmp_path):
    from stoa_vlp.data.prepare import PrepareOptions, prepare_videos

    mixed = tmp_path / "mixed"
    write_frames(mixed, 2)
    write_image(torch.zeros(3, 8, 8, dtype=torch.uint8), mixed / "frame_3.png")
    (entry,) = prepare_videos([("mixed", str(mixed))], tmp_path / "prepared", PrepareOptions(), progress=False)
    assert entry.status == "failed" and not (tmp_path / "prepared" / "videos" / "mixed.mp4").exists()
    with pytest.raises(VideoError) as decoding:
        decode_clip(mixed, 3)
    assert entry.error == str(decoding.value)
    assert entry.error == f"{mixed}: frames of different sizes (height, width): [(8, 8), (24, 32)]"


def test_frame_folders_are_found_by_name(tmp_path):
    root = tmp_path / "videos"
    write_frames(root / "video0", 3)
    write_frames(root / "nested" / "video1", 3)
    (root / "video2.mp4").write_bytes(b"")
    (root / "notes.txt").write_text("not a video")
    assert find_videos([root]) == [
        ("video0", str(root / "video0")), ("video1", str(root / "nested" / "video1")), ("video2", str(root / "video2.mp4"))]
    assert find_videos([root / "video0", root / "video2.mp4"]) == [
        ("video0", str(root / "video0")), ("video2", str(root / "video2.mp4"))]
    with pytest.raises(FileNotFoundError, match="gone.mp4 does not exist"):
        find_videos([root / "gone.mp4"])
    annotations = tmp_path / "clips.jsonl"
    annotations.write_text('{"video_id": "video0", "caption": "a clip"}\n{"video_id": "video1", "caption": "b"}\n')
    records = read_annotations(annotations, "jsonl", None, root)
    assert [record.path for record in records] == [str(root / "video0"), str(root / "nested" / "video1")]


def test_an_image_beside_videos_does_not_make_their_folder_a_frame_folder(tmp_path):
    mixed = tmp_path / "mixed"
    write_frames(mixed, 1)  # a poster
    for name in ("a.mp4", "b.mp4"):
        (mixed / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    write_frames(tmp_path / "sub" / "inner", 1)
    (tmp_path / "sub" / "inner" / "c.mp4").write_bytes(b"")
    expected = [("a", str(mixed / "a.mp4")), ("b", str(mixed / "b.mp4"))]
    assert find_videos([mixed]) == expected  # was [("mixed", mixed)]: one "video" of the poster
    assert find_videos([tmp_path / "sub"]) == [("c", str(tmp_path / "sub" / "inner" / "c.mp4"))]


def test_one_id_for_two_videos_is_an_error_where_it_is_used(tmp_path):
    root = tmp_path / "videos"
    write_frames(root / "a" / "clip", 2)
    (root / "b").mkdir()
    (root / "b" / "clip.mp4").write_bytes(b"")
    (root / "other.mp4").write_bytes(b"")
    both = f"{root / 'a' / 'clip'} and {root / 'b' / 'clip.mp4'}"
    with pytest.raises(ValueError, match=f"two videos share the id 'clip': {both}"):
        find_videos([root])  # prepare, detect and index list whole collections
    with pytest.raises(ValueError, match="two videos share the id 'other'"):
        find_videos([root / "other.mp4", tmp_path / "videos" / "other.mp4"])

    lookup = VideoLookup(root)  # annotations and tasks name their videos: only those must be unambiguous
    assert lookup.get("other") == lookup.get("other.mp4") == str(root / "other.mp4")
    assert lookup.get("missing") is None
    with pytest.raises(ValueError, match=f"video 'clip' is ambiguous under {root}: {root / 'a' / 'clip'}, "):
        lookup.get("clip")
    annotations = tmp_path / "clips.jsonl"
    annotations.write_text('{"video_id": "other", "caption": "a clip"}\n')
    assert [record.path for record in read_annotations(annotations, "jsonl", None, root)] == [str(root / "other.mp4")]
    annotations.write_text('{"video_id": "clip", "caption": "a clip"}\n')
    with pytest.raises(AnnotationError, match=f"{annotations}: video 'clip' is ambiguous"):
        read_annotations(annotations, "jsonl", None, root)
    assert find_video_paths(["other"], root, "qa.jsonl") == {"other": str(root / "other.mp4")}
    with pytest.raises(ValueError, match="qa.jsonl: video 'clip' is ambiguous"):
        find_video_paths(["clip", "other"], root, "qa.jsonl")
    with pytest.raises(ValueError, match=r"qa.jsonl: 1 videos not found under .* \(e.g. missing\)"):
        find_video_paths(["other", "missing"], root, "qa.jsonl")
    # training leaves a missing video out (web video lists name many no longer online), unless all are missing
    assert find_video_paths(["other", "missing"], root, "qa.jsonl", leave_out_missing=True) == {"other": str(root / "other.mp4")}
    with pytest.raises(ValueError, match=r"qa.jsonl: 1 videos not found under .* \(e.g. missing\)"):
        find_video_paths(["missing"], root, "qa.jsonl", leave_out_missing=True)


def test_detection_frames_of_a_folder_are_the_nearest_images_once(tmp_path):
    folder = tmp_path / "clip"
    frames = write_frames(folder, 10)  # images at 0, 0.25, ..., 2.25 s with frame rate 4
    width, height, picked = sample_frames(folder, fps=3.0, frame_rate=4.0)
    assert (width, height) == (32, 24)
    # targets 0, 1/3, 2/3, 1, 4/3, 5/3, 2: nearest images 0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0
    assert [time for time, _ in picked] == pytest.approx([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0])
    assert np.array_equal(picked[2][1], frames[3].permute(1, 2, 0).numpy())
    _, _, dense = sample_frames(folder, fps=20.0, frame_rate=4.0)
    assert len(dense) == 10  # never the same image twice


def test_dataset_samples_a_frame_folder_at_the_configured_rate(tmp_path):
    from stoa_vlp.config import load_config
    from stoa_vlp.data.annotations import VideoRecord
    from stoa_vlp.data.dataset import VideoTextDataset

    frames = write_frames(tmp_path / "video0", 16, size=(48, 64))
    record = VideoRecord("video0", str(tmp_path / "video0"), 4.0, 8.0, ["a clip of noise"])  # frames 8..15 at 2 fps
    config = load_config("tiny", ["data.frame_rate=2"])
    sample = VideoTextDataset([record], config, False)[0]
    chosen = 8 + segment_indices(8, config.model.frames, "uniform")  # evaluation samples segment centres
    assert torch.equal(sample.frames, FrameTransform(config.model.image_size)(frames[chosen]))
    with pytest.raises(ValueError, match="data.frame_rate must be positive, got 0"):
        VideoTextDataset([record], load_config("tiny", ["data.frame_rate=0"]), False)
