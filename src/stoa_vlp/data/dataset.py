"""Datasets of (clip, caption) samples and their collation into a `stoa_vlp.batch.Batch`.

`VideoTextDataset` (map-style, for annotation files) has one item per caption, in training and
in evaluation alike (CLIP4Clip's "unfold sentences"): an epoch sees every caption once, and two
captions of one video in a batch share `video_index`, so VTC treats both as positives. With
items="videos" it has one item per video instead (a random caption in training, the first in
evaluation), for encoding each video once.

`WebDatasetShards` (iterable, for video2dataset shards) splits shards over ranks and DataLoader
workers; in training it resamples shards at random without end and shuffles samples in a buffer.
It reads members, captions and video ids by the rules `read_annotations` uses for shards
(`split_member_name`, `shard_caption`, `shard_video_id`), so tags and detections are found alike.

Records, detections and caption tags live in numpy arrays (stoa_vlp.data.serialized: one byte
buffer with offsets, as detectron2 serialises its dataset lists), built once in the main
process, so DataLoader workers share the pages instead of each touching (and so copying) Python
objects through reference counts; each sample rebuilds the objects it reads. Detections packed by
`stoa-vlp pack` (a DetectionsStore) are mapped from their files instead, one copy in the page cache
for all processes of a machine.

Bad samples: in evaluation every problem is an error naming the file. In training a sample whose
video is missing or unreadable, or whose caption is empty or unreadable, is skipped (another sample is drawn),
logged and counted in a `SkipCounter` shared with the workers; training stops with
`TooManyBadSamples` once the skipped share exceeds data.max_bad_samples.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import logging
import multiprocessing
import random
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from stoa_vlp.batch import TAG_NONE, Batch
from stoa_vlp.config import Config
from stoa_vlp.data.annotations import (
    CAPTION_EXTENSIONS,
    AnnotationError,
    VideoRecord,
    detect_format,
    existing_annotations,
    read_annotations,
    shard_caption,
    shard_list,
    shard_video_id,
    split_member_name,
    unreadable_shard,
)
from stoa_vlp.data.decode import DecodedClip, VideoError, check_decoder, decode_clip
from stoa_vlp.data.detections import (
    LabelVocab,
    box_counts_by_class_name,
    empty_targets,
    misaligned_times,
    packed,
    read_packed_detections,
    select_objects,
)
from stoa_vlp.data.detections_store import MANIFEST, DetectionsStore
from stoa_vlp.data.geometry import resize_crop
from stoa_vlp.data.serialized import SerializedDict, SerializedList
from stoa_vlp.data.tags import PackedTags, TagCache
from stoa_vlp.data.transforms import FrameTransform
from stoa_vlp.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SKIP_REASONS = ("missing_file", "bad_video", "empty_caption", "bad_caption")
WARNINGS_PER_REASON = 10  # skips logged one by one per process; later ones only counted


class TooManyBadSamples(RuntimeError):
    """The share of skipped training samples went over data.max_bad_samples."""


class BadSample(ValueError):
    """A sample that cannot be built; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Counts drawn and skipped samples per reason, in shared memory visible to all workers.

    Create it in the main process before the DataLoader starts its workers. Its lock is made for
    spawned processes, which forked ones can use too (one made for forking cannot be passed to a
    spawned worker: a DataLoader given multiprocessing_context="spawn" failed to start). It is a named
    semaphore: after an exit that skips finalisers (SIGKILL, os._exit) multiprocessing's resource
    tracker removes it, with a warning about leaked semaphores.
    """

    def __init__(self, max_share: float, min_seen: int = 100):
        self.max_share = max_share
        self.min_seen = min_seen  # the share is not judged before this many samples were drawn
        self._counts = multiprocessing.get_context("spawn").Array("q", 1 + len(SKIP_REASONS))  # seen, skips...
        self._logged = dict.fromkeys(SKIP_REASONS, 0)

    def seen(self) -> None:
        with self._counts.get_lock():
            self._counts[0] += 1

    def skip(self, reason: str, message: str) -> None:
        """Count and log a skip; raise TooManyBadSamples when the share goes over max_share."""
        with self._counts.get_lock():
            self._counts[1 + SKIP_REASONS.index(reason)] += 1
        if self._logged[reason] < WARNINGS_PER_REASON:
            self._logged[reason] += 1
            log.warning("skipped sample (%s): %s", reason, message)
        self.check()

    def attempt(self, load: Callable[[], Sample]) -> Sample | None:
        """`load()`, counted as a sample drawn; None, counted and logged as a skip, when it raises
        BadSample."""
        self.seen()
        try:
            return load()
        except BadSample as error:
            self.skip(error.reason, str(error))
            return None

    def add(self, total: int, skipped: dict[str, int]) -> None:
        """Add counts carried over from earlier (a resumed run's checkpoint)."""
        with self._counts.get_lock():
            self._counts[0] += total
            for reason, count in skipped.items():
                self._counts[1 + SKIP_REASONS.index(reason)] += count

    @property
    def total(self) -> int:
        return int(self._counts[0])

    @property
    def skipped(self) -> dict[str, int]:
        return {reason: int(self._counts[1 + i]) for i, reason in enumerate(SKIP_REASONS)}

    def share(self) -> float:
        return sum(self.skipped.values()) / max(1, self.total)

    def check(self) -> None:
        if self.total >= self.min_seen and self.share() > self.max_share:
            raise TooManyBadSamples(f"{self.summary()}: more than data.max_bad_samples={self.max_share:.2%}")

    def summary(self) -> str:
        return skip_summary(self.total, self.skipped)


# samples drawn in a row that could not be read before training stops whatever data.max_bad_samples
# allows: at 1 (tolerate any share), a split of only bad samples was drawn from forever
MAX_BAD_IN_A_ROW = 100


def too_many_in_a_row(skips: SkipCounter) -> TooManyBadSamples:
    return TooManyBadSamples(f"{MAX_BAD_IN_A_ROW} samples drawn in a row could not be read ({skips.summary()}): "
                             "is the data where the config says (data.train, data.video_root)?")


def skip_summary(total: int, skipped: dict[str, int]) -> str:
    """"skipped K of N samples loaded (P%): reason count, ..." for `total` samples drawn and skips per
    reason. Loaded, not trained on: data-loading workers read ahead of the steps."""
    detail = ", ".join(f"{reason} {count}" for reason, count in skipped.items() if count)
    share = sum(skipped.values()) / max(1, total)
    return f"skipped {sum(skipped.values())} of {total} samples loaded ({share:.2%})" + (f": {detail}" if detail else "")


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
            **self._objects(video_id, clip),
            tokens=tokens[0],
            text_mask=text_mask[0],
            pos_tags=self._tags(caption),
            video_index=video_index,
            video_id=video_id,
        )

    def _objects(self, video_id: str, clip: DecodedClip) -> dict[str, np.ndarray]:
        model = self.config.model
        if self.detections is None:
            targets = empty_targets(model.frames, model.boxes_per_frame, model.trajectories)
        else:
            detections = self.detections.get(video_id)  # None (no detections for this video) -> padding
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


