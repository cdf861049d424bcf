"""Datasets of (clip, caption) samples and their collation into a `stoa_vlp.batch.Batch`.

`SampleBuilder` turns a video and a caption into a `Sample` (decoded frames, object targets, tokens,
tags). `VideoTextDataset` (map-style, for annotation files) has one item per caption, in training and
in evaluation alike (CLIP4Clip's "unfold sentences"): an epoch sees every caption once, and two
captions of one video in a batch share `video_index`, so VTC treats both as positives. With
items="videos" it has one item per video instead (a random caption in training, the first in
evaluation), for encoding each video once. `build_dataset` gives a split's dataset: this one, or
for video2dataset shards the stream of stoa_vlp.data.shards, with the detections, label vocabulary
and tags of stoa_vlp.data.side_data; `build_loader` its DataLoader.

Records, detections and caption tags live in numpy arrays (stoa_vlp.data.serialized: one byte
buffer with offsets, as detectron2 serialises its dataset lists), built once in the main
process, so DataLoader workers share the pages instead of each touching (and so copying) Python
objects through reference counts; each sample rebuilds the objects it reads. Detections packed by
`stoa-vlp pack` (a DetectionsStore) are mapped from their files instead, one copy in the page cache
for all processes of a machine.

Bad samples: in evaluation every problem is an error naming the file. Training leaves out the videos
that are not there when its split is read (`leave_out_missing_videos`); a sample whose video is
unreadable or gone since, whose caption is empty or unreadable, or whose detections were made on its
frames turned sideways, is skipped (another sample is drawn), logged and counted in a `SkipCounter`
shared with the workers (stoa_vlp.data.skips); training stops with `TooManyBadSamples` once the
skipped share exceeds data.max_bad_samples, or after MAX_BAD_IN_A_ROW bad draws in a row.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from stoa_vlp.batch import TAG_NONE, Batch
from stoa_vlp.config import Config
from stoa_vlp.data.annotations import (
    VideoRecord,
    detect_format,
    existing_annotations,
    leave_out_missing_videos,
    read_annotations,
    shard_list,
    split_member_name,
    unreadable_shard,
)
from stoa_vlp.data.decode import DecodedClip, VideoError, check_decoder, decode_clip
from stoa_vlp.data.detections import packed
from stoa_vlp.data.detections_store import DetectionsStore
from stoa_vlp.data.geometry import resize_crop
from stoa_vlp.data.object_targets import empty_targets, misaligned_times, select_objects, turned_sideways
from stoa_vlp.data.serialized import SerializedDict, SerializedList
from stoa_vlp.data.side_data import SideData, report_side_data, load_side_data
from stoa_vlp.data.skips import MAX_BAD_IN_A_ROW, WARNINGS_PER_REASON, BadSample, SkipCounter, too_many_in_a_row
from stoa_vlp.data.tags import PackedTags, TagCache
from stoa_vlp.data.transforms import FrameTransform
from stoa_vlp.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Sample:
    frames: torch.Tensor  # (T, 3, S, S) uint8 RGB (the model normalises them)
    boxes: np.ndarray  # (T, K, 4) float32, input-frame pixels
    box_labels: np.ndarray  # (T, K) int64
    box_mask: np.ndarray  # (T, K) bool
    traj_labels: np.ndarray  # (N,) int64
    traj_mask: np.ndarray  # (N,) bool
    tokens: torch.Tensor  # (L,) int64
    text_mask: torch.Tensor  # (L,) bool
    pos_tags: np.ndarray  # (L,) int64
    video_index: int
    video_id: str


def stack_frames(clips: list[torch.Tensor]) -> torch.Tensor:
    """(T, 3, S, S) uint8 clips -> (B, T, 3, S, S) in one memory layout whatever the clips' own: channels
    last, as decoders give frames. A compiled step guards on its input's strides, and `torch.stack`
    made a contiguous batch of some mixes of resized and crop-only single-frame clips and a
    channels-last one of others, so the step compiled again when the mix changed."""
    frames, channels, height, width = clips[0].shape
    for clip in clips:
        if clip.shape != clips[0].shape or clip.dtype != clips[0].dtype:
            raise ValueError(f"clips of one batch differ: {clip.dtype} {tuple(clip.shape)} and "
                             f"{clips[0].dtype} {tuple(clips[0].shape)}")
    batch = torch.empty(len(clips), frames, height, width, channels, dtype=clips[0].dtype).permute(0, 1, 4, 2, 3)
    for row, clip in enumerate(clips):
        batch[row].copy_(clip)
    return batch


def collate(samples: list[Sample]) -> Batch:
    """Stack samples into a Batch (shapes in stoa_vlp.batch)."""

    def stack(name: str) -> torch.Tensor:
        return torch.stack([torch.as_tensor(getattr(sample, name)) for sample in samples])

    return Batch(
        frames=stack_frames([sample.frames for sample in samples]),
        boxes=stack("boxes"),
        box_labels=stack("box_labels"),
        box_mask=stack("box_mask"),
        traj_labels=stack("traj_labels"),
        traj_mask=stack("traj_mask"),
        tokens=stack("tokens"),
        text_mask=stack("text_mask"),
        pos_tags=stack("pos_tags"),
        video_index=torch.tensor([sample.video_index for sample in samples], dtype=torch.long),
        video_ids=[sample.video_id for sample in samples],
    )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_memory_kept = False


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc keep freed blocks (up to 32 MB each) instead of returning
    them to the system; returns whether it applied (False off glibc).

    Each clip allocates a few MB of frames (decoder output, RGB, transform); returned to the
    system after every sample, they are page-faulted in again for the next one, which costs as
    much as decoding (bench/RESULTS.md). Data-loading processes call this once, on first use.
    """
    global _memory_kept
    if not _memory_kept:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None:
            log.debug("no glibc mallopt: freed memory is returned to the system as usual")
            return False
        _memory_kept = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
    return _memory_kept


