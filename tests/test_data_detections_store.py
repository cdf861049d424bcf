"""The memory-mapped detections store (`stoa-vlp pack`): the same detections as the JSONL file it was
packed from, the same samples, and clear errors for a store that cannot be read."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal

import numpy as np
import pytest

from stoa_vlp.cli import main
from stoa_vlp.config import load_config
from stoa_vlp.data.dataset import build_dataset
from stoa_vlp.data.detections import (
    DetectionsError,
    FrameDetections,
    LabelVocab,
    VideoDetections,
    iter_detections,
    read_packed_detections,
    write_detections,
)
from stoa_vlp.data.detections_store import ARRAYS, DetectionsStore, write_detections_store
from stoa_vlp.data.side_data import load_detections
from stoa_vlp.data.synth import render_world

CLASSES = ["dog", "cat", "ball", "red cube", "chaise", "zebra", "émeu"]


def random_videos(count: int = 40, seed: int = 0) -> list[VideoDetections]:
    """Videos with no frame, frames with no box, several boxes of a class; ids that prefix each other,
    unsorted, some not ASCII."""
    rng = np.random.default_rng(seed)
    # "v\udcff": the id of a video file whose name is not UTF-8, as Python decodes file names
    ids = ["v1", "v10", "v1a", "vidéo", "a", "ab", "Z", "v\udcff"] + [f"video{rng.integers(10**6)}_{i}" for i in range(count - 8)]
    videos = []
    for number, video_id in enumerate(ids):
        width, height = int(rng.integers(32, 640)), int(rng.integers(32, 480))
        frames = []
        for f in range(0 if number == 2 else int(rng.integers(0, 6))):
            boxes = int(rng.integers(0, 5))
            corner = rng.uniform(0, 50, (boxes, 2))
            rects = np.concatenate([corner, corner + rng.uniform(1, 30, (boxes, 2))], axis=1)
            rects = np.minimum(rects, [width, height] * 2).astype(np.float32)  # the reader allows boxes in the image
            classes = [CLASSES[i] for i in rng.integers(0, len(CLASSES), boxes)]
            frames.append(FrameDetections(f * 0.5, classes, rects, rng.uniform(0.1, 1, boxes).astype(np.float32)))
        videos.append(VideoDetections(video_id, width, height, frames))
    return videos


@pytest.fixture
def packed_file(tmp_path):
    """(detections JSONL file, its store packed by the command line)."""
    path = tmp_path / "detections.jsonl"
    write_detections(path, random_videos())
    assert main(["pack", str(path), "--out", str(tmp_path / "detections.store")]) == 0
    return path, tmp_path / "detections.store"


def assert_same_videos(store, expected) -> None:
    assert len(store) == len(expected) and set(store) == set(expected)
    for video_id, want in expected.items():
        got = store[video_id]
        assert (got.width, got.height, got.class_names) == (want.width, want.height, want.class_names), video_id
        for field in ("times", "ends", "rects", "confs", "class_index"):
            value, reference = getattr(got, field), getattr(want, field)
            assert value.dtype == reference.dtype and np.array_equal(value, reference), (video_id, field)


def test_a_store_holds_what_the_file_holds(packed_file):
    path, folder = packed_file
    store = DetectionsStore(folder)
    assert_same_videos(store, read_packed_detections(path))
    assert "v1" in store and "v" not in store and "v100" not in store and 3 not in store and "v\udcff" in store
    assert "v\udcfe" not in store
    assert store.get("missing") is None
    with pytest.raises(KeyError):
        store["missing"]
    assert LabelVocab.from_detections(store).names == LabelVocab.from_detections(read_packed_detections(path)).names


def test_a_data_worker_gets_the_folder_not_the_arrays(packed_file):
    path, folder = packed_file
    store = DetectionsStore(folder)
    store["v1"]  # maps the arrays
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 2000 and copy._arrays is None
    assert_same_videos(copy, read_packed_detections(path))


def test_a_dataset_reads_the_same_samples_from_a_store(tmp_path, caplog):
    world = render_world(tmp_path / "world", train=3, val=0, test=2, seconds=1.0, fps=8, captions_per_clip=2)
    folder = tmp_path / "detections.store"
    write_detections_store(folder, iter_detections(world.detections))
    samples = {}
    for detections in (world.detections, folder):
        config = load_config("tiny", [f"data.test={world.annotations}", f"data.detections={detections}"])
        caplog.clear()
        with caplog.at_level(logging.INFO):
            dataset = build_dataset(config, "test")  # evaluation: the same frames every time
        coverage = [record.getMessage().replace(str(detections), "DETECTIONS") for record in caplog.records
                    if str(detections) in record.getMessage()]
        samples[detections] = ([dataset[index] for index in range(len(dataset))], coverage)
    (from_file, file_logs), (from_store, store_logs) = samples.values()
    assert file_logs == store_logs
    assert any(sample.box_mask.any() for sample in from_file)
    for a, b in zip(from_file, from_store):
        for name in ("boxes", "box_labels", "box_mask", "traj_labels", "traj_mask"):
            assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name


def test_a_store_that_cannot_be_read_is_named(packed_file, tmp_path):
    path, folder = packed_file
    with pytest.raises(FileExistsError, match="detections.store exists"):
        write_detections_store(folder, iter_detections(path))
    (folder / "rects.bin").write_bytes((folder / "rects.bin").read_bytes()[:-16])
    with pytest.raises(DetectionsError, match=r"rects.bin has \d+ bytes, \d+ expected from .*store.json"):
        DetectionsStore(folder)
    manifest = json.loads((folder / "store.json").read_text())
    (folder / "store.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DetectionsError, match="store version 99, this stoa-vlp reads version 1: pack"):
        DetectionsStore(folder)
    config = load_config("tiny", [f"data.detections={tmp_path}"])  # a folder, not a store
    with pytest.raises(FileNotFoundError, match="is not a detections store: it has no store.json"):
        load_detections(config)


def two_videos() -> list[VideoDetections]:
    """'a' and 'b', 3 frames of 2 boxes (a cat, a dog) each: frames 0-2 and 3-5, boxes 0-5 and 6-11 of the store."""
    rects = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32)
    confs = np.array([0.9, 0.5], dtype=np.float32)
    frames = [FrameDetections(time, ["cat", "dog"], rects, confs) for time in (0.0, 1.0, 2.0)]
    return [VideoDetections(video_id, 64, 48, frames) for video_id in ("a", "b")]


def set_value(name: str, index, value):
    """A damage: `value` written at `index` of the store's array file `name`."""
    def damage(folder):
        dtype, row, _ = ARRAYS[name]
        values = np.fromfile(folder / name, dtype=dtype).reshape(-1, *row)
        values[index] = value
        values.tofile(folder / name)
    return damage


