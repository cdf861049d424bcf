"""Validation during training: zero-shot text-to-video and video-to-text retrieval on a split."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from stoa_vlp.batch import Batch
from stoa_vlp.config import Config


class FirstVideos:
    """The batches of a loader up to its first `count` videos (told apart by `video_index`), the batch
    that reaches the count cut short: the cap of a stream, which cannot be indexed."""

    def __init__(self, loader: Iterable[Batch], count: int):
        self.loader, self.count = loader, count

    def __iter__(self) -> Iterator[Batch]:
        seen: set[int] = set()
        for batch in self.loader:
            rows = []
            for row, video in enumerate(batch.video_index.tolist()):
                if video not in seen and len(seen) == self.count:
                    break
                seen.add(video)
                rows.append(row)
            if len(rows) < len(batch):
                if rows:
                    yield batch.select(rows)
                return
            yield batch


def retrieval_loader(config: Config, split: str, max_videos: int = 0, side_data=None) -> Iterable[Batch]:
    """Sequential loader over every (video, caption) of `split`; with `max_videos`, only the captions
    of the split's first `max_videos` videos. A clip listed twice is refused (`require_distinct_clips`).
    `side_data`: as `build_dataset` takes it, to share the training split's."""
    from stoa_vlp.data.dataset import build_dataset, collate
    from stoa_vlp.tasks.retrieval import require_distinct_clips

    dataset = build_dataset(config, split, side_data=side_data)
    streamed = isinstance(dataset, IterableDataset)
    if not streamed:
        require_distinct_clips(list(dataset.records))
    if max_videos > 0 and not streamed:
        keep = np.flatnonzero(dataset.items[:, 0] < max_videos).tolist()
        dataset = Subset(dataset, keep)
    loader = DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        shuffle=False,
        # a capped stream is read by one process: workers interleave their shards, so its first videos
        # would depend on data.num_workers
        num_workers=0 if max_videos > 0 and streamed else config.data.num_workers,
        collate_fn=collate,
    )
    return FirstVideos(loader, max_videos) if max_videos > 0 and streamed else loader


def validation_loader(config: Config, split: str, max_videos: int = 0, side_data=None,
                      records: list | None = None) -> tuple[Iterable[Batch], list | None]:
    """(loader, records) for validating on `split` (its first `max_videos` videos when set). For an
    annotation file: a loader with one row per record (`tasks.data.video_loader`), so each clip is
    decoded once however many captions it has, and the records, whose captions are the queries
    (`evaluate_retrieval_records`). For WebDataset shards, which cannot be indexed: the stream of
    `retrieval_loader` (one row per shard sample) and None. `records`: the annotation file's records
    (`check_split_videos`), read again when not given."""
    from stoa_vlp.data.dataset import build_dataset, is_webdataset, split_file
    from stoa_vlp.tasks.data import video_loader
    from stoa_vlp.tasks.retrieval import require_distinct_clips

    if is_webdataset(config, split_file(config, split)):
        return retrieval_loader(config, split, max_videos, side_data), None
    dataset = build_dataset(config, split, side_data=side_data, records=records)
    records = [dataset.records[index] for index in range(len(dataset.records))]
    require_distinct_clips(records)
    if max_videos > 0:
        records = records[:max_videos]
    # the dataset's side data, already packed for its workers; its tags are not needed to encode videos
    return video_loader(records, config, dataset.builder.detections, dataset.label_vocab), records


def check_split_videos(config: Config, split: str, max_videos: int = 0) -> list | None:
    """Read `split`'s annotation file and find the videos its evaluation reads (the first `max_videos`
    when set), so that a wrong path, a malformed file or a missing video fails before training, not at
    the first validation (before that step's checkpoint). Returns the split's records; None for
    WebDataset shards, which are only looked for: reading them would be reading their videos."""
    from stoa_vlp.data.annotations import existing_annotations, read_annotations, require_video_files
    from stoa_vlp.data.dataset import is_webdataset

    path = getattr(config.data, split)
    existing_annotations(path)
    if is_webdataset(config, path):
        return None
    records = read_annotations(path, config.data.format, split, config.data.video_root or None, strict=True)
    require_video_files(records[:max_videos] if max_videos > 0 else records, path)
    return records


class RetrievalEvaluator:
    """`evaluator(module) -> metrics` for the Trainer: retrieval metrics (t2v_r1 ... v2t_mnr) of
    `module.model` (or `module` itself) on a split. The split's file and videos are checked here
    (`check_split_videos`), the loader is built on first use. The Trainer runs it on rank 0 only,
    which shows its bars when `train.progress` is on. Each video of an annotation file is decoded once
    (`validation_loader`); its captions are encoded from the records. `side_data`: as `build_dataset` takes it (the
    training split's, so that the detections are not read a second time); only the split's part of
    it is kept."""

    def __init__(self, config: Config, split: str, device: torch.device, max_videos: int = 0, side_data=None):
        self.config, self.split, self.device, self.max_videos = config, split, device, max_videos
        self.loader: Iterable[Batch] | None = None
        self.records: list | None = None
        self.checked = check_split_videos(config, split, max_videos)  # the loader's records: the file is read once
        if side_data is not None and self.checked is not None:
            side_data = side_data.for_retrieval(record.video_id for record in self.checked)
        self.side_data = side_data

    def __call__(self, module: nn.Module) -> dict[str, float]:
        from stoa_vlp.tasks.retrieval import evaluate_retrieval, evaluate_retrieval_records
        from stoa_vlp.tokenizer import Tokenizer

        if self.loader is None:
            self.loader, self.records = validation_loader(self.config, self.split, self.max_videos, self.side_data,
                                                          self.checked)
        model = getattr(module, "model", module)
        feature, progress = self.config.loss.vtc_video_feature, self.config.train.progress
        if self.records is None:  # a stream: one row per (video, caption) as it comes
            return evaluate_retrieval(model, self.loader, self.device, video_feature=feature, progress=progress)
        return evaluate_retrieval_records(model, self.loader, self.records, Tokenizer(self.config.model.text_len),
                                          self.device, video_feature=feature, progress=progress)


def pretraining_data(config, env, validate: bool):
    """(training set, validation evaluator or None) from one read of the detections and tag cache. Each
    keeps only its split's part of them: the whole file's detections go when this returns."""
    from stoa_vlp.data.dataset import build_dataset, split_file
    from stoa_vlp.data.side_data import load_side_data

    split_file(config, "train")  # a wrong path fails before the side data is read
    side_data = load_side_data(config)
    train_set = build_dataset(config, "train", env.rank, env.world_size, side_data)
    evaluate = RetrievalEvaluator(config, "val", env.device, config.train.val_max_clips, side_data) if validate else None
    return train_set, evaluate