class SampleBuilder:
    """Turns (video source, caption) into a Sample: decode, transform, objects, tokens, tags.

    `detections` (VideoDetections or PackedVideoDetections by video id) and `tag_cache` (a TagCache)
    are kept packed (a SerializedDict of PackedVideoDetections, PackedTags); already packed ones and a
    memory-mapped DetectionsStore are used as they are.
    """

    def __init__(self, config: Config, training: bool, detections=None, label_vocab=None, tag_cache=None):
        check_decoder(config.data.decoder)
        if config.data.frame_rate <= 0:
            raise ValueError(f"data.frame_rate must be positive, got {config.data.frame_rate}")
        self.config = config
        if not config.model.objects:
            detections = None
        elif detections is not None and not isinstance(detections, (SerializedDict, DetectionsStore)):
            detections = SerializedDict({video_id: packed(video) for video_id, video in detections.items()})
        self.detections = detections
        self.label_vocab = label_vocab
        self.tag_cache = PackedTags(tag_cache) if isinstance(tag_cache, TagCache) else tag_cache
        self.sampling = config.data.train_sampling if training else config.data.eval_sampling
        self.transform = FrameTransform(config.model.image_size)
        self.tokenizer = Tokenizer(config.model.text_len)
        self.untagged = 0
        self._misaligned_logged: set[str] = set()  # the first WARNINGS_PER_REASON videos whose detection times
        # cannot be their samples' (`_check_detection_times`)
        if self.detections is not None and label_vocab is None:
            raise ValueError("detections need a label vocabulary (data.label_vocab or LabelVocab.from_detections)")

    def build(self, source, name: str, video_id: str, caption: str, start, end, video_index: int,
              rng: np.random.Generator) -> Sample:
        model = self.config.model
        if self.config.data.keep_freed_memory:
            keep_freed_memory()
        if not caption or not caption.strip():
            raise BadSample("empty_caption", f"{name}: empty caption")
        try:
            clip = decode_clip(
                source, model.frames, self.sampling, start, end, rng, self.config.data.decoder, name=name,
                frame_rate=self.config.data.frame_rate,
            )
        except VideoError as error:
            reason = "missing_file" if error.problem == "file does not exist" else "bad_video"
            raise BadSample(reason, str(error)) from None
        tokens, text_mask = self.tokenizer(caption)
        return Sample(
            frames=self.transform(clip.frames),
            **self._objects(name, video_id, clip),
            tokens=tokens[0],
            text_mask=text_mask[0],
            pos_tags=self._tags(caption),
            video_index=video_index,
            video_id=video_id,
        )

    def _objects(self, name: str, video_id: str, clip: DecodedClip) -> dict[str, np.ndarray]:
        model = self.config.model
        if self.detections is None:
            targets = empty_targets(model.frames, model.boxes_per_frame, model.trajectories)
        else:
            detections = self.detections.get(video_id)  # None (no detections for this video) -> padding
            sideways = None if detections is None else turned_sideways(
                detections.width, detections.height, clip.width, clip.height)
            if sideways is not None:
                raise BadSample("bad_detections", f"{name}: {sideways}")
            self._check_detection_times(video_id, detections, clip.times)
            targets = select_objects(
                detections,
                clip.times.tolist(),
                resize_crop(clip.width, clip.height, model.image_size),
                self.label_vocab,
                model.boxes_per_frame,
                model.trajectories,
            )
        return {
            "boxes": targets.boxes,
            "box_labels": targets.labels,
            "box_mask": targets.mask,
            "traj_labels": targets.traj_labels,
            "traj_mask": targets.traj_mask,
        }

    def _check_detection_times(self, video_id: str, detections, times: np.ndarray) -> None:
        """Warn, once per video, for the first WARNINGS_PER_REASON videos of this process whose detected
        frames cannot be of a sample's times (`misaligned_times`: its boxes show other moments of the
        video); the reader cannot tell, not knowing durations. A warning, not a skip: the clip is fine."""
        problem = None if detections is None else misaligned_times(detections.times, times)
        if problem is None or video_id in self._misaligned_logged or len(self._misaligned_logged) == WARNINGS_PER_REASON:
            return
        self._misaligned_logged.add(video_id)
        last = len(self._misaligned_logged) == WARNINGS_PER_REASON
        later = " (later videos of this process are not logged)" if last else ""
        log.warning("detections of video %s: %s%s", video_id, problem, later)

    def _tags(self, caption: str) -> np.ndarray:
        length = self.config.model.text_len
        tags = self.tag_cache.get(caption) if self.tag_cache is not None else None
        if tags is None:
            if self.tag_cache is not None:
                self.untagged += 1
                if self.untagged == 1:
                    log.warning("caption not in the tag cache, no noun/verb tags for it (and later ones): %r", caption)
            return np.full(length, TAG_NONE, dtype=np.int64)
        tags = np.asarray(tags, dtype=np.int64)[:length]
        return np.pad(tags, (0, length - len(tags)), constant_values=TAG_NONE)