def set_class_names(names: list):
    """A damage: store.json's class names replaced by `names`."""
    def damage(folder):
        manifest = json.loads((folder / "store.json").read_text())
        (folder / "store.json").write_text(json.dumps({**manifest, "class_names": names}))
    return damage


def flip_ids(folder):
    """A damage: every bit of ids.bin inverted (no longer UTF-8)."""
    (folder / "ids.bin").write_bytes(bytes(byte ^ 0xFF for byte in (folder / "ids.bin").read_bytes()))


def read_videos(store: DetectionsStore) -> None:
    """Every video, as samples read them."""
    for video_id in store:
        store[video_id]


def count_classes(store: DetectionsStore) -> None:
    """The pass over every box that a label vocabulary built from the store makes."""
    store.box_counts_by_class_name()


DAMAGES = {  # case: (damage, what reads the store, what the error names after the store's folder)
    "class index past the names": (set_value("classes.bin", 7, 999), read_videos,
                                   "classes.bin: class index 999 of video 'b' is outside the 2 class names"),
    "negative class index": (set_value("classes.bin", 7, -1), count_classes, "classes.bin: class index -1 is outside"),
    "class names cut short": (set_class_names(["cat"]), count_classes, "classes.bin: class index 1 is outside the 1"),
    "class names repeated": (set_class_names(["cat", "cat"]), read_videos, "store.json: class_names are not distinct"),
    "video end past the frames": (set_value("videos.bin", (0, 3), 10**6), read_videos,
                                  "videos.bin: video 'a' has frames 0:1000000, not inside the 6 frames"),
    "video width 0": (set_value("videos.bin", (1, 0), 0), read_videos, "videos.bin: video 'b' is 0x48 pixels"),
    "ids not UTF-8": (flip_ids, read_videos, r"ids.bin: video id b'\x9e' is not UTF-8"),
    "id ends past the ids": (set_value("id_ends.bin", 0, 10**6), read_videos, "id_ends.bin: the id ends do not rise"),
    "frame ends decreasing": (set_value("frame_ends.bin", 1, 0), read_videos,
                              "frame_ends.bin: the frame ends of video 'a' do not rise"),
    "frame ends past the boxes": (set_value("frame_ends.bin", 5, 10**6), read_videos,
                                  "frame_ends.bin: the frame ends of video 'b' do not rise from 6 to 1000000 inside"),
    "time not a number": (set_value("times.bin", 4, np.nan), read_videos, "times.bin: the frame times of video 'b'"),
    "times unsorted": (set_value("times.bin", 0, 99.0), read_videos, "times.bin: the frame times of video 'a'"),
    "box not a number": (set_value("rects.bin", 7, np.nan), read_videos, "rects.bin: video 'b' has a box that is not"),
}


