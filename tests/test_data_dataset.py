"""Datasets and collation: items, Batch shapes, reference frames, tags, shards, and bad-sample handling."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch

from stoa_vlp.batch import TAG_NOUN, TAG_VERB, Batch
from stoa_vlp.config import load_config
from stoa_vlp.data.annotations import AnnotationError, VideoRecord, read_annotations
from stoa_vlp.data.dataset import (
    SerializedList,
    VideoTextDataset,
    build_dataset,
    build_loader,
    collate,
    keep_freed_memory,
    stack_frames,
)
from stoa_vlp.data.decode import decode_clip
from stoa_vlp.data.detections import LabelVocab, box_counts_by_class_name, read_detections
from stoa_vlp.data.shards import WebDatasetShards
from stoa_vlp.data.side_data import load_detections
from stoa_vlp.data.skips import BadSample, SkipCounter, TooManyBadSamples
from stoa_vlp.data.synth import DetectionNoise, render_world
from stoa_vlp.data.tags import TagCache
from stoa_vlp.data.transforms import FrameTransform
from stoa_vlp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return render_world(tmp_path_factory.mktemp("world"), train=4, val=0, test=2, seconds=1.0, fps=8, captions_per_clip=3)


def tiny(world, *overrides):
    return load_config("tiny", [f"data.train={world.annotations}", f"data.test={world.annotations}", *overrides])


def test_serialized_list_round_trip():
    items = [VideoRecord("a", "/x/a.mp4", None, 2.5, ["one", "two"]), {"k": [1, 2]}, "text"]
    stored = SerializedList(items)
    assert len(stored) == 3 and [stored[i] for i in range(3)] == items
    assert stored._bytes.dtype == np.uint8 and stored._ends.dtype == np.int64


def test_train_loader_batch_shapes_and_video_index(world):
    config = tiny(world, "data.batch_size=5", "model.text_len=16")
    loader = build_loader(config, "train")
    assert len(loader.dataset) == 4 * 3  # one item per caption
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and len(batch) == 5
    assert batch.frames.shape == (5, 4, 3, 64, 64) and batch.frames.dtype == torch.uint8  # normalised by the model
    assert batch.boxes.shape == (5, 4, 4, 4) and batch.box_labels.shape == (5, 4, 4) and batch.box_mask.shape == (5, 4, 4)
    assert batch.traj_labels.shape == (5, 4) and batch.traj_mask.shape == (5, 4)
    assert batch.tokens.shape == batch.text_mask.shape == batch.pos_tags.shape == (5, 16)
    assert not batch.box_mask.any()  # no detections configured: all padding
    for i in range(5):
        for j in range(5):
            assert (batch.video_ids[i] == batch.video_ids[j]) == (batch.video_index[i] == batch.video_index[j]).item()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader(tiny(world, "data.batch_size=13"), "train")
    videos = VideoTextDataset(read_annotations(world.annotations, split="train"), config, True, items="videos")
    assert len(videos) == 4


@pytest.mark.parametrize("frames", [1, 2])
def test_batches_of_any_mix_of_clips_have_one_frame_layout(frames):
    """A compiled step guards on strides: resized clips, crop-only clips and contiguous ones must collate
    alike (torch.stack made single-frame batches contiguous or channels last depending on the mix)."""
    transform = FrameTransform(32)
    decoded = torch.randint(0, 256, (frames, 48, 64, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # as decoders give
    resized = transform(decoded)
    crop_only = transform(torch.randint(0, 256, (frames, 32, 40, 3), dtype=torch.uint8).permute(0, 3, 1, 2))
    contiguous = resized.contiguous()
    layouts = set()
    for clips in ([resized, resized], [crop_only, crop_only], [resized, crop_only], [contiguous, crop_only]):
        batch = stack_frames(clips)
        assert torch.equal(batch, torch.stack(clips))
        layouts.add(batch.stride())
    assert layouts == {(frames * 32 * 32 * 3, 32 * 32 * 3, 1, 32 * 3, 3)}  # channels last, as decoded
    with pytest.raises(ValueError, match=r"clips of one batch differ: torch.uint8 \(3, 3, 32, 32\)"):
        stack_frames([resized, torch.zeros(3, 3, 32, 32, dtype=torch.uint8)])  # as torch.stack refused it


def test_a_pinning_data_loader_pins_every_tensor_of_a_batch(world, monkeypatch):
    """DataLoader(pin_memory=True) pins what it knows (tensors, mappings, sequences) and objects with a
    pin_memory method; a Batch had none and went to the GPU unpinned. Page-locked memory needs a GPU,
    so pinning is counted here, not done."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = next(iter(build_loader(tiny(world, "data.batch_size=2"), "train")))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args: pinned.append(tensor) or tensor.clone())
    result = pin_memory(batch)
    tensors = [value for value in vars(batch).values() if isinstance(value, torch.Tensor)]
    assert isinstance(result, Batch) and len(pinned) == len(tensors) == 10
    assert all(any(tensor is seen for seen in pinned) for tensor in tensors)
    assert result.video_ids == batch.video_ids and torch.equal(result.frames, batch.frames)


