"""WebDataset shards read alike by `read_annotations` and by the `WebDatasetShards` stream: member
names, video ids, captions (cleaned as the tag cache keys them) and captions that cannot be read."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from stoa_vlp.batch import TAG_NOUN, TAG_VERB
from stoa_vlp.config import load_config
from stoa_vlp.data.annotations import AnnotationError, read_annotations
from stoa_vlp.data.dataset import VideoTextDataset, build_dataset
from stoa_vlp.data.prepare import encode_video
from stoa_vlp.data.shards import WebDatasetShards
from stoa_vlp.data.skips import BadSample, SkipCounter
from stoa_vlp.data.tags import TagCache, read_captions
from stoa_vlp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    encode_video(path, [np.full((64, 64, 3), 20 * i, np.uint8) for i in range(8)], fps=4)
    return path.read_bytes()


def write_shard(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def tiny(*overrides):
    return load_config("tiny", ["model.objects=false", *overrides])


def test_streamed_captions_are_cleaned_as_the_tag_cache_keys_them(video, tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [("0001.mp4", video), ("0001.txt", b"a  dog runs\n")])
    (caption,) = read_captions(shard)  # what `stoa-vlp tag` caches
    assert caption == "a dog runs"
    cache = TagCache(tmp_path / "tags.json", length=24)
    cache.update({caption: np.array([0, TAG_NOUN, TAG_VERB])})
    cache.save()
    sample = next(iter(build_dataset(tiny(f"data.val={shard}", f"data.tags={cache.path}"), "val")))
    assert sample.pos_tags[:5].tolist() == [0, 0, TAG_NOUN, TAG_VERB, 0]
    tokens, _ = Tokenizer(24)(caption)
    assert torch.equal(sample.tokens, tokens[0])


def test_stream_and_reader_agree_on_keys_and_video_ids(video, tmp_path):
    members = [("./part0/0001.mp4", video), ("./part0/0001.txt", b"a dog runs"),
               ("./0002.mp4", video), ("./0002.txt", b"snow falls"), ("./0002.meta.json", b"{}")]
    shard = write_shard(tmp_path / "00000.tar", members)
    records = read_annotations(shard)
    assert [(r.video_id, r.path, r.captions) for r in records] == [
        ("0001", f"{shard}::part0/0001", ["a dog runs"]),
        ("0002", f"{shard}::0002", ["snow falls"]),
    ]
    streamed = list(WebDatasetShards([shard], tiny(), training=False))
    assert [sample.video_id for sample in streamed] == ["0001", "0002"]
    mapped = VideoTextDataset(records, tiny(), training=False)
    assert [mapped[i].video_id for i in range(2)] == ["0001", "0002"]  # "./" members found by key
    assert torch.equal(mapped[0].frames, streamed[0].frames)


def test_streamed_videos_find_their_detections_by_file_name(video, tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [("part0/0001.mp4", video), ("part0/0001.txt", b"a dog runs")])
    detections = tmp_path / "detections.jsonl"
    frames = [{"time": t / 4, "objects": [{"class": "dog", "rect": [8, 8, 40, 40], "conf": 0.9}]} for t in range(8)]
    detections.write_text(json.dumps({"video_id": "0001", "width": 64, "height": 64, "frames": frames}) + "\n")
    config = load_config("tiny", [f"data.val={shard}", f"data.detections={detections}"])
    sample = next(iter(build_dataset(config, "val")))
    assert sample.video_id == "0001" and sample.box_mask.any()


def test_txt_caption_is_preferred_over_metadata_json(video, tmp_path):
    metadata = json.dumps({"url": "http://x/0001.mp4", "duration": 2.0}).encode()
    shard = write_shard(tmp_path / "00000.tar", [("0001.json", metadata), ("0001.mp4", video), ("0001.txt", b"a dog")])
    assert read_annotations(shard)[0].captions == ["a dog"]
    skips = SkipCounter(max_share=0.0, min_seen=1)  # any skip would stop training
    sample = next(iter(WebDatasetShards([shard], tiny(), training=True, skips=skips)))
    assert sample.video_id == "0001" and skips.skipped["bad_caption"] == 0


def test_unreadable_caption_is_an_error_in_evaluation_and_a_skip_in_training(video, tmp_path, caplog):
    metadata = json.dumps({"url": "http://x/0002.mp4"}).encode()
    shard = write_shard(tmp_path / "00000.tar", [("0001.mp4", video), ("0001.txt", b"a dog"),
                                                 ("0002.json", metadata), ("0002.mp4", video)])
    with pytest.raises(AnnotationError, match=r"00000.tar::0002.json: no .txt caption and the JSON has no 'caption'"):
        read_annotations(shard)
    with pytest.raises(BadSample, match=r"00000.tar::0002.json: no .txt caption"):
        list(WebDatasetShards([shard], tiny(), training=False))
    skips = SkipCounter(max_share=1.0, min_seen=1)
    training = WebDatasetShards([shard], tiny(), training=True, resample=False, skips=skips)
    with caplog.at_level("WARNING", logger="stoa_vlp.data.skips"):
        assert [sample.video_id for sample in training] == ["0001"]
    assert skips.skipped["bad_caption"] == 1 and skips.total == 2
    assert "skipped sample (bad_caption): " in caplog.text and "0002.json" in caplog.text


def test_captions_without_a_video_are_left_out_with_a_count(tmp_path, caplog):
    shard = write_shard(tmp_path / "00000.tar", [("0001.mp4", b"video"), ("0001.txt", b"a dog"),
                                                 ("0002.txt", b"no video"), ("0003.json", b'{"caption": "none"}')])
    with caplog.at_level("WARNING", logger="stoa_vlp.data.annotations"):
        assert [r.video_id for r in read_annotations(shard)] == ["0001"]
    assert f"{shard}: 2 captions have no .mp4 member and are left out (e.g. {shard}::0002)" in caplog.text


def test_evaluation_streams_leave_out_keys_the_annotation_reader_leaves_out(video, tmp_path, caplog):
    """A key with a caption and no video, or a video and no caption, stopped validation over shards (and
    the run, before that step's checkpoint), while `evaluate` and the reader leave such keys out."""
    members = [("0001.mp4", video), ("0001.txt", b"a dog runs"), ("0002.txt", b"no video"),
               ("0003.mp4", video), ("0004.mp4", video), ("0004.txt", b"snow falls")]
    shard = write_shard(tmp_path / "00000.tar", members)
    read = [record.video_id for record in read_annotations(shard, strict=True)]
    streamed = [sample.video_id for sample in WebDatasetShards([shard], tiny(), training=False)]
    assert streamed == read == ["0001", "0004"]
    assert "2 shard keys without a video or without a caption are left out" in caplog.text


def test_a_shard_list_naming_a_missing_shard_is_an_error_up_front(tmp_path):
    write_shard(tmp_path / "00000.tar", [("0001.mp4", b"video"), ("0001.txt", b"a dog")])
    (tmp_path / "train.shards").write_text("00000.tar\nmissing.tar\n")
    message = r"train.shards: 1 of 2 shards do not exist \(e.g. .*missing.tar\)"
    with pytest.raises(AnnotationError, match=message):
        read_annotations(tmp_path / "train.shards")
    with pytest.raises(AnnotationError, match=message):
        build_dataset(tiny(f"data.train={tmp_path / 'train.shards'}"), "train")  # before any worker streams


def test_an_unreadable_shard_is_a_one_line_error(tmp_path):
    (tmp_path / "00000.tar").write_text("not a tar file")
    with pytest.raises(AnnotationError, match=r"00000.tar: not a readable tar shard") as raised:
        read_annotations(tmp_path / "00000.tar")
    assert "\n" not in str(raised.value)


def test_fine_tuning_streams_a_share_of_the_shards_per_rank(video, tmp_path):
    from stoa_vlp.tasks.pipeline import TaskRunner, task_config

    for i in range(2):
        write_shard(tmp_path / f"0000{i}.tar", [(f"{i}.mp4", video), (f"{i}.txt", b"a dog runs")])
    config = task_config(tiny(f"data.train={tmp_path}"), "retrieval")
    runner = TaskRunner(config, "cpu")
    streams = [runner.train_data(rank, 2)[0] for rank in range(2)]
    assert [(stream.rank, stream.world_size) for stream in streams] == [(0, 2), (1, 2)]  # was (0, 1) on every rank
