"""What a split's items read beside their videos and captions: detections, the label vocabulary
and caption tags (`SideData`).

`load_detections` reads data.detections (a JSONL file, read whole, or a store folder made by
`stoa-vlp pack`, mapped into memory) and the label vocabulary; `load_side_data` adds the tag cache,
read once for every split that uses them. The `report_*` functions log how they cover a split's
videos and captions: classes the vocabulary lacks, videos without detections, captions without tags.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from stoa_vlp.config import Config
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.data.detections import LabelVocab, box_counts_by_class_name, packed, read_packed_detections
from stoa_vlp.data.detections_store import MANIFEST, DetectionsStore
from stoa_vlp.data.tags import TagCache

log = logging.getLogger(__name__)


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


def report_side_data(config: Config, side_data: SideData, records: list[VideoRecord], source: str) -> None:
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
