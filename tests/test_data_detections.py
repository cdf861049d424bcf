"""Detections: file format, VinVL conversion, label vocabulary and per-clip selection."""

import gzip
import json

import numpy as np
import pytest

from stoa_vlp.cli import main
from stoa_vlp.data.detections import (
    DetectionsError,
    FrameDetections,
    LabelVocab,
    PackedVideoDetections,
    VideoDetections,
    convert_vinvl,
    read_detections,
    read_hw_tsv,
    read_packed_detections,
    read_vinvl_tsv,
    write_detections,
)
from stoa_vlp.data.geometry import resize_crop
from stoa_vlp.data.object_targets import misaligned_times, nearest_frames, select_objects, suppress_across_classes
from stoa_vlp.data.synth import DetectionNoise, noisy_detections, sample_clip, true_boxes


def _frame(time, *objects):
    classes = [o[0] for o in objects]
    rects = np.array([o[1] for o in objects], dtype=np.float32).reshape(-1, 4)
    confs = np.array([o[2] for o in objects], dtype=np.float32)
    return FrameDetections(time, classes, rects, confs)


def test_write_read_round_trip(tmp_path):
    videos = [
        VideoDetections("a", 320, 240, [_frame(0.0, ("dog", [1, 2, 30, 40], 0.9)), _frame(0.5)]),
        VideoDetections("b", 64, 48, [_frame(1.0, ("cat", [0, 0, 10, 10], 0.5), ("cat", [5, 5, 20, 20], 0.25))]),
    ]
    path = tmp_path / "dets.jsonl"
    assert write_detections(path, videos) == 2
    line = json.loads(path.read_text().splitlines()[0])
    assert line == {
        "video_id": "a",
        "width": 320,
        "height": 240,
        "frames": [
            {"time": 0.0, "objects": [{"class": "dog", "rect": [1.0, 2.0, 30.0, 40.0], "conf": 0.9}]},
            {"time": 0.5, "objects": []},
        ],
    }
    loaded = read_detections(path)
    assert list(loaded) == ["a", "b"]
    assert loaded["b"].frames[0].classes == ["cat", "cat"]
    np.testing.assert_allclose(loaded["b"].frames[0].rects, videos[1].frames[0].rects)
    np.testing.assert_allclose(loaded["b"].frames[0].confs, [0.5, 0.25])
    assert loaded["a"].frames[1].rects.shape == (0, 4)


def test_failed_write_leaves_the_earlier_file_as_it_was(tmp_path):
    path = tmp_path / "dets.jsonl"
    write_detections(path, [VideoDetections("a", 64, 48, [_frame(0.0, ("dog", [1, 2, 30, 40], 0.9))])])
    earlier = path.read_text()

    def detections_until_failure():
        yield VideoDetections("b", 64, 48, [_frame(0.0)])
        raise RuntimeError("detector failed")

    with pytest.raises(RuntimeError, match="detector failed"):
        write_detections(path, detections_until_failure())
    assert path.read_text() == earlier and sorted(tmp_path.iterdir()) == [path]  # no temporary file left


def frame_line(frame: str) -> str:
    """A detections line of one video with `frame` (JSON text, so NaN may be written)."""
    return '{"video_id": "x", "width": 64, "height": 64, "frames": [' + frame + "]}"