def _video_index(key: str) -> int:
    """A stable 63-bit id for a shard key (the same video gets the same index on every rank)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


class WebDatasetShards(IterableDataset):
    """Samples streamed from video2dataset .tar shards (<key>.mp4 with <key>.txt or <key>.json)."""

    def __init__(
        self,
        shards: list[str],
        config: Config,
        training: bool,
        detections=None,
        label_vocab=None,
        tag_cache=None,
        rank: int = 0,
        world_size: int = 1,
        resample: bool | None = None,
        shuffle_buffer: int = 64,
        skips: SkipCounter | None = None,
    ):
        if not shards:
            raise ValueError("no shards given")
        self.shards = list(shards)
        self.training = training
        self.rank, self.world_size = rank, world_size
        self.resample = training if resample is None else resample
        self.shuffle_buffer = shuffle_buffer if training else 0
        self.seed = config.train.seed
        self.epoch = 0
        self.start_batch = 0
        self.builder = SampleBuilder(config, training, detections, label_vocab, tag_cache)
        self.label_vocab = label_vocab
        self.skips = skips if skips is not None else SkipCounter(config.data.max_bad_samples)

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Seed the next stream from the trainer's data position (epoch, batches already consumed):
        each epoch of a non-resampled stream is shuffled anew, and a run resumed at batch S draws a
        stream of its own instead of replaying the one its first run began with. A stream has no
        exact position: the resumed samples differ from those of an uninterrupted run."""
        self.epoch, self.start_batch = epoch, start_batch

    def _consumer(self) -> tuple[int, int]:
        """This reader's index among all (rank, worker) readers, and their count."""
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return self.rank * workers + worker_id, self.world_size * workers

    def _shard_order(self, rng: random.Random) -> Iterator[str]:
        consumer, consumers = self._consumer()
        if self.resample:
            while True:
                yield rng.choice(self.shards)
        mine = self.shards[consumer::consumers]
        if not mine:
            log.warning(
                "reader %d of %d has no shard (%d shards): it yields nothing", consumer, consumers, len(self.shards)
            )
        yield from mine

    def _raw_samples(self, shard: str) -> Iterator[tuple[str, bytes | None, dict[str, tuple[str, bytes]]]]:
        """(key, mp4 bytes, caption members {extension: (member name, data)}) per key of a shard,
        streaming the tar once."""
        key, video, captions = None, None, {}
        try:
            with tarfile.open(shard, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = split_member_name(member.name)
                    if member_key != key:
                        if key is not None:
                            yield key, video, captions
                        key, video, captions = member_key, None, {}
                    if extension == "mp4":
                        video = archive.extractfile(member).read()
                    elif extension in CAPTION_EXTENSIONS:
                        captions[extension] = (member.name, archive.extractfile(member).read())
        except (OSError, tarfile.TarError) as error:
            raise BadSample("bad_video", unreadable_shard(shard, error)) from None
        if key is not None:
            yield key, video, captions

    def _build(self, shard: str, key: str, video: bytes | None, captions: dict[str, tuple[str, bytes]], rng) -> Sample:
        name = f"{shard}::{key}"
        if video is None:
            raise BadSample("missing_file", f"{name}: shard has no {key}.mp4")
        try:
            caption = shard_caption(shard, captions)
        except AnnotationError as error:
            raise BadSample("bad_caption", str(error)) from None
        return self.builder.build(video, name, shard_video_id(key), caption or "", None, None, _video_index(key), rng)

    def __iter__(self) -> Iterator[Sample]:
        consumer, _ = self._consumer()
        self._bad_in_a_row = 0
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.start_batch}-{consumer}")
        sample_rng = np.random.default_rng(rng.getrandbits(63))
        buffer: list[tuple[str, str, bytes | None, dict[str, tuple[str, bytes]]]] = []
        left_out: list[str] = []  # evaluation: keys without a video or a caption member
        for shard in self._shard_order(rng):
            try:
                for key, video, captions in self._raw_samples(shard):
                    if not self.training and (video is None or not captions):
                        left_out.append(f"{shard}::{key}")  # as the annotation reader leaves them out
                        continue
                    buffer.append((shard, key, video, captions))
                    if len(buffer) > self.shuffle_buffer:
                        sample = self._take(buffer, rng, sample_rng)
                        if sample is not None:
                            yield sample
            except BadSample as error:
                if not self.training:
                    raise
                self.skips.seen()
                self.skips.skip(error.reason, str(error))
                self._count_bad()
        while buffer:
            sample = self._take(buffer, rng, sample_rng)
            if sample is not None:
                yield sample
        if left_out:
            log.warning("%d shard keys without a video or without a caption are left out, as the annotation "
                        "reader leaves them (e.g. %s)", len(left_out), left_out[0])

    def _take(self, buffer: list, rng: random.Random, sample_rng: np.random.Generator) -> Sample | None:
        """Build a random (training) or the oldest (evaluation) buffered sample; None if skipped."""
        item = buffer.pop(rng.randrange(len(buffer)) if self.shuffle_buffer else 0)
        if not self.training:
            return self._build(*item, sample_rng)
        sample = self.skips.attempt(functools.partial(self._build, *item, sample_rng))
        if sample is None:
            self._count_bad()
        else:
            self._bad_in_a_row = 0
        return sample

    def _count_bad(self) -> None:
        """Count a skipped sample (or shard) in a row; TooManyBadSamples after MAX_BAD_IN_A_ROW: a
        resampled stream of only bad samples would otherwise be read forever."""
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= MAX_BAD_IN_A_ROW:
            raise too_many_in_a_row(self.skips)