def _sample_rng() -> np.random.Generator:
    """A generator drawn from torch's RNG: reproducible under a per-sample seed (the trainer's
    SeededDataset), different per worker, epoch and draw otherwise."""
    return np.random.default_rng(int(torch.randint(2**62, ()).item()))


def _video_source(path: str):
    """A path, or the bytes of the <key>.mp4 member of a shard for "<shard>::<key>" paths."""
    if "::" not in path:
        return path
    shard, key = path.split("::", 1)
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.isfile() and split_member_name(member.name) == (key, "mp4"):
                    return archive.extractfile(member).read()
    except (OSError, tarfile.TarError) as error:
        raise BadSample("missing_file", f"{key}.mp4: {unreadable_shard(shard, error)}") from None
    raise BadSample("missing_file", f"{path}: shard has no {key}.mp4")


class VideoTextDataset(Dataset):
    """Map-style dataset over VideoRecords; see the module docstring for items and skips."""

    def __init__(
        self,
        records: list[VideoRecord],
        config: Config,
        training: bool,
        detections=None,
        label_vocab=None,
        tag_cache=None,
        items: str = "captions",
        skips: SkipCounter | None = None,
    ):
        if items not in ("captions", "videos"):
            raise ValueError(f"items must be 'captions' or 'videos', got {items!r}")
        self.records = SerializedList(records)
        pairs = [
            (record_index, caption_index)
            for record_index, record in enumerate(records)
            for caption_index in (range(len(record.captions)) if items == "captions" else [-1])
        ]
        self.items = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)  # (record, caption or -1)
        self.training = training
        if isinstance(detections, dict):  # keep only this dataset's videos of a file for all splits
            wanted = {record.video_id for record in records}
            detections = {video_id: video for video_id, video in detections.items() if video_id in wanted}
        self.builder = SampleBuilder(config, training, detections, label_vocab, tag_cache)
        self.label_vocab = label_vocab
        self.skips = skips if skips is not None else SkipCounter(config.data.max_bad_samples)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng: np.random.Generator) -> Sample:
        record_index, caption_index = (int(v) for v in self.items[index])
        record: VideoRecord = self.records[record_index]
        if caption_index < 0:
            caption_index = int(rng.integers(len(record.captions))) if self.training else 0
        return self.builder.build(
            _video_source(record.path), record.path, record.video_id, record.captions[caption_index],
            record.start, record.end, record_index, rng,
        )

    def __getitem__(self, index: int) -> Sample:
        rng = _sample_rng()
        if not self.training:
            return self.load(index, rng)  # BadSample (a ValueError) names the file
        for _ in range(MAX_BAD_IN_A_ROW):
            sample = self.skips.attempt(functools.partial(self.load, index, rng))
            if sample is not None:
                return sample
            index = int(rng.integers(len(self)))
        raise too_many_in_a_row(self.skips)