def object_line(fields: str, name: str = '"dog"') -> str:
    """A detections line whose one object has `fields` (JSON text) besides its class `name`."""
    return frame_line('{"time": 0, "objects": [{"class": ' + name + ", " + fields + "}]}")


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"video_id": "x", "width": 2', "malformed JSON"),
        ('{"video_id": "x", "width": 2, "height": 2}', "missing frames"),
        ('{"video_id": "x", "width": 0, "height": 2, "frames": []}', "'width' must be a positive integer, got 0"),
        ('{"video_id": "x", "width": true, "height": 2, "frames": []}', "'width' must be a positive integer, got True"),
        ('{"video_id": "x", "width": 2, "height": 2.0, "frames": []}', "'height' must be a positive integer, got 2.0"),
        ('{"video_id": null, "width": 2, "height": 2, "frames": []}', "'video_id' must be a non-empty string, got None"),
        ('{"video_id": "", "width": 2, "height": 2, "frames": []}', "'video_id' must be a non-empty string"),
        ('{"video_id": 7, "width": 2, "height": 2, "frames": []}', "'video_id' must be a non-empty string, got 7"),
        ('{"video_id": "x", "width": 2, "height": 2, "frames": [{"time": 0}]}', "frame 0: each frame needs"),
        (
            '{"video_id": "x", "width": 2, "height": 2, "frames": [{"time": 0, "objects": [{"class": "a", "rect": [1, 2, 3], "conf": 1}]}]}',
            r"object 0 'rect' must be",
        ),
        (
            '{"video_id": "x", "width": 2, "height": 2, "frames": [{"time": 0, "objects": [{"class": "a", "rect": [3, 2, 1, 4], "conf": 1}]}]}',
            "x1 < x0",
        ),
        ('[1, 2]', "expected a JSON object"),
        (frame_line('{"time": NaN, "objects": []}'), r"frame 0: 'time' must be a finite number, got nan"),
        (frame_line('{"time": "0.5", "objects": []}'), r"frame 0: 'time' must be a finite number, got '0.5'"),
        (object_line('"rect": [NaN, 1, 2, 3], "conf": 0.5'), r"object 0: 'rect' value must be a finite number, got nan"),
        (object_line('"rect": [0, 0, Infinity, 3], "conf": 0.5'), r"object 0: 'rect' value must be a finite number, got inf"),
        (object_line('"rect": ["1", "2", "3", "4"], "conf": 0.5'), r"'rect' value must be a finite number, got '1'"),
        (object_line('"rect": [true, false, true, true], "conf": 0.5'), r"'rect' value must be a finite number, got True"),
        (object_line('"rect": [1, 2, 3, 4], "conf": NaN'), r"object 0: 'conf' must be a finite number, got nan"),
        (object_line('"rect": [1, 2, 3, 4], "conf": "high"'), r"object 0: 'conf' must be a finite number, got 'high'"),
        (object_line('"rect": [1, 2, 3, 4], "conf": 1.5'), r"object 0 'conf' 1.5 is not between 0 and 1"),
        (object_line('"rect": [1, 2, 3, 4], "conf": -0.1'), r"object 0 'conf' -0.1 is not between 0 and 1"),
        (object_line('"rect": [1, 2, 3, 4], "conf": 0.5', '{"a": 1}'), r"object 0: 'class' must be a non-empty string"),
        (b'{"video_id": "caf\xe9", "width": 2, "height": 2, "frames": []}', r"not UTF-8 text"),
        (object_line('"rect": [10, 10, 5000, 5000], "conf": 0.5'),
         r"frame 0: object 0 'rect' \[10.0, 10.0, 5000.0, 5000.0\] reaches outside the 64x64 image"),
        (object_line('"rect": [-30, -30, 20, 20], "conf": 0.5'), r"frame 0: object 0 'rect' \[-30.0, .* reaches outside"),
        (object_line('"rect": [0.1, 0.1, 0.6, 0.7], "conf": 0.5'), r"every box lies within 1.5 pixels .* normalised"),
        (frame_line('{"time": -5, "objects": []}'), r"frame 0: 'time' -5.0 is negative"),
        (frame_line('{"time": 0.5, "objects": []}, {"time": 1, "objects": []}, {"time": 0.5, "objects": []}'),
         r"frame 2: time 0.5 is also the time of .*dets.jsonl:3 frame 0"),
    ],
)
def test_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "dets.jsonl"
    good = b'{"video_id": "ok", "width": 2, "height": 2, "frames": []}'
    path.write_bytes(good + b"\n\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(DetectionsError, match=f"dets.jsonl:3.*{message}"):
        read_detections(path)


def test_duplicate_video_and_missing_file(tmp_path):
    path = tmp_path / "dets.jsonl"
    good = '{"video_id": "ok", "width": 2, "height": 2, "frames": []}'
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(DetectionsError, match="dets.jsonl:2: video 'ok' appears twice"):
        read_detections(path)
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_detections(tmp_path / "nothing.jsonl")


def test_boxes_a_little_outside_the_image_are_clipped_to_it(tmp_path):
    # slack: 2% of a side, at least 2 pixels (2 on the 64 x 48 video, 20 on the 1000 x 500 one)
    small = VideoDetections("small", 64, 48, [_frame(0.0, ("dog", [-2, -1.5, 66, 49], 0.9), ("cat", [3, 4, 30, 40], 0.5))])
    large = VideoDetections("large", 1000, 500, [_frame(0.0, ("dog", [-20, 480, 1019, 510], 0.9))])
    corner = VideoDetections("corner", 16, 16, [_frame(0.0, ("dot", [0, 0, 1, 1], 0.9))])  # too small to judge normalised
    path = tmp_path / "dets.jsonl"
    write_detections(path, [small, large, corner])
    videos = read_detections(path)
    np.testing.assert_allclose(videos["small"].frames[0].rects, [[0, 0, 64, 48], [3, 4, 30, 40]])
    np.testing.assert_allclose(videos["large"].frames[0].rects, [[0, 480, 1000, 500]])
    np.testing.assert_allclose(videos["corner"].frames[0].rects, [[0, 0, 1, 1]])
    small.frames[0].rects[1, 2] = 66.5
    write_detections(path, [small])
    with pytest.raises(DetectionsError, match=r"dets.jsonl:1 frame 0: object 1 'rect' \[3.0, 4.0, 66.5, 40.0\] reaches outside"):
        read_detections(path)


def test_boxes_without_area_are_counted_in_one_warning_and_left_out_of_clips(tmp_path, caplog):
    # before: read without a word, then dropped from every clip by the crop's area test
    good = VideoDetections("a", 64, 48, [_frame(0.0, ("dog", [1, 2, 30, 40], 0.9))])
    flat = VideoDetections("b", 64, 48, [_frame(0.0, ("dog", [5, 5, 5, 30], 0.9), ("cat", [3, 4, 30, 40], 0.5)),
                                         _frame(1.0, ("dot", [7, 8, 7, 8], 0.8))])
    clipped = VideoDetections("c", 64, 48, [_frame(0.0, ("dog", [-2, 5, -1, 30], 0.9))])  # x0 = x1 = 0 once clipped
    path = tmp_path / "dets.jsonl"
    write_detections(path, [good, flat, clipped])
    videos = read_detections(path)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == (f"{path}: 3 boxes have no area (x1 = x0 or y1 = y0; e.g. line 2, video b): "
                                   "every clip leaves them out")
    targets = select_objects(videos["b"], [0.0], resize_crop(64, 48, 32), LabelVocab(["dog", "cat"]), 4, 2)
    assert targets.mask[0].sum() == 1 and targets.labels[0, 0] == LabelVocab(["dog", "cat"]).id("cat")
    caplog.clear()
    write_detections(path, [good])
    read_detections(path)
    assert not caplog.records


def test_gzip_compressed_detections_are_read_and_packed(tmp_path):
    videos = [VideoDetections("a", 64, 48, [_frame(0.5, ("dog", [1, 2, 30, 40], 0.9))])]
    plain = tmp_path / "dets.jsonl"
    write_detections(plain, videos)
    compressed = tmp_path / "dets.jsonl.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_detections(compressed)["a"].frames[0].classes == ["dog"]
    assert main(["pack", str(compressed), "--out", str(tmp_path / "dets.store")]) == 0
    compressed.write_bytes(gzip.compress(plain.read_bytes() + b'{"video_id": "caf\xe9"}\n'))
    with pytest.raises(DetectionsError, match=r"dets.jsonl.gz:2: not UTF-8 text"):
        read_detections(compressed)
    compressed.write_bytes(gzip.compress(plain.read_bytes())[:-10])
    with pytest.raises(DetectionsError, match=r"dets.jsonl.gz: not readable gzip data"):
        read_detections(compressed)
    compressed.write_bytes(plain.read_bytes())
    with pytest.raises(DetectionsError, match=r"dets.jsonl.gz: not readable gzip data"):
        read_detections(compressed)


def test_convert_vinvl(tmp_path):
    prediction = {
        "objects": [{"class": "man", "rect": [10, 20, 50, 90], "conf": 0.8, "attributes": ["tall"], "attr_scores": [0.5]}],
        "image_w": 320,
        "image_h": 240,
    }
    video = convert_vinvl("v1", [(1.0, prediction), (0.0, {"objects": [], "image_w": 320, "image_h": 240})])
    assert (video.width, video.height) == (320, 240)
    assert [f.time for f in video.frames] == [0.0, 1.0]
    assert video.frames[1].classes == ["man"]
    np.testing.assert_allclose(video.frames[1].rects, [[10, 20, 50, 90]])
    bare = convert_vinvl("v2", [(0.0, prediction["objects"])], width=64, height=96)
    assert bare.frames[0].classes == ["man"] and bare.width == 64
    with pytest.raises(DetectionsError, match="v2.*width and height"):
        convert_vinvl("v2", [(0.0, prediction["objects"])])

    tsv = tmp_path / "predictions.tsv"
    tsv.write_text(
        f"clip7_0002\t{json.dumps(prediction)}\nclip7_0000\t{json.dumps(prediction)}\nother/5.jpg\t{json.dumps(prediction)}\n"
    )
    videos = {v.video_id: v for v in read_vinvl_tsv(tsv, fps=2.0, start_number=0)}
    assert sorted(videos) == ["clip7", "other"]
    assert [f.time for f in videos["clip7"].frames] == [0.0, 1.0]
    assert [f.time for f in videos["other"].frames] == [2.5]
    tsv.write_text("clip7_0002\t{not json\n")
    with pytest.raises(DetectionsError, match="predictions.tsv:1: malformed JSON"):
        read_vinvl_tsv(tsv, fps=1.0)


def test_scene_graph_benchmark_predictions_take_their_sizes_from_the_hw_file(tmp_path):
    objects = [{"rect": [10.5, 20.0, 50.0, 90.0], "bbox_id": 0, "class": "man", "conf": 0.8}]
    tsv = tmp_path / "predictions.tsv"  # as convert_predictions_to_tsv writes it: no image size
    tsv.write_text("".join(f"clip7_{i}\t{json.dumps({'objects': objects, 'relations': None})}\n" for i in range(2)))
    hw = tmp_path / "frames.hw.tsv"
    hw.write_text('clip7_0\t[{"height": 240, "width": 320}]\nclip7_1\t[{"height": 240, "width": 320}]\n')
    with pytest.raises(DetectionsError, match="predictions.tsv:1: no image_w/image_h for 'clip7_0' and no size"):
        read_vinvl_tsv(tsv, fps=1.0, start_number=0)
    out = tmp_path / "detections.jsonl"
    assert main(["vinvl", str(tsv), "--fps", "2", "--start-number", "0", "--hw", str(hw), "--out", str(out)]) == 0
    video = read_detections(out)["clip7"]
    assert (video.width, video.height) == (320, 240) and [f.time for f in video.frames] == [0.0, 0.5]
    np.testing.assert_allclose(video.frames[1].rects, [[10.5, 20.0, 50.0, 90.0]])
    assert video.frames[0].classes == ["man"] and video.frames[0].confs.tolist() == pytest.approx([0.8])
    hw.write_text("clip7_0\t{not json\n")
    with pytest.raises(DetectionsError, match="frames.hw.tsv:1: expected <key>"):
        read_hw_tsv(hw)


def test_detections_are_read_packed_as_read_with_the_same_checks(tmp_path):
    videos = [VideoDetections("a", 64, 48, [_frame(0.5, ("dog", [1, 2, 3, 4], 0.5)), _frame(0.0)]),
              VideoDetections("b", 32, 32, [])]
    path = tmp_path / "detections.jsonl"
    write_detections(path, videos)
    plain, packed_videos = read_detections(path), read_packed_detections(path)
    assert list(packed_videos) == list(plain) == ["a", "b"]
    for video_id, video in plain.items():
        expected, got = PackedVideoDetections.pack(video), packed_videos[video_id]
        assert (got.width, got.height, got.class_names) == (expected.width, expected.height, expected.class_names)
        for field in ("times", "ends", "rects", "confs", "class_index"):
            assert np.array_equal(getattr(got, field), getattr(expected, field)), field
    assert packed_videos["a"].boxes_per_frame().tolist() == [0, 1]  # frames sorted by time
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(DetectionsError, match="detections.jsonl:3: video 'a' appears twice"):
        read_packed_detections(path)


def test_label_vocab(tmp_path):
    frames = [_frame(0, ("dog", [0, 0, 1, 1], 1), ("cat", [0, 0, 1, 1], 1), ("dog", [0, 0, 1, 1], 1), ("ant", [0, 0, 1, 1], 1))]
    vocab = LabelVocab.from_detections({"v": VideoDetections("v", 2, 2, frames)})
    assert vocab.names == ["<pad>", "<unknown>", "dog", "ant", "cat"]
    assert len(vocab) == 5 and vocab.id("dog") == 2 and vocab.id("zebra") == 1 and vocab.name(4) == "cat"
    vocab.save(tmp_path / "labels.json")
    assert LabelVocab.load(tmp_path / "labels.json").names == vocab.names
    small = LabelVocab.from_detections([VideoDetections("v", 2, 2, frames)], max_size=3)
    assert small.names == ["<pad>", "<unknown>", "dog"] and small.id("cat") == 1
    two = [VideoDetections("v", 2, 2, frames), VideoDetections("w", 2, 2, [_frame(0, ("cat", [0, 0, 1, 1], 1))] * 3)]
    from_packed = LabelVocab.from_detections([PackedVideoDetections.pack(video) for video in two])
    assert from_packed.names == LabelVocab.from_detections(two).names == ["<pad>", "<unknown>", "cat", "dog", "ant"]
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="bad.json: not a stoa-vlp label vocabulary"):
        LabelVocab.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "names,message",
    [
        ([1, 2], "labels.json: class names must be non-empty strings, got 1"),
        ([{"a": 1}], r"labels.json: class names must be non-empty strings, got \{'a': 1\}"),
        (["dog", ""], "labels.json: class names must be non-empty strings, got ''"),
        (["dog", "cat", "dog"], "labels.json: duplicate class names in the label vocabulary: dog"),
        (["<unknown>"], "labels.json: duplicate class names in the label vocabulary: <unknown>"),
    ],
)
def test_label_vocab_names_must_be_unique_strings(tmp_path, names, message):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"format": "stoa-vlp labels", "names": names}))
    with pytest.raises(ValueError, match=message):
        LabelVocab.load(path)