def load_detections(config: Config) -> tuple[Mapping | None, LabelVocab | None]:
    """(PackedVideoDetections by video id, LabelVocab) named by data.detections and data.label_vocab,
    or (None, None) without detections or objects. data.detections is a detections JSONL file, read
    whole, or a store folder made by `stoa-vlp pack`, mapped into memory. Without a data.label_vocab
    file the vocabulary is built from the detections: the most frequent model.num_object_classes - 2
    classes."""
    if not (config.data.detections and config.model.objects):
        return None, None
    if Path(config.data.detections).name == MANIFEST:
        raise ValueError(f"data.detections={config.data.detections}: give the store's folder, not its {MANIFEST}")
    if Path(config.data.detections).is_dir():
        detections = DetectionsStore(config.data.detections)
        if detections.source_changed():
            log.warning("%s: the detections file it was packed from, %s, has changed since: pack it again "
                        "(stoa-vlp pack) for the new detections", config.data.detections,
                        detections.manifest["source"]["path"])
    else:
        detections = read_packed_detections(config.data.detections)
    classes = config.model.num_object_classes
    counts = box_counts_by_class_name(detections)
    if config.data.label_vocab and Path(config.data.label_vocab).exists():
        label_vocab = LabelVocab.load(config.data.label_vocab)
        if len(label_vocab) > classes:
            raise ValueError(f"{config.data.label_vocab}: {len(label_vocab)} classes (with padding and unknown) "
                             f"do not fit model.num_object_classes={classes}")
        report_unknown_classes(config.data.detections, counts, label_vocab, config.data.label_vocab)
        return detections, label_vocab
    if config.data.label_vocab:
        log.warning("%s does not exist: object class ids are rebuilt from %s and may differ from training",
                    config.data.label_vocab, config.data.detections)
    label_vocab = LabelVocab.from_counts(counts, max_size=classes)
    report_unknown_classes(config.data.detections, counts, label_vocab, f"the {len(label_vocab) - 2} most "
                           f"frequent classes (model.num_object_classes={classes} with padding and unknown)")
    return detections, label_vocab