def test_evaluation_on_several_ranks_reads_each_item_once(world):
    config = tiny(world)
    size = len(build_loader(config, "test").dataset)
    for world_size in (2, 3, 4, 5):  # DistributedSampler padded those that do not divide the size with repeats
        shares = [list(build_loader(config, "test", rank, world_size).sampler) for rank in range(world_size)]
        assert sorted(index for share in shares for index in share) == list(range(size)), world_size


def test_eval_sample_matches_reference_pipeline(world):
    config = tiny(world)
    dataset = build_loader(config, "test").dataset
    records = read_annotations(world.annotations, split="test")
    assert len(dataset) == sum(len(r.captions) for r in records)
    sample = dataset[1]  # second caption of the first test video
    clip = decode_clip(records[0].path, 4, "uniform")
    assert torch.equal(sample.frames, FrameTransform(64)(clip.frames))
    tokens, mask = Tokenizer(24)(records[0].captions[1])
    assert torch.equal(sample.tokens, tokens[0]) and torch.equal(sample.text_mask, mask[0])
    assert sample.video_index == 0 and sample.video_id == records[0].video_id
    assert torch.equal(dataset[1].frames, sample.frames)  # evaluation is deterministic


def test_tags_come_from_the_cache(world, tmp_path):
    records = read_annotations(world.annotations, split="train")[:1]
    caption = records[0].captions[0]
    pieces = len(Tokenizer(24).encode_words(caption))
    cache = TagCache(tmp_path / "tags.json", length=24)
    piece_tags = np.zeros(pieces, dtype=np.int64)
    piece_tags[0], piece_tags[-1] = TAG_NOUN, TAG_VERB
    cache.update({caption: piece_tags})
    dataset = VideoTextDataset(records, tiny(world), False, tag_cache=cache)
    tags = dataset[0].pos_tags
    assert tags[1] == TAG_NOUN and tags[pieces] == TAG_VERB and tags[0] == 0 and tags[pieces + 1 :].sum() == 0
    assert dataset[1].pos_tags.sum() == 0  # a caption missing from the cache has no tags
    with pytest.raises(FileNotFoundError, match="tag cache .*typo.json does not exist"):
        build_dataset(tiny(world, f"data.tags={tmp_path / 'typo.json'}"), "train")
    with pytest.raises(AnnotationError, match="nope.json: annotation file does not exist"):
        build_dataset(tiny(world, f"data.train={tmp_path / 'nope.json'}"), "train")  # not "cannot tell the format"


