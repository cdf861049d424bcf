"""`WebDatasetShards`: (clip, caption) samples streamed from video2dataset .tar shards.

The stream (an IterableDataset) splits shards over ranks and DataLoader workers; in training it
resamples shards at random without end and shuffles samples in a buffer.
It reads members, captions and video ids by the rules `read_annotations` uses for shards
(`split_member_name`, `shard_caption`, `shard_video_id`), so tags and detections are found alike.
Samples are built by `stoa_vlp.data.dataset.SampleBuilder`; bad ones are errors in evaluation and
counted skips in training (`stoa_vlp.data.skips`), as in the map-style dataset.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import tarfile
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from stoa_vlp.config import Config
from stoa_vlp.data.annotations import (
    CAPTION_EXTENSIONS,
    AnnotationError,
    shard_caption,
    shard_video_id,
    split_member_name,
    unreadable_shard,
)
from stoa_vlp.data.dataset import Sample, SampleBuilder
from stoa_vlp.data.skips import MAX_BAD_IN_A_ROW, BadSample, SkipCounter, too_many_in_a_row

log = logging.getLogger(__name__)


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