@pytest.mark.parametrize("damage, read, named", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_store_is_named(tmp_path, damage, read, named):
    """What pack never writes is an error naming the file (and the video), not a numpy error or a wrong sample."""
    folder = tmp_path / "detections.store"
    write_detections_store(folder, two_videos())
    damage(folder)
    with pytest.raises(DetectionsError, match=re.escape(str(folder / named))):
        read(DetectionsStore(folder))


def test_a_pack_that_fails_leaves_no_store(tmp_path):
    path = tmp_path / "detections.jsonl"
    write_detections(path, random_videos(10))
    path.write_text(path.read_text() + '{"video_id": "broken"}\n')
    with pytest.raises(DetectionsError, match="detections.jsonl:11"):
        main(["pack", str(path), "--out", str(tmp_path / "detections.store")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detections.jsonl"]


def test_a_killed_pack_leaves_no_store(tmp_path, monkeypatch):
    """A job's time limit or a pre-emption sends SIGTERM: the partly written store goes too."""
    from stoa_vlp.data import detections

    path = tmp_path / "detections.jsonl"
    write_detections(path, random_videos(10))
    read = detections.iter_detections

    def killed_midway(file):
        for number, video in enumerate(read(file)):
            if number == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield video

    monkeypatch.setattr(detections, "iter_detections", killed_midway)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as killed:
            main(["pack", str(path), "--out", str(tmp_path / "detections.store")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert killed.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detections.jsonl"]


def test_a_store_older_than_its_file_is_reported(packed_file, caplog):
    path, folder = packed_file
    config = load_config("tiny", [f"data.detections={folder}"])
    with caplog.at_level(logging.WARNING):
        load_detections(config)
    assert "has changed since" not in caplog.text
    path.write_text(path.read_text() + "\n")
    with caplog.at_level(logging.WARNING):
        load_detections(config)
    assert f"the detections file it was packed from, {path}, has changed since: pack it again" in caplog.text
    with pytest.raises(ValueError, match="give the store's folder, not its store.json"):
        load_detections(load_config("tiny", [f"data.detections={folder / 'store.json'}"]))
    manifest = json.loads((folder / "store.json").read_text())
    del manifest["boxes"]
    (folder / "store.json").write_text(json.dumps(manifest))
    with pytest.raises(DetectionsError, match="store.json: boxes missing or not valid"):
        DetectionsStore(folder)


def test_a_store_packed_from_videos_in_python_has_no_file_to_compare(tmp_path):
    folder = tmp_path / "detections.store"
    write_detections_store(folder, random_videos(10))  # no source file
    store = DetectionsStore(folder)
    assert store.manifest["source"] is None and not store.source_changed() and len(store) == 10