def bad_records(world, tmp_path):
    good = read_annotations(world.annotations, split="train")
    text = tmp_path / "text.mp4"
    text.write_text("not a video")
    truncated = tmp_path / "truncated.mp4"
    data = open(good[0].path, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    return good + [
        VideoRecord("gone", str(tmp_path / "gone.mp4"), None, None, ["a missing video"]),
        VideoRecord("text", str(text), None, None, ["a text file named .mp4"]),
        VideoRecord("cut", str(truncated), None, None, ["a truncated video"]),
        VideoRecord("silent", good[1].path, None, None, [""]),
    ]


def test_training_skips_bad_samples_and_counts_them(world, tmp_path, caplog):
    records = bad_records(world, tmp_path)
    skips = SkipCounter(max_share=1.0, min_seen=1)
    dataset = VideoTextDataset(records, tiny(world), True, skips=skips)
    with caplog.at_level(logging.WARNING):
        samples = [dataset[len(dataset) - 4 + k] for k in range(4)]  # the four bad items
    assert all(sample.video_id not in ("gone", "text", "cut", "silent") for sample in samples)
    assert skips.skipped["missing_file"] >= 1 and skips.skipped["bad_video"] >= 2 and skips.skipped["empty_caption"] >= 1
    assert "gone.mp4: file does not exist" in caplog.text and "text.mp4: not a readable video" in caplog.text
    assert skips.summary().startswith(f"skipped {sum(skips.skipped.values())} of {skips.total} samples loaded")
    strict = VideoTextDataset(records, tiny(world), True, skips=SkipCounter(max_share=0.1, min_seen=1))
    with pytest.raises(TooManyBadSamples, match="data.max_bad_samples"):
        strict[len(strict) - 4]


def test_a_split_of_only_bad_samples_stops_even_when_every_share_is_tolerated(world, tmp_path):
    # with data.max_bad_samples=1 the share never stops it: before, it drew bad samples forever
    only_bad = bad_records(world, tmp_path)[-3:]  # missing, not a video, truncated
    dataset = VideoTextDataset(only_bad, tiny(world), True, skips=SkipCounter(max_share=1.0, min_seen=1))
    with pytest.raises(TooManyBadSamples, match="100 samples drawn in a row could not be read .skipped 100 of 100"):
        dataset[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as archive:
        add_member(archive, "junk.mp4", b"not a video at all")
        add_member(archive, "junk.txt", b"a caption")
    stream = WebDatasetShards([str(bad)], tiny(world), training=True, skips=SkipCounter(max_share=1.0, min_seen=1))
    with pytest.raises(TooManyBadSamples, match="100 samples drawn in a row could not be read"):
        next(iter(stream))  # the shard is resampled


def test_evaluation_errors_name_the_file(world, tmp_path):
    records = bad_records(world, tmp_path)
    dataset = VideoTextDataset(records, tiny(world), False)
    with pytest.raises(BadSample, match="gone.mp4: file does not exist"):
        dataset[len(dataset) - 4]
    with pytest.raises(BadSample, match="truncated.mp4"):
        dataset[len(dataset) - 2]
    with pytest.raises(BadSample, match="empty caption"):
        dataset[len(dataset) - 1]


@pytest.mark.parametrize("start_method", [None, "spawn"])  # None: the platform's default (fork on Linux)
def test_worker_skips_are_visible_in_the_main_process(world, tmp_path, start_method):
    records = bad_records(world, tmp_path)
    skips = SkipCounter(max_share=1.0, min_seen=1)
    dataset = VideoTextDataset(records, tiny(world), True, skips=skips)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate,
                                         multiprocessing_context=start_method)
    seen = sum(len(batch) for batch in loader)
    assert seen == len(dataset)
    assert skips.total >= len(dataset) and sum(skips.skipped.values()) >= 4


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    records = read_annotations(world.annotations, split="train") + read_annotations(world.annotations, split="test")
    paths = []
    for index in range(3):
        path = folder / f"{index:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for record in records[2 * index : 2 * index + 2]:
                add_member(archive, f"{record.video_id}.mp4", open(record.path, "rb").read())
                add_member(archive, f"{record.video_id}.json", json.dumps({"caption": record.captions[0]}).encode())
        paths.append(str(path))
    return paths


def test_shards_split_over_ranks_without_overlap(world, shards):
    config = tiny(world)
    seen = []
    for rank in range(2):
        dataset = WebDatasetShards(shards, config, training=False, rank=rank, world_size=2)
        seen.append([sample.video_id for sample in dataset])
    assert sorted(seen[0] + seen[1]) == sorted(f"video{i}" for i in range(6))
    assert not set(seen[0]) & set(seen[1])
    loader = build_loader(load_config("tiny", [f"data.test={shards[0]}", "data.batch_size=2"]), "test")
    batch = next(iter(loader))
    assert batch.video_ids == ["video0", "video1"] and batch.frames.shape == (2, 4, 3, 64, 64)


def test_shards_resample_in_training_and_skip_bad_members(world, shards, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as archive:
        add_member(archive, "junk.mp4", b"not a video at all")
        add_member(archive, "junk.txt", b"a caption")
    skips = SkipCounter(max_share=1.0, min_seen=1)
    dataset = WebDatasetShards(shards + [str(bad)], tiny(world), training=True, shuffle_buffer=4, skips=skips)
    stream = iter(dataset)
    drawn = [next(stream).video_id for _ in range(20)]  # more than the 6 videos: shards are resampled
    assert set(drawn) <= {f"video{i}" for i in range(6)} and len(set(drawn)) >= 4
    assert skips.skipped["bad_video"] >= 1
    evaluation = WebDatasetShards([str(bad)], tiny(world), training=False)
    with pytest.raises(BadSample, match="bad.tar::junk: not a readable video"):
        list(evaluation)


def test_stream_order_follows_the_data_position(world, shards):
    def drawn(resample: bool, epoch: int, start_batch: int, count: int = 12) -> list[str]:
        dataset = WebDatasetShards(shards, tiny(world), training=True, resample=resample, shuffle_buffer=4)
        dataset.set_position(epoch, start_batch)
        return [sample.video_id for _, sample in zip(range(count), dataset)]

    assert drawn(True, 0, 0) == drawn(True, 0, 0)  # a position gives one stream
    assert drawn(True, 0, 5) != drawn(True, 0, 0)  # a resumed run does not replay the start
    epochs = [drawn(False, epoch, 0) for epoch in range(3)]  # without resampling: all 6 videos per epoch
    assert all(sorted(order) == [f"video{i}" for i in range(6)] for order in epochs)
    assert len({tuple(order) for order in epochs}) > 1  # shuffled anew each epoch


def test_objects_follow_the_decoded_frame_times(tmp_path):
    # noise-free detections of a 64x64 world: the crop is the identity, so each sampled frame's
    # boxes are the detections at exactly that frame's time
    exact = render_world(tmp_path / "exact", train=2, val=0, test=2, seconds=1.0, fps=8, captions_per_clip=1,
                         noise=DetectionNoise.none())
    config = load_config("tiny", [f"data.test={exact.annotations}", f"data.detections={exact.detections}",
                                  "model.frames=3"])
    dataset = build_loader(config, "test").dataset
    sample = dataset[0]
    lines = {json.loads(line)["video_id"]: json.loads(line) for line in open(exact.detections)}
    clip = decode_clip(read_annotations(exact.annotations, split="test")[0].path, 3)
    assert sample.box_mask.any() and sample.traj_mask.any()
    for t, time in enumerate(clip.times):
        (frame,) = [f for f in lines[sample.video_id]["frames"] if abs(f["time"] - time) < 1e-3]
        expected = sorted(tuple(np.clip(o["rect"], 0, 64)) for o in frame["objects"])
        got = sorted(tuple(box) for box in sample.boxes[t][sample.box_mask[t]].tolist())
        np.testing.assert_allclose(got, expected, atol=1e-4)
        names = sorted(dataset.label_vocab.name(int(i)) for i in sample.box_labels[t][sample.box_mask[t]])
        assert names == sorted(o["class"] for o in frame["objects"])


def test_detection_lines_for_unknown_videos_are_reported(world, tmp_path, caplog):
    detections = tmp_path / "detections.jsonl"
    lines = open(world.detections).read().splitlines()
    extra = {"video_id": "video999", "width": 64, "height": 64, "frames": []}
    detections.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    with caplog.at_level(logging.INFO):
        loader = build_loader(tiny(world, f"data.detections={detections}", "data.batch_size=4"), "train")
    assert f"{detections}: 3 detection lines are for videos not in the train split of" in caplog.text  # video4, video5 (test), video999
    assert "video999" in caplog.text or "video4" in caplog.text
    assert next(iter(loader)).box_mask.any()
    detections.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="detections.jsonl:2"):
        build_loader(tiny(world, f"data.detections={detections}"), "train")


def test_detection_times_far_from_the_sampled_frames_are_warned_about_once_per_video(world, tmp_path, caplog):
    videos = [json.loads(line) for line in open(world.detections)]
    for video in videos:  # the 1 s videos' detections 30 s late (e.g. times counted from another start)
        for frame in video["frames"]:
            frame["time"] += 30
    detections = tmp_path / "detections.jsonl"
    detections.write_text("".join(json.dumps(video) + "\n" for video in videos))
    dataset = build_dataset(tiny(world, f"data.detections={detections}"), "train")
    first, second = (dataset.records[record].video_id for record in (0, 1))
    with caplog.at_level(logging.WARNING):
        for item in (0, 1, 3):  # the first video's two first captions, the second video's first
            dataset[item]
    warnings = [record.getMessage() for record in caplog.records if "detections of video" in record.getMessage()]
    assert len(warnings) == 2 and warnings[0].startswith(f"detections of video {first}: the frame sampled at")
    assert warnings[1].startswith(f"detections of video {second}:") and "are the times frame indices" in warnings[1]


def test_empty_frames_and_untagged_captions_are_counted(world, tmp_path, caplog):
    videos = [json.loads(line) for line in open(world.detections)]
    videos[0]["frames"][0]["objects"] = []  # video0 is a training video
    detections = tmp_path / "detections.jsonl"
    detections.write_text("".join(json.dumps(video) + "\n" for video in videos))
    records = read_annotations(world.annotations, split="train")
    captions = {caption for record in records for caption in record.captions}
    cache = TagCache(tmp_path / "tags.json", length=24)
    cache.update({records[0].captions[0]: np.zeros(2, dtype=np.int64)})
    cache.save()
    empty_before = sum(not f["objects"] for v in videos if v["video_id"] in {r.video_id for r in records} for f in v["frames"])
    frames = sum(len(v["frames"]) for v in videos if v["video_id"] in {r.video_id for r in records})
    with caplog.at_level(logging.INFO):
        build_dataset(tiny(world, f"data.detections={detections}", f"data.tags={tmp_path / 'tags.json'}"), "train")
    assert f"{detections}: {empty_before} of {frames} detected frames of the train split" in caplog.text
    assert f"{len(captions) - 1} of {len(captions)} captions of the train split" in caplog.text


def test_training_frames_are_random_per_draw_and_reproducible_per_seed(world):
    dataset = VideoTextDataset(read_annotations(world.annotations, split="train"), tiny(world), True)
    draws = []
    for seed in (3, 3, 4, 5, 6):
        torch.manual_seed(seed)
        draws.append(dataset[0].frames)
    assert torch.equal(draws[0], draws[1])
    assert any(not torch.equal(draws[0], other) for other in draws[2:])


def test_keep_freed_memory_stops_page_faults_per_clip(world):
    import resource

    path = read_annotations(world.annotations, split="train")[0].path
    assert keep_freed_memory()
    for _ in range(2):
        FrameTransform(224)(decode_clip(path, 12).frames)  # warm up the heap
    faults_per_clip = []
    for _ in range(3):  # the quietest of 3 rounds: other threads of the process (loggers, pools) fault too
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            FrameTransform(224)(decode_clip(path, 12).frames)  # a few MB allocated and freed per clip
        faults_per_clip.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    assert min(faults_per_clip) < 100  # 4 KB pages; without the setting about 1,600-2,000


def test_fine_tuning_reads_the_detections_file_once(world, monkeypatch):
    """The task runner holds the detections it read at set-up; its training dataset takes those
    instead of reading the file again (seconds per thousand videos, and a second copy meanwhile)."""
    from stoa_vlp.data import side_data
    from stoa_vlp.tasks.pipeline import TaskRunner

    reads = []
    read = side_data.read_packed_detections
    monkeypatch.setattr(side_data, "read_packed_detections", lambda path: reads.append(path) or read(path))
    config = tiny(world, f"data.detections={world.detections}", "task.name=retrieval")
    runner = TaskRunner(config, "cpu")
    train_set, _ = runner.train_data()
    assert reads == [str(world.detections)]
    assert train_set.label_vocab is runner.label_vocab
    assert train_set[0].box_mask.any()


def test_a_batch_records_every_tensor_on_a_stream(monkeypatch):
    """On CUDA the Trainer copies a Batch on a stream of its own and records its tensors on the step's
    stream, so that the caching allocator does not hand their memory to the next copy while the step
    still reads them; a tensor left out (a subclass's field) could be overwritten. CUDA streams need a
    GPU, so recording is counted here, not done."""
    from _objectives_batch import make_batch, tiny_config

    from stoa_vlp.tasks.data import LabelledBatch

    plain = make_batch(tiny_config())
    batch = LabelledBatch(**plain.tensors(), video_ids=plain.video_ids, labels=torch.tensor([1, 0, 2, -1]))
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: recorded.append((tensor, stream)))
    batch.record_stream("step stream")
    tensors = [value for value in vars(batch).values() if isinstance(value, torch.Tensor)]
    assert len(recorded) == len(tensors) == 11
    assert all(any(tensor is seen and stream == "step stream" for seen, stream in recorded) for tensor in tensors)


