"""`stoa-vlp prepare`: resampled, resized, short-GOP outputs, manifest, failures and resuming."""

from __future__ import annotations

import json
import os
import re

import av
import numpy as np
import pytest
from _videos import damaged_copy, moving_frames

from stoa_vlp.cli import main
from stoa_vlp.data.prepare import describe_preparation, encode_video, even_size, read_manifest


def grey_ramp(count: int, width: int, height: int):
    """Frame i is uniformly grey at level 8 * i, so its brightness names its index."""
    for index in range(count):
        yield np.full((height, width, 3), 8 * index, dtype=np.uint8)


@pytest.fixture()
def collection(tmp_path):
    source = tmp_path / "raw"
    (source / "nested").mkdir(parents=True)
    encode_video(source / "ramp.mp4", grey_ramp(25, 96, 64), fps=10)  # 2.5 s
    encode_video(source / "nested" / "tall.mp4", grey_ramp(12, 48, 80), fps=12)  # 1 s
    (source / "broken.mp4").write_text("definitely not a video")
    (source / "readme.txt").write_text("ignored: not a video extension")
    return source


def read_output(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keyframes = [packet.is_keyframe for packet in container.demux(stream) if packet.size]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = float(stream.average_rate)
    return frames, keyframes, rate


def run_prepare(source, out, *extra):
    return main(["prepare", str(source), str(out), "--fps", "2", "--short-side", "32", "--no-progress", *extra])


def test_prepare_resamples_resizes_and_writes_manifest(collection, tmp_path):
    out = tmp_path / "prepared"
    assert run_prepare(collection, out, "--workers", "2", "--keyframe-interval", "1") == 0
    manifest = read_manifest(out / "manifest.jsonl")
    assert sorted(manifest) == ["broken", "ramp", "tall"]
    ramp = manifest["ramp"]
    assert (ramp.status, ramp.frames, ramp.fps, ramp.duration) == ("ok", 5, 2.0, 2.5)
    assert ramp.source == str(collection / "ramp.mp4") and ramp.output == str(out / "videos" / "ramp.mp4")
    frames, keyframes, rate = read_output(ramp.output)
    assert rate == 2.0 and frames[0].shape == (32, 48, 3)
    assert keyframes == [True, False, True, False, True]  # one keyframe per second at 2 fps
    # output frame k shows the source frame on screen at k / 2 s: source index 5k, grey 40k
    brightness = [frame.mean() for frame in frames]
    np.testing.assert_allclose(brightness, [40 * k for k in range(5)], atol=3)
    tall, _, _ = read_output(manifest["tall"].output)
    assert manifest["tall"].frames == 2 and tall[0].shape == (54, 32, 3)
    broken = manifest["broken"]
    assert broken.status == "failed" and "broken.mp4: not a readable video" in broken.error
    assert not os.path.exists(broken.output)
    assert not [name for name in os.listdir(out / "videos") if "tmp" in name]


def test_prepare_resumes_and_skips_finished_outputs(collection, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(collection, out, "--workers", "1")
    ramp, tall = out / "videos" / "ramp.mp4", out / "videos" / "tall.mp4"
    stamps = {path: path.stat().st_mtime_ns for path in (ramp, tall)}
    os.remove(tall)
    run_prepare(collection, out, "--workers", "1")
    assert ramp.stat().st_mtime_ns == stamps[ramp]  # untouched
    assert tall.exists()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {json.loads(line)["video_id"] for line in lines} == {"ramp", "tall", "broken"}
    (out / "manifest.jsonl").write_text(lines[0] + "\n{broken json\n")
    with pytest.raises(ValueError, match="manifest.jsonl:2: not a manifest entry"):
        read_manifest(out / "manifest.jsonl")


def test_prepare_records_its_settings_and_refuses_a_rerun_with_others(collection, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(collection, out, "--workers", "1", "--crf", "30")
    settings = json.loads((out / "prepare.json").read_text())
    assert (settings["fps"], settings["short_side"], settings["crf"], settings["tune"]) == (2.0, 32, 30, "fastdecode")
    assert describe_preparation(str(out / "videos")) == describe_preparation(str(out))
    assert describe_preparation(str(out)).startswith("prepared: fps=2.0, short_side=32, keyframe_interval=0.5, crf=30")
    assert describe_preparation(str(collection)) == "as given" and describe_preparation("") == ""
    assert run_prepare(collection, out, "--workers", "1", "--crf", "30") == 0  # same settings: resumes
    with pytest.raises(ValueError, match=r"prepared with other settings \(crf 30 -> 23\); a rerun keeps"):
        run_prepare(collection, out, "--workers", "1", "--crf", "23")
    (out / "prepare.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"prepare.json: expected a JSON object"):
        describe_preparation(str(out))


def test_prepare_from_annotation_file(collection, tmp_path):
    annotations = tmp_path / "train.jsonl"
    annotations.write_text(json.dumps({"video_id": "ramp", "video": "ramp.mp4", "caption": "grey"}) + "\n")
    out = tmp_path / "prepared"
    assert main(["prepare", str(annotations), str(out), "--video-root", str(collection), "--fps", "1",
                 "--short-side", "16", "--no-progress", "--workers", "1"]) == 0
    assert read_manifest(out / "manifest.jsonl")["ramp"].frames == 3


@pytest.mark.parametrize("video_id", ["../../escaped", "sub/ramp", ".."])
def test_prepare_refuses_an_id_that_is_not_a_file_name(collection, tmp_path, video_id):
    # the output is OUT/videos/<id>.mp4: "../../escaped" wrote outside OUT, and "sub/ramp" failed
    # with a FileNotFoundError that blamed the source video
    annotations = tmp_path / "train.jsonl"
    annotations.write_text(json.dumps({"video_id": video_id, "video": "ramp.mp4", "caption": "grey"}) + "\n")
    with pytest.raises(ValueError, match=f"video id {re.escape(repr(video_id))} .*ramp.mp4.* is not a plain file name"):
        main(["prepare", str(annotations), str(tmp_path / "out" / "prepared"), "--video-root", str(collection),
              "--no-progress"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.mp4").exists()


def test_prepare_into_a_used_folder_keeps_the_entries_of_other_videos(collection, tmp_path, caplog):
    out = tmp_path / "prepared"
    run_prepare(collection, out, "--workers", "1")  # ramp, tall and broken (failed)
    only_tall = tmp_path / "tall.jsonl"
    only_tall.write_text(json.dumps({"video_id": "tall", "video": "nested/tall.mp4", "caption": "grey"}) + "\n")
    os.remove(out / "videos" / "tall.mp4")
    assert run_prepare(only_tall, out, "--video-root", str(collection), "--workers", "1") == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    # the earlier entries of ramp and broken are kept; tall, redone, has this run's entry only
    entries = sorted((line["video_id"], line["status"]) for line in lines)
    assert entries == [("broken", "failed"), ("ramp", "ok"), ("tall", "ok")]
    os.remove(out / "videos" / "ramp.mp4")
    assert run_prepare(only_tall, out, "--video-root", str(collection), "--workers", "1") == 0
    assert sorted(read_manifest(out / "manifest.jsonl")) == ["broken", "tall"]
    assert "1 earlier entries dropped, their outputs no longer exist" in caplog.text


def test_even_size_keeps_aspect():
    assert even_size(480, 360, 256) == (342, 256)
    assert even_size(360, 480, 256) == (256, 342)
    assert even_size(1920, 1080, 256) == (456, 256)
    assert even_size(320, 240, 256) == (320, 240)  # never enlarged


def test_prepare_turns_frame_folders_into_videos(tmp_path):
    from PIL import Image

    source = tmp_path / "raw"
    folder = source / "clip7"
    folder.mkdir(parents=True)
    for index in range(6):  # extracted at 3 fps: image i on screen from i / 3 s, grey 40 * i
        Image.fromarray(np.full((40, 60, 3), 40 * index, dtype=np.uint8)).save(folder / f"img_{index + 1}.png")
    empty = source / "empty_frames"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    broken = source / "broken_frames"
    broken.mkdir()
    (broken / "0001.jpg").write_bytes(b"not an image")
    out = tmp_path / "prepared"
    assert run_prepare(source, out, "--frame-rate", "3") == 0
    manifest = read_manifest(out / "manifest.jsonl")
    assert sorted(manifest) == ["broken_frames", "clip7"]  # a folder without images is no frame folder
    failed = manifest["broken_frames"]
    assert failed.status == "failed" and "broken_frames: 0001.jpg: not a readable image" in failed.error
    entry = manifest["clip7"]
    assert (entry.status, entry.frames, entry.fps, entry.duration) == ("ok", 4, 2.0, 2.0)
    frames, _, rate = read_output(entry.output)
    assert rate == 2.0 and frames[0].shape == (32, 48, 3)
    # output frame k shows the image on screen at k / 2 s: images 0, 1, 3, 4
    np.testing.assert_allclose([frame.mean() for frame in frames], [0, 40, 120, 160], atol=3)


def test_evaluation_shows_videos_prepared_otherwise_than_the_training_videos(tmp_path):
    from stoa_vlp.commands.task_common import VIDEOS, preprocessing_rows
    from stoa_vlp.config import load_config
    from stoa_vlp.data.prepare import PrepareOptions, record_settings

    prepared, raw = tmp_path / "prepared", tmp_path / "raw"
    for folder in (prepared / "videos", raw):
        folder.mkdir(parents=True)
    record_settings(prepared, PrepareOptions(crf=26))
    trained = load_config("tiny", [f"data.video_root={prepared / 'videos'}"])
    evaluated = load_config("tiny", [f"data.video_root={raw}"])
    rows = {name: (training, evaluation) for name, training, evaluation in preprocessing_rows(trained, evaluated)}
    assert rows[VIDEOS] == ("prepared: fps=2.0, short_side=256, keyframe_interval=0.5, crf=26, preset=veryfast, "
                            "tune=fastdecode", "as given")
    assert rows["model.frames"] == (4, 4)


def test_prepare_writes_rotated_videos_upright(tmp_path):
    source = tmp_path / "raw"
    source.mkdir()
    with av.open(str(source / "phone.mp4"), "w", format="mp4") as container:  # stored 96x64, shown 64x96
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(90)  # a quarter turn counterclockwise, as a phone held upright writes
        for _ in range(10):
            image = np.zeros((64, 96, 3), dtype=np.uint8)
            image[:, :48] = 255  # the left half as stored: the bottom half as shown
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    out = tmp_path / "prepared"
    assert run_prepare(source, out) == 0
    output = read_manifest(out / "manifest.jsonl")["phone"].output
    frames, _, _ = read_output(output)
    assert frames[0].shape == (48, 32, 3)  # upright, short side 32
    assert frames[0][:22].max() < 30 and frames[0][26:].min() > 225
    with av.open(output) as container:
        assert next(container.decode(video=0)).rotation == 0


def test_prepare_refuses_a_truncated_video(tmp_path):
    source = tmp_path / "raw"
    source.mkdir()
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", format="mp4", options={"movflags": "faststart"}) as container:  # index first
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"x264-params": "bframes=0"}
        for image in grey_ramp(30, 32, 32):  # 3 s
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(whole)) as container:  # cut before the packet of 2 s: the frames before decode cleanly
        stream = container.streams.video[0]
        cut = next(p.pos for p in container.demux(stream) if p.size and p.pts * stream.time_base >= 2)
    (source / "cut.mp4").write_bytes(whole.read_bytes()[:cut])
    out = tmp_path / "prepared"
    assert run_prepare(source, out) == 1  # every video failed
    entry = read_manifest(out / "manifest.jsonl")["cut"]
    assert entry.status == "failed" and not os.path.exists(entry.output)
    assert entry.error.endswith("cut.mp4: truncated: its frames stop at 2.00s but its container says it lasts 3.00s")


def test_prepare_refuses_a_video_with_a_damaged_frame(tmp_path):
    # before, the frame FFmpeg decoded with concealed errors was encoded into an "ok" output
    source = tmp_path / "damaged"
    source.mkdir()
    encode_video(tmp_path / "moving.mp4", moving_frames(60), fps=12, keyframe_interval=5.0)
    time = damaged_copy(tmp_path / "moving.mp4", source / "moving.mp4")
    out = tmp_path / "prepared"
    assert main(["prepare", str(source), str(out), "--fps", "12", "--no-progress"]) == 1  # every video failed
    entry = read_manifest(out / "manifest.jsonl")["moving"]
    assert entry.status == "failed" and f"the frame at {time:.3f} s is damaged" in entry.error