def test_label_vocab_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(b'{"format": "stoa-vlp labels",\n"names": ["caf\xe9"]}')
    with pytest.raises(ValueError, match="labels.json:2: not UTF-8 text"):
        LabelVocab.load(path)


VINVL_OBJECT = {"class": "dog", "rect": [1, 2, 30, 40], "conf": 0.9}


def vinvl_line(key: str, **prediction) -> str:
    return f"{key}\t{json.dumps({'objects': [VINVL_OBJECT], 'image_w': 64, 'image_h': 48, **prediction})}\n"


@pytest.mark.parametrize(
    "lines,message",
    [
        ([vinvl_line("vid_0", image_w=0)], r"predictions.tsv:1: image_w must be a positive integer, got 0"),
        ([vinvl_line("vid_0", image_h=-48)], r"predictions.tsv:1: image_h must be a positive integer, got -48"),
        ([vinvl_line("vid_0", image_w=64.7)], r"predictions.tsv:1: image_w must be a positive integer, got 64.7"),
        ([vinvl_line("vid_0", image_w=[64])], r"predictions.tsv:1: image_w must be a positive integer, got \[64\]"),
        ([vinvl_line("vid_0", image_w="abc")], r"predictions.tsv:1: image_w must be a positive integer, got 'abc'"),
        ([vinvl_line("vid_0", image_w=None)], r"predictions.tsv:1: image_w must be a positive integer, got None"),
        ([vinvl_line("vid_0"), vinvl_line("vid_1", image_w=128)],
         r"predictions.tsv:2: image size 128x48 differs from 64x48 at .*predictions.tsv:1"),
        ([vinvl_line("vid_0"), vinvl_line("other_0"), vinvl_line("vid/0.jpg", objects=[])],
         r"predictions.tsv:3: frame 0 of video 'vid' is also at .*predictions.tsv:1"),
        ([vinvl_line("vid_0", objects=[{**VINVL_OBJECT, "conf": 1.5}])], r"predictions.tsv:1: object 0 'conf' 1.5 is not"),
        ([vinvl_line("vid_0", objects=[{**VINVL_OBJECT, "rect": [float("nan"), 2, 30, 40]}])],
         r"predictions.tsv:1: object 0: 'rect' value must be a finite number"),
        ([vinvl_line("vid_0"), vinvl_line("vid_1", objects=[VINVL_OBJECT, {**VINVL_OBJECT, "rect": [1, 2, 30, 96]}])],
         r"predictions.tsv:2: object 1 'rect' \[1.0, 2.0, 30.0, 96.0\] reaches outside the 64x48 image"),
        ([vinvl_line("vid_0", objects=[{**VINVL_OBJECT, "rect": [0.1, 0.2, 0.5, 0.6]}])],
         r"predictions.tsv: video 'vid': every box lies within 1.5 pixels"),
    ],
)
def test_vinvl_predictions_are_checked_as_the_detections_reader_checks_them(tmp_path, lines, message):
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text("".join(lines))
    with pytest.raises(DetectionsError, match=message):
        read_vinvl_tsv(tsv, fps=1.0, start_number=0)