UNKNOWN_BOXES_WARNED = 0.1  # share of boxes whose class is not in the vocabulary above which it is a warning


def report_unknown_classes(path: str, counts: Mapping[str, int], label_vocab: LabelVocab, vocabulary: str) -> None:
    """Log the detected classes of `path` (`counts`: its boxes by class name) that `label_vocab`
    (described by `vocabulary`) lacks: their boxes become <unknown>. A warning when they hold
    UNKNOWN_BOXES_WARNED of the boxes or more (all of them: detections of another detector than the
    model's classes came from), else info."""
    unknown = sorted((name for name in counts if name not in label_vocab.ids), key=lambda name: (-counts[name], name))
    if not unknown:
        return
    share = sum(counts[name] for name in unknown) / max(sum(counts.values()), 1)
    if len(unknown) == len(counts):
        log.warning("%s: none of its %d classes (e.g. %s) is in %s: every box becomes <unknown>, so the objects "
                    "carry no class (detections of another detector than the model's?)",
                    path, len(counts), ", ".join(unknown[:3]), vocabulary)
        return
    log.log(logging.WARNING if share >= UNKNOWN_BOXES_WARNED else logging.INFO,
            "%s: %d of its %d classes (%.1f%% of the boxes; e.g. %s) are not in %s: their boxes become <unknown>",
            path, len(unknown), len(counts), 100 * share, ", ".join(unknown[:3]), vocabulary)


