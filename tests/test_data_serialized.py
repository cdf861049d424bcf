"""Packed (numpy-backed) detections and tags: the same answers as the plain objects, and a dataset
that holds no per-video Python containers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stoa_vlp.config import load_config
from stoa_vlp.data import serialized
from stoa_vlp.data.annotations import read_annotations
from stoa_vlp.data.dataset import SampleBuilder, VideoTextDataset
from stoa_vlp.data.detections import LabelVocab, PackedVideoDetections, read_detections
from stoa_vlp.data.geometry import resize_crop
from stoa_vlp.data.object_targets import select_objects
from stoa_vlp.data.serialized import SerializedDict, SerializedList
from stoa_vlp.data.synth import render_world
from stoa_vlp.data.tags import PackedTags, TagCache, read_captions
from stoa_vlp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return render_world(tmp_path_factory.mktemp("world"), train=4, val=0, test=2, seconds=1.0, fps=8, captions_per_clip=3)


@pytest.fixture(scope="module")
def piece_tags(world):
    """Random word-piece tags for every caption of the world (no spaCy needed)."""
    rng = np.random.default_rng(0)
    tokenizer = Tokenizer(24)
    return {c: rng.integers(0, 3, len(tokenizer.encode_words(c))) for c in read_captions(world.annotations)}


def tag_cache(piece_tags, tmp_path, length: int) -> TagCache:
    cache = TagCache(tmp_path / "tags.json", length=length)
    cache.update(piece_tags)
    return cache


def test_serialized_dict_finds_every_key_and_survives_pickling():
    mapping = {"a": 1, "b": [2, 3], "é ü": {"x": np.arange(3)}, "": None, "\ud800 lone surrogate": "s"}
    stored = pickle.loads(pickle.dumps(SerializedDict(mapping)))  # as sent to spawned workers
    assert len(stored) == len(mapping)
    for key, value in mapping.items():
        assert key in stored
        got = stored.get(key, "missing")
        assert np.array_equal(got["x"], value["x"]) if isinstance(value, dict) else got == value
    assert "c" not in stored and stored.get("c") is None and stored.get("c", 7) == 7


def test_serialized_dict_tells_colliding_keys_apart(monkeypatch):
    monkeypatch.setattr(serialized, "key_hash", lambda key: np.uint64(len(key) % 2))  # everything collides
    mapping = {f"key{i}": i for i in range(20)}
    stored = SerializedDict(mapping)
    assert [stored.get(key) for key in mapping] == list(range(20))
    assert stored.get("key99") is None and stored.get("odd") is None


@pytest.mark.parametrize("video_size", [(64, 64), (96, 64)])
def test_packed_detections_select_the_same_objects(world, video_size):
    plain = read_detections(world.detections)
    config = load_config("tiny", [f"data.train={world.annotations}"])
    packed = SampleBuilder(config, training=True, detections=plain, label_vocab=LabelVocab([])).detections
    assert isinstance(packed, SerializedDict) and isinstance(packed.get("video0"), PackedVideoDetections)
    vocab = LabelVocab.from_detections(plain)
    geometry = resize_crop(*video_size, 48)  # (96, 64): detections rescaled from 64x64, then cropped
    times = np.linspace(0.0, 1.0, 5).tolist()
    assert len(packed) == len(plain) == 6
    for video_id, video in plain.items():
        expected = select_objects(video, times, geometry, vocab, 4, 3)
        got = select_objects(packed.get(video_id), times, geometry, vocab, 4, 3)
        assert expected.mask.any()
        for field in ("boxes", "labels", "mask", "traj_labels", "traj_mask"):
            a, b = getattr(expected, field), getattr(got, field)
            assert a.dtype == b.dtype and np.array_equal(a, b), (video_id, field)
    assert packed.get("no-such-video") is None


def test_packed_tags_match_the_cache(world, piece_tags, tmp_path):
    captions = read_captions(world.annotations)
    for length in (24, 8):  # 8 cuts most captions
        cache = tag_cache(piece_tags, tmp_path, length)
        packed = PackedTags(cache)
        assert len(packed) == len(cache) == len(set(captions)) == 18 and packed.length == length
        for caption in captions:
            expected, got = cache.get(caption), packed.get(caption)
            assert expected.shape == (length,) and got.dtype == np.int64 and np.array_equal(got, expected)
            assert caption in packed
        assert packed.get("a caption nobody wrote") is None and cache.get("a caption nobody wrote") is None


def python_containers(obj, where: str) -> list[str]:
    """Attributes (recursively through packed containers) that hold a Python list, dict, tuple or set."""
    found = []
    for name, value in vars(obj).items():
        if isinstance(value, (list, dict, tuple, set)):
            found.append(f"{where}.{name}")
        elif isinstance(value, (SerializedList, SerializedDict, PackedTags)):
            found += python_containers(value, f"{where}.{name}")
        else:
            assert isinstance(value, (np.ndarray, int)), f"{where}.{name}: {type(value)}"
    return found


def test_dataset_holds_detections_and_tags_packed(world, piece_tags, tmp_path):
    cache = tag_cache(piece_tags, tmp_path, 24)
    records = read_annotations(world.annotations, split="train")
    config = load_config("tiny", [f"data.train={world.annotations}"])
    detections = read_detections(world.detections)
    vocab = LabelVocab.from_detections(detections)
    dataset = VideoTextDataset(records, config, True, detections, vocab, cache)
    builder = dataset.builder
    assert isinstance(dataset.records, SerializedList) and isinstance(dataset.items, np.ndarray)
    assert isinstance(builder.detections, SerializedDict) and isinstance(builder.tag_cache, PackedTags)
    assert python_containers(dataset.records, "records") == []
    assert python_containers(builder.detections, "detections") == []
    # only the split's videos of a file that holds every split's (a copy per dataset, per process)
    assert len(builder.detections) == len(records) < len(detections)
    assert python_containers(builder.tag_cache, "tag_cache") == []
    sample = dataset[0]  # built from the packed forms
    record = records[0]
    expected_tags = cache.get(record.captions[0])
    assert np.array_equal(sample.pos_tags, expected_tags) and expected_tags.any()
    assert sample.box_mask.any() and sample.video_id == record.video_id
    # an already packed form is shared as it is, not packed again
    again = VideoTextDataset(records, config, False, builder.detections, vocab, builder.tag_cache)
    assert again.builder.detections is builder.detections and again.builder.tag_cache is builder.tag_cache
