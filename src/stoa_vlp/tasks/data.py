"""Inputs of the downstream tasks: JSONL task files, video files by id, loaders that decode each clip
once, and batches that carry a class label per row (QA)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from stoa_vlp.batch import Batch
from stoa_vlp.config import Config
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.data.dataset import VideoTextDataset, collate
from stoa_vlp.data.jsonl import read_jsonl
from stoa_vlp.data.video_files import VideoLookup

log = logging.getLogger(__name__)

PLACEHOLDER_CAPTION = "video"  # the text of a clip encoded without one (its batch row needs a caption)


def read_jsonl_rows(path: str | Path, kind: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a task's JSONL file; `kind` names the file
    in errors ("QA file does not exist"), which also name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {kind} file does not exist")
    rows = list(read_jsonl(path))
    for number, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
    return rows


def video_root(config: Config, annotation_file: str | Path) -> Path:
    """data.video_root, else a `videos` folder beside the file, else the file's folder."""
    if config.data.video_root:
        return Path(config.data.video_root)
    base = Path(annotation_file).parent
    return base / "videos" if (base / "videos").is_dir() else base


def find_video_paths(video_ids: list[str], root: Path, source: str | Path,
                     leave_out_missing: bool = False) -> dict[str, str]:
    """{video_id: file or frame folder} for every id, or a ValueError naming `source` and the missing ids.
    With `leave_out_missing` (training), the ids found, the others left out with a warning; a ValueError
    only when none is found (a wrong data.video_root)."""
    videos = VideoLookup(root)
    try:
        found = {video_id: videos.get(video_id) for video_id in video_ids}
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    missing = sorted(video_id for video_id, path in found.items() if path is None)
    if missing and (not leave_out_missing or len(missing) == len(found)):
        raise ValueError(f"{source}: {len(missing)} videos not found under {root} (e.g. {', '.join(missing[:3])})")
    if missing:
        log.warning("%s: %d of %d videos not found under %s (e.g. %s): training leaves out their items",
                    source, len(missing), len(found), root, ", ".join(missing[:3]))
    return {video_id: path for video_id, path in found.items() if path is not None}


def evaluation_loader(dataset, config: Config, collate_fn=collate) -> DataLoader:
    """Sequential loader over an evaluation dataset."""
    return DataLoader(
        dataset, batch_size=config.data.batch_size, shuffle=False, num_workers=config.data.num_workers,
        collate_fn=collate_fn,
    )


def video_loader(records: list[VideoRecord], config: Config, detections=None, label_vocab=None) -> DataLoader:
    """One evaluation item per record (its first caption; a record without captions gets a placeholder,
    as encoding videos needs no text), so each clip is decoded once."""
    records = [record if record.captions else dataclasses.replace(record, captions=[PLACEHOLDER_CAPTION])
               for record in records]
    dataset = VideoTextDataset(records, config, False, detections, label_vocab, None, items="videos")
    return evaluation_loader(dataset, config)


@dataclass
class LabelledBatch(Batch):
    labels: torch.Tensor  # (B,) long class label per row, -1 = none (e.g. an answer outside the vocabulary)


class LabelledCollate:
    """Collates samples into a LabelledBatch; row labels come from `labels[sample.video_index]`
    (the dataset's record index: one record per labelled item)."""

    def __init__(self, labels: list[int]):
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __call__(self, samples) -> LabelledBatch:
        batch = collate(samples)
        values = {f.name: getattr(batch, f.name) for f in fields(batch)}
        return LabelledBatch(**values, labels=self.labels[batch.video_index])