@pytest.mark.parametrize(
    "key,video_id,time",
    [
        ("video17/frame_0003.jpg", "video17", 3.0),  # TSN-style frame folders: the file name has a prefix
        ("video17/img_00003.jpg", "video17", 3.0),
        ("video17/0003.jpg", "video17", 3.0),
        ("split/video_17/3", "split/video_17", 3.0),  # the folder is everything before the last '/'
        ("video17_0003", "video17", 3.0),
        ("video_17_0003.jpg", "video_17", 3.0),
    ],
)
def test_vinvl_keys_name_the_video_and_frame(tmp_path, key, video_id, time):
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text(vinvl_line(key))
    [video] = read_vinvl_tsv(tsv, fps=1.0, start_number=0)
    assert (video.video_id, [frame.time for frame in video.frames]) == (video_id, [time])


@pytest.mark.parametrize("key", ["video17/frame.jpg", "/0003.jpg", "video17-0003", "video17_frame"])
def test_vinvl_keys_without_a_video_or_frame_number_are_errors(tmp_path, key):
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text(vinvl_line("vid_3") + vinvl_line(key))
    with pytest.raises(DetectionsError, match=rf"predictions.tsv:2: key {key!r} is not <video_id>_<frame number> or"):
        read_vinvl_tsv(tsv, fps=1.0)