def is_webdataset(config: Config, path: str | Path) -> bool:
    """Whether the split file `path` is read as WebDataset shards (data.format, or detected)."""
    return config.data.format == "webdataset" or (config.data.format == "auto" and detect_format(path) == "webdataset")


def split_file(config: Config, split: str) -> str:
    """The annotation file (or shards) of `split` ("train", "val" or "test"), checked to exist."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    path = getattr(config.data, split)
    if not path:
        raise ValueError(f"data.{split} is not set: give the annotation file of the {split} split")
    existing_annotations(path)
    return path


def build_dataset(config: Config, split: str, rank: int = 0, world_size: int = 1,
                  side_data: SideData | None = None, records: list[VideoRecord] | None = None):
    """The dataset of a split ("train", "val" or "test") as the config names it. `side_data`: what
    `load_side_data(config)` returned, for a caller that holds it already (read otherwise), so that
    several splits share one copy; `records`: the split's annotation file as `read_annotations` read it,
    likewise (`train.evaluation.check_split_videos`' records)."""
    path = split_file(config, split)
    training = split == "train"
    side_data = side_data if side_data is not None else load_side_data(config)
    if is_webdataset(config, path):
        from stoa_vlp.data.shards import WebDatasetShards  # imported here: its samples are built by SampleBuilder

        return WebDatasetShards(shard_list(Path(path)), config, training, *side_data, rank=rank, world_size=world_size)
    if records is None:
        records = read_annotations(path, config.data.format, split, config.data.video_root or None, strict=not training)
    if not records:
        raise ValueError(f"{path}: no usable (video, caption) records for split {split}")
    if training:
        records = leave_out_missing_videos(records, path)
    report_side_data(config, side_data, records, f"the {split} split of {path}")
    return VideoTextDataset(records, config, training, *side_data)


def build_loader(config: Config, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
    """DataLoader of Batches for a split; training shuffles.

    On several ranks, training uses a DistributedSampler (call `loader.sampler.set_epoch(epoch)` before
    each epoch, or every epoch repeats the first order), and evaluation gives rank r the items r, r +
    world_size, ... with no padding, so that no item is read twice. The Trainer does not use this
    loader: its resumable sampler also makes N ranks' global batch the one of a single rank.
    The dataset (with `.skips` and `.label_vocab`) is `loader.dataset`.
    """
    dataset = build_dataset(config, split, rank, world_size)
    training = split == "train"
    workers = config.data.num_workers
    common = dict(
        batch_size=config.data.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=training,
    )
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **common)
    if training and len(dataset) < config.data.batch_size * world_size:
        raise ValueError(f"data.train has {len(dataset)} items, fewer than one global batch "
                         f"(data.batch_size={config.data.batch_size} x {world_size} ranks)")
    if world_size > 1 and training:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=config.train.seed, drop_last=True)
        return DataLoader(dataset, sampler=sampler, **common)
    if world_size > 1:  # not DistributedSampler, which pads the last round with repeated items
        return DataLoader(dataset, sampler=range(rank, len(dataset), world_size), **common)
    generator = torch.Generator().manual_seed(config.train.seed)
    return DataLoader(dataset, shuffle=training, generator=generator if training else None, **common)