def test_detected_classes_missing_from_the_label_vocabulary_are_reported(world, tmp_path, caplog):
    # before, a vocabulary of another detector's classes turned every box into <unknown> without a word
    counts = box_counts_by_class_name(read_detections(world.detections))
    *others, rarest = sorted(counts, key=lambda name: (-counts[name], name))  # as LabelVocab orders them
    vocab_file = tmp_path / "label_vocab.json"
    detections = f"data.detections={world.detections}"

    LabelVocab(["bottle", "handbag"]).save(vocab_file)
    with caplog.at_level(logging.INFO, logger="stoa_vlp.data.side_data"):
        load_detections(tiny(world, detections, f"data.label_vocab={vocab_file}"))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert f"none of its {len(counts)} classes" in caplog.text and "every box becomes <unknown>" in caplog.text

    caplog.clear()
    LabelVocab(others).save(vocab_file)
    with caplog.at_level(logging.INFO, logger="stoa_vlp.data.side_data"):
        load_detections(tiny(world, detections, f"data.label_vocab={vocab_file}"))
    share = 100 * counts[rarest] / sum(counts.values())
    assert [r.levelname for r in caplog.records] == ["WARNING" if share >= 10 else "INFO"]
    assert f"1 of its {len(counts)} classes ({share:.1f}% of the boxes; e.g. {rarest}) are not in" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stoa_vlp.data.side_data"):
        load_detections(tiny(world, detections, f"model.num_object_classes={len(counts) + 1}"))
    assert f"e.g. {rarest}) are not in the {len(counts) - 1} most frequent classes" in caplog.text