def test_vinvl_frames_extracted_by_ffmpeg_start_at_0_seconds_as_in_a_frame_folder(tmp_path, caplog):
    tsv = tmp_path / "predictions.tsv"  # ffmpeg -vf fps=2 v/%04d.jpg: 0001.jpg first
    tsv.write_text("".join(vinvl_line(f"v/{n:04d}.jpg") for n in (1, 2, 3)))
    [video] = read_vinvl_tsv(tsv, fps=2.0)
    assert [frame.time for frame in video.frames] == [0.0, 0.5, 1.0]  # decode.py: image i at i / frame rate
    assert not caplog.records
    out = tmp_path / "detections.jsonl"
    assert main(["vinvl", str(tsv), "--fps", "2", "--start-number", "0", "--out", str(out)]) == 0
    assert [frame.time for frame in read_detections(out)["v"].frames] == [0.5, 1.0, 1.5]
    assert "no frame is numbered 0, the start number" in caplog.text


def test_vinvl_frame_numbers_below_the_start_number_are_errors(tmp_path):
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text(vinvl_line("v/0001.jpg") + vinvl_line("v/0000.jpg"))
    with pytest.raises(DetectionsError, match=r"predictions.tsv:2: key 'v/0000.jpg' has frame number 0, "
                                              r"below the start number 1 \(the number of the frame at 0 s: `stoa-vlp vinvl "
                                              r"--start-number 0` for frames numbered from 0\)"):
        read_vinvl_tsv(tsv, fps=1.0)