def report_detection_coverage(path: str, detections: Mapping, video_ids: Iterable[str], source: str) -> None:
    """Log how the detections file `path` covers the videos `video_ids` (of `source`): lines for
    other videos (info), videos without a line (a warning: their clips get no objects), detected
    frames without a box (info)."""
    known, detected = set(video_ids), set(detections)
    unknown = sorted(detected - known)
    if unknown:  # one detections file for all splits is usual
        log.info("%s: %d detection lines are for videos not in %s (e.g. %s); they are ignored",
                 path, len(unknown), source, unknown[0])
    without = sorted(known - detected)
    if without:
        log.warning("%s: %d of %d videos have no detections (no object trajectories; e.g. %s)",
                    path, len(without), len(known), without[0])
    if isinstance(detections, DetectionsStore):
        boxes_per_frame = detections.boxes_per_frame_of(known & detected)
    else:
        boxes_per_frame = [packed(detections[video_id]).boxes_per_frame() for video_id in known & detected]
    frames = sum(len(counts) for counts in boxes_per_frame)
    empty = sum(int(np.count_nonzero(counts == 0)) for counts in boxes_per_frame)
    if empty:
        log.info("%s: %d of %d detected frames of %s hold no box", path, empty, frames, source)


class SideData(NamedTuple):
    """What a split's items read beside their videos and captions (each None where the config names none)."""

    detections: Mapping | None
    label_vocab: LabelVocab | None
    tags: TagCache | None

    def for_retrieval(self, video_ids: Iterable[str]) -> "SideData":
        """What evaluating retrieval on `video_ids` reads: their detections (a file's, cut down, so that
        the others can be freed; a store holds none in memory) and no tags, which it does not use."""
        detections = self.detections
        if isinstance(detections, dict):
            detections = {video_id: detections[video_id] for video_id in set(video_ids) if video_id in detections}
        return SideData(detections, self.label_vocab, None)


def load_side_data(config: Config, detections_and_vocab=None) -> SideData:
    """The detections, label vocabulary and tag cache the config names, read once for every split that
    uses them; the first two are read unless `detections_and_vocab` gives them (as `load_detections`
    returned)."""
    detections, label_vocab = detections_and_vocab if detections_and_vocab is not None else load_detections(config)
    tags = TagCache.read(config.data.tags, length=config.model.text_len) if config.data.tags else None
    return SideData(detections, label_vocab, tags)


def _report_side_data(config: Config, side_data: SideData, records: list[VideoRecord], source: str) -> None:
    """Log how the detections and tags cover `records` (of `source`)."""
    if side_data.detections is not None:
        report_detection_coverage(config.data.detections, side_data.detections,
                                  (record.video_id for record in records), source)
    if side_data.tags is not None:
        captions = {caption for record in records for caption in record.captions}
        untagged = sum(caption not in side_data.tags.tags for caption in captions)
        if untagged:
            log.warning("%s: %d of %d captions of %s are not in it: they get no noun/verb tags, so DOTA and "
                        "STASP align them to the sentence feature only (run stoa-vlp tag on them)",
                        config.data.tags, untagged, len(captions), source)


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
                  side_data: SideData | None = None):
    """The dataset of a split ("train", "val" or "test") as the config names it. `side_data`: what
    `load_side_data(config)` returned, for a caller that holds it already (read otherwise), so that
    several splits share one copy."""
    path = split_file(config, split)
    training = split == "train"
    side_data = side_data if side_data is not None else load_side_data(config)
    if is_webdataset(config, path):
        return WebDatasetShards(shard_list(Path(path)), config, training, *side_data, rank=rank, world_size=world_size)
    records = read_annotations(path, config.data.format, split, config.data.video_root or None, strict=not training)
    if not records:
        raise ValueError(f"{path}: no usable (video, caption) records for split {split}")
    _report_side_data(config, side_data, records, f"the {split} split of {path}")
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