@pytest.mark.parametrize("detected_size, sideways", [((96, 64), False), ((64, 96), True), ((32, 34), False)])
def test_detections_of_frames_turned_sideways_are_a_bad_sample(tmp_path, detected_size, sideways):
    # a detector that ignored a phone video's display rotation boxed 32x48 frames shown as 48x32: rescaled
    # per axis, its boxes land on other pixels. Another size of the same orientation is only rescaled
    from stoa_vlp.data.detections import FrameDetections, VideoDetections
    from stoa_vlp.data.synth import write_video

    path = tmp_path / "clip.mp4"
    write_video(path, np.zeros((4, 32, 48, 3), np.uint8), fps=4)  # 48 wide, 32 high
    width, height = detected_size
    rect = np.array([[0, 0, width / 2, height / 2]], np.float32)
    frame = FrameDetections(0.0, ["dog"], rect, np.array([0.9], np.float32))
    detections = {"clip": VideoDetections("clip", width, height, [frame])}
    config = load_config("tiny", ["model.image_size=32"])
    record = VideoRecord("clip", str(path), None, None, ["a dog"])
    dataset = VideoTextDataset([record], config, False, detections, LabelVocab.from_detections(detections.values()))
    if not sideways:
        assert dataset[0].box_mask.any()
        return
    with pytest.raises(BadSample, match=rf"{path}: its detections were made on 64x96 frames, but its frames are "
                                        r"48x32 shown upright: the boxes are of the frames turned sideways") as error:
        dataset[0]
    assert error.value.reason == "bad_detections"