def test_vinvl_frames_numbered_from_another_start_are_warned_about_once(tmp_path, caplog):
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text("".join(vinvl_line(key) for key in ("a_2", "a_3", "b_2", "c_4", "c_5")))
    read_vinvl_tsv(tsv, fps=2.0, start_number=1)
    [record] = caplog.records
    assert record.levelname == "WARNING" and str(tsv) in record.getMessage()
    assert ("no frame is numbered 1, the start number (the frame at 0 s); the lowest frame number is 2, in 2 of the "
            "3 videos: if the frames were numbered from 2, every box lands 0.5 s late") in record.getMessage()
    caplog.clear()
    tsv.write_text(vinvl_line("a_1") + vinvl_line("b_2"))  # one video starting at 1 is enough
    read_vinvl_tsv(tsv, fps=2.0, start_number=1)
    assert not caplog.records


def test_vinvl_sizes_of_one_video_must_agree_and_files_be_utf8(tmp_path):
    frames = [(0.0, {"objects": [], "image_w": 64, "image_h": 48}), (1.0, {"objects": [], "image_w": 64, "image_h": 64})]
    with pytest.raises(DetectionsError, match="video v frame 1: image size 64x64 differs from 64x48 at video v frame 0"):
        convert_vinvl("v", frames)
    with pytest.raises(DetectionsError, match="video v: width must be a positive integer, got 0"):
        convert_vinvl("v", [(0.0, [])], width=0, height=48)
    with pytest.raises(DetectionsError, match="video v frame 2: time 1.0 is also the time of video v frame 0"):
        convert_vinvl("v", [(1.0, []), (0.0, []), (1.0, [])], width=64, height=48)
    with pytest.raises(DetectionsError, match="video v frame 0: 'time' -0.5 is negative"):
        convert_vinvl("v", [(-0.5, [])], width=64, height=48)
    assert (convert_vinvl("v", [], width=64, height=48).width, convert_vinvl("v", frames[:1]).height) == (64, 48)
    hw = tmp_path / "frames.hw.tsv"
    hw.write_text('vid_0\t[{"height": 48, "width": 64}]\nvid_1\t[{"height": 0, "width": 64}]\n')
    with pytest.raises(DetectionsError, match="frames.hw.tsv:2: height must be a positive integer, got 0"):
        read_hw_tsv(hw)
    tsv = tmp_path / "predictions.tsv"
    tsv.write_bytes(vinvl_line("vid_0").encode() + vinvl_line("vid_1").replace("dog", "caf\xe9").encode("latin-1"))
    with pytest.raises(DetectionsError, match="predictions.tsv:2: not UTF-8 text"):
        read_vinvl_tsv(tsv, fps=1.0)


def test_nearest_frames():
    detected_times = np.array([0.0, 1.0, 2.0, 4.0])
    assert nearest_frames(detected_times, [-1.0, 0.4, 0.5, 0.6, 2.9, 3.0, 3.1, 9.0]) == [0, 0, 0, 1, 2, 2, 3, 3]


def test_misaligned_times():
    sampled = [0.1, 0.7, 1.3, 1.9]  # a 2 s clip
    assert misaligned_times(np.array([0.0, 1.0, 2.0]), sampled) is None
    assert misaligned_times(np.array([0.0, 0.5]), [0.0, 1.2, 1.5]) is None  # within the 1 s minimum after the last
    assert misaligned_times(np.array([0.0, 5.0, 10.0]), [0.0, 12.0]) is None  # sparse: within the 5 s spacing
    assert misaligned_times(np.array([5.0]), np.linspace(0, 10, 8)) is None  # one frame for the whole video
    assert misaligned_times(np.array([]), sampled) is None and misaligned_times(np.array([1.0]), []) is None
    message = misaligned_times(np.array([30.0, 31.0, 32.0]), sampled)  # frame indices written as times
    assert message.startswith("the frame sampled at 0.10 s is 29.90 s from the nearest of 3 detected frames (30 to 32 s)")
    assert misaligned_times(np.array([30.0]), sampled) is not None
    assert misaligned_times(np.array([0.0, 1.0]), [0.0, 3.5]) is not None


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_suppression_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 15))
        corners = rng.uniform(0, 50, size=(n, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(5, 30, size=(n, 2))], axis=1).astype(np.float32)
        labels = rng.integers(2, 5, size=n)
        confs = rng.permutation(n).astype(np.float32) / n  # distinct
        kept = []
        for i in sorted(range(n), key=lambda i: -confs[i]):
            if all(labels[k] == labels[i] or _iou(boxes[k], boxes[i]) < 0.5 for k in kept):
                kept.append(i)
        assert suppress_across_classes(boxes, labels, confs).tolist() == kept
        limit = int(rng.integers(1, 4))  # the greedy pass stops once `limit` boxes are kept
        assert suppress_across_classes(boxes, labels, confs, limit=limit).tolist() == kept[:limit]
    nothing = np.zeros(0, dtype=np.float32)  # every box of a frame outside the crop
    assert suppress_across_classes(nothing.reshape(0, 4), nothing.astype(np.int64), nothing, limit=3).tolist() == []


def test_packed_video_detections_give_back_every_frame():
    frames = [_frame(0.0, ("dog", [1, 2, 3, 4], 0.5), ("cat", [5, 6, 7, 8], 0.25)), _frame(0.5),
              _frame(1.0, ("cat", [0, 0, 9, 9], 0.75))]
    video = VideoDetections("v", 64, 48, frames)
    packed = PackedVideoDetections.pack(video)
    assert (packed.width, packed.height, packed.class_names) == (64, 48, ["cat", "dog"])
    assert packed.times.tolist() == [0.0, 0.5, 1.0] and packed.ends.tolist() == [2, 2, 3]
    for index, frame in enumerate(frames):
        rows = packed.rows(index)
        assert [packed.class_names[i] for i in packed.class_index[rows]] == frame.classes
        assert np.array_equal(packed.rects[rows], frame.rects) and np.array_equal(packed.confs[rows], frame.confs)
    assert packed.rects.dtype == np.float32 and packed.confs.dtype == np.float32
    empty = PackedVideoDetections.pack(VideoDetections("w", 64, 48, [_frame(0.0)]))
    assert empty.rects.shape == (0, 4) and empty.rows(0) == slice(0, 0)
    assert PackedVideoDetections.pack(VideoDetections("x", 64, 48, [])).times.shape == (0,)