def test_training_leaves_out_videos_that_are_not_there_and_evaluation_refuses_them(world, tmp_path, caplog):
    # before, they stayed in the split and were drawn and skipped against data.max_bad_samples: a web video
    # list naming 5-10% of videos no longer online stopped training part-way with the default 1%
    present = read_annotations(world.annotations, split="train")
    lines = [{"video_id": record.video_id, "caption": record.captions[0], "video": record.path} for record in present]
    lines += [{"video_id": "gone", "caption": "a video no longer online", "video": str(tmp_path / "gone.mp4")}] * 2
    annotations = tmp_path / "clips.jsonl"
    annotations.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = tiny(world, f"data.train={annotations}", f"data.test={annotations}")
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(config, "train")
    assert [record.video_id for record in dataset.records] == [record.video_id for record in present]
    assert f"{annotations}: 1 of {len(present) + 1} videos not found (e.g. gone): training leaves out their 1 records" in caplog.text
    with pytest.raises(BadSample, match="gone.mp4: file does not exist"):
        build_dataset(config, "test")[len(present)]
    annotations.write_text(json.dumps(lines[-1]) + "\n")
    with pytest.raises(AnnotationError, match=f"{annotations}: none of its 1 videos found \\(e.g. gone\\)"):
        build_dataset(config, "train")