def test_select_objects_hand_computed():
    # 320x240 -> Resize(120): 160x120, scale 0.5, CenterCrop(120): x offset 20
    geometry = resize_crop(320, 240, 120)
    vocab = LabelVocab(["dog", "cat", "ball"])  # ids 2, 3, 4
    video = VideoDetections(
        "v",
        320,
        240,
        [
            _frame(
                0.0,
                ("dog", [100, 100, 200, 200], 0.9),
                ("cat", [105, 100, 205, 200], 0.8),  # IoU 0.9 with the dog: suppressed
                ("dog", [110, 100, 210, 200], 0.7),  # same class as the dog: kept
                ("ball", [0, 0, 30, 30], 0.95),  # outside the crop (x < 40 original): dropped
                ("zebra", [200, 10, 240, 50], 0.3),  # unknown class
                ("cat", [260, 150, 300, 190], 0.2),  # fourth box, cut by K = 3
            ),
            _frame(1.0, ("cat", [60, 60, 100, 100], 0.6), ("ball", [150, 20, 190, 60], 0.6)),
            _frame(2.0),
        ],
    )
    targets = select_objects(video, [0.1, 0.9, 2.2, 1.2], geometry, vocab, boxes_per_frame=3, trajectories=3)
    assert targets.labels.tolist() == [[2, 2, 1], [3, 4, 0], [0, 0, 0], [3, 4, 0]]
    assert targets.mask.tolist() == [[True, True, True], [True, True, False], [False] * 3, [True, True, False]]
    np.testing.assert_allclose(targets.boxes[0], [[30, 50, 80, 100], [35, 50, 85, 100], [80, 5, 100, 25]])
    np.testing.assert_allclose(targets.boxes[1, :2], [[10, 30, 30, 50], [55, 10, 75, 30]])
    assert np.all(targets.boxes[2] == 0)
    # summed confidence: dog 1.6, cat 1.2, ball 1.2 (tie: lower id first), unknown 0.3
    assert targets.traj_labels.tolist() == [2, 3, 4]
    assert targets.traj_mask.all()
    assert targets.boxes.dtype == np.float32 and targets.labels.dtype == np.int64


def test_classes_outside_the_vocabulary_still_suppress_each_other():
    geometry = resize_crop(64, 64, 64)
    same_place = [10, 10, 40, 40]
    frame = _frame(0.0, ("zebra", same_place, 0.6), ("giraffe", same_place, 0.5), ("dog", [45, 45, 60, 60], 0.4))
    targets = select_objects(VideoDetections("v", 64, 64, [frame]), [0.0], geometry, LabelVocab(["dog"]), 3, 2)
    assert targets.labels.tolist() == [[1, 2, 0]]  # the zebra (<unknown>) and the dog; the giraffe is one box too many


def test_select_objects_without_detections_pads():
    geometry = resize_crop(64, 64, 64)
    vocab = LabelVocab(["dog"])
    for video in (None, VideoDetections("v", 64, 64, []), VideoDetections("v", 64, 64, [_frame(0.0)])):
        targets = select_objects(video, [0.0, 1.0], geometry, vocab, boxes_per_frame=2, trajectories=3)
        assert targets.boxes.shape == (2, 2, 4) and targets.labels.shape == (2, 2)
        assert not targets.mask.any() and not targets.traj_mask.any()
        assert targets.traj_labels.shape == (3,) and np.all(targets.traj_labels == 0)


def test_detections_of_another_size_are_rescaled():
    # detected on a 640x480 original, frames decoded from a 320x240 prepared copy
    geometry = resize_crop(320, 240, 240)
    video = VideoDetections("v", 640, 480, [_frame(0.0, ("dog", [200, 100, 400, 300], 0.9))])
    targets = select_objects(video, [0.0], geometry, LabelVocab(["dog"]), 1, 1)
    np.testing.assert_allclose(targets.boxes[0, 0], [60, 50, 160, 150])


def test_synthetic_true_boxes_survive_selection():
    clip = sample_clip(np.random.default_rng(5), "v", "train", 64, 16, 8.0, 3)
    video = noisy_detections(clip, np.random.default_rng(0), DetectionNoise.none())
    vocab = LabelVocab.from_detections([video])
    times = [0.0, 0.5, 1.0, 1.875]
    targets = select_objects(video, times, resize_crop(64, 64, 32), vocab, boxes_per_frame=4, trajectories=4)
    boxes = true_boxes(clip)
    count = len(clip.objects)
    for t, time in enumerate(times):
        frame = int(round(time * 8))
        expected = {vocab.id(o.name): b / 2 for o, b in zip(clip.objects, boxes[frame])}
        got = {int(l): b for l, b, m in zip(targets.labels[t], targets.boxes[t], targets.mask[t]) if m}
        assert got.keys() == expected.keys()
        for label in got:
            np.testing.assert_allclose(got[label], expected[label], atol=1e-3)
    assert sorted(targets.traj_labels[:count].tolist()) == sorted(vocab.id(o.name) for o in clip.objects)
