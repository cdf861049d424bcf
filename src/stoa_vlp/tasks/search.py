"""Text-to-video search over a saved index of encoded videos.

An index is a folder: `features.safetensors` (the VideoFeatures fields of every video, float32),
`clip_embeddings.safetensors` (each video's normalised clip embedding, (N, E) float32, that the
contrastive cosine compares queries with) and `index.json` ({"video_ids", "paths", "checkpoint",
"config", "clip_embedding"}: the model config and preprocessing the features were computed with, and
the loss.vtc_video_feature of the clip embeddings); videos that cannot be read are left out of it,
logged and counted (`encode_readable_videos`), as `prepare` and `detect` skip them. An index built
before the clip embeddings were stored (no "clip_embedding" key) still loads: they are computed from
its frames once, at load. A query is ranked by the contrastive cosine against every video (one
matrix product with the clip embeddings, then a top-k), then its top `rerank_k` are re-ranked by the
fusion encoder's matching head with the same fusion as retrieval evaluation (softmax over the top-k
of the scaled cosine times P(matched), taken as a log so that small products stay apart). The index
stays on the host: only the clip embeddings and the re-ranked videos' features go to the device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from stoa_vlp.batch import Batch
from stoa_vlp.config import Config
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.data.dataset import VideoTextDataset, collate
from stoa_vlp.data.jsonl import read_json_object, write_json_atomic
from stoa_vlp.data.skips import SkipCounter
from stoa_vlp.metrics.retrieval import nan_lowest
from stoa_vlp.model import VideoFeatures
from stoa_vlp.objectives.distributed import map_tensor_fields
from stoa_vlp.tasks.data import evaluation_loader
from stoa_vlp.tasks.retrieval import (
    clip_embeddings,
    embedding_similarity,
    encode_texts,
    encode_videos,
    logit_scale_value,
    match_log_odds,
)
from stoa_vlp.tokenizer import Tokenizer, require_text

FEATURES_FILE = "features.safetensors"
EMBEDDINGS_FILE = "clip_embeddings.safetensors"
INDEX_FILE = "index.json"
logger = logging.getLogger("stoa_vlp.search")


def weights_stamp(checkpoint: Path) -> dict[str, int]:
    """Size and modification time of a checkpoint folder's weights: the index records them, so that a
    run trained again in place (same path, other weights) is told apart (hashing 800 MB per query
    would cost more than the search)."""
    stat = (Path(checkpoint) / "model.safetensors").stat()
    return {"bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}


@dataclass
class SearchIndex:
    video_ids: list[str]
    paths: list[str]
    videos: VideoFeatures
    info: dict  # "checkpoint", "weights" (weights_stamp), "config" (as saved), "trained_model", "clip_embedding"
    embeddings: torch.Tensor | None = None  # (N, E) float32 `clip_embeddings` of `embedding_feature`
    embedding_feature: str | None = None  # the loss.vtc_video_feature of `embeddings`

    def clip_embeddings(self, video_feature: str, device=None) -> torch.Tensor:
        """(N, E) normalised clip embeddings of `video_feature`, computed from the videos' frames the first
        time when the index holds none of that kind, and kept on `device` (if given) for the next query."""
        if self.embeddings is None or self.embedding_feature != video_feature:
            self.embeddings, self.embedding_feature = clip_embeddings(self.videos, video_feature), video_feature
        if device is not None:
            self.embeddings = self.embeddings.to(device)
        return self.embeddings


@dataclass
class SearchHit:
    video_id: str
    path: str
    score: float  # final ranking score (log of the fusion score for the re-ranked top-k, else cosine)
    cosine: float  # contrastive similarity
    match: float | None  # P(matched) from the matching head, for re-ranked hits


class _ReadableClips(Dataset):
    """The clips of a dataset of videos (`items="videos"`), None for a video it cannot read: its
    SkipCounter counts those and logs them by name (the first few per process)."""

    def __init__(self, dataset: VideoTextDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.skips.attempt(functools.partial(self.dataset.__getitem__, index))


def _collate_readable(samples: list) -> Batch | None:
    """The Batch of the clips that could be read; None when none could."""
    readable = [sample for sample in samples if sample is not None]
    return collate(readable) if readable else None


class _ReadBatches:
    """The batches of a loader of `_ReadableClips` that hold a clip, with the loader's length (the
    progress bar's total); a ValueError naming `source` at the end when no video could be read."""

    def __init__(self, loader, source: str):
        self.loader = loader
        self.source = source

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        read = False
        for batch in self.loader:
            if batch is not None:
                read = True
                yield batch
        if not read:
            raise ValueError(f"{self.source}: none of its {len(self.loader.dataset)} videos could be read "
                             "(see the warnings above); no index written")


def encode_readable_videos(model, records: list[VideoRecord], config: Config, detections, label_vocab, device,
                           source: str, progress: bool = False) -> tuple[list[str], VideoFeatures, int]:
    """(video ids, VideoFeatures, unreadable videos) of the records' videos, one clip each. A video
    that cannot be read (not a video, cut short, damaged) is left out with a warning naming it and
    counted, so that one bad file of a collection does not stop its index; a ValueError naming
    `source` when none could be read."""
    skips = SkipCounter(max_share=1.0)  # never too many: the index holds what could be read
    dataset = VideoTextDataset(records, config, False, detections, label_vocab, items="videos", skips=skips)
    loader = evaluation_loader(_ReadableClips(dataset), config, _collate_readable)
    ids, videos = encode_videos(model, _ReadBatches(loader, source), device, progress, host=True)
    return ids, videos, sum(skips.skipped.values())


def _video_feature(info: dict) -> str:
    """The loss.vtc_video_feature of an index's config (its default for a config that names none)."""
    return info.get("config", {}).get("loss", {}).get("vtc_video_feature", "mean")


def save_index(folder: str | Path, index: SearchIndex) -> None:
    """Write `index` to `folder`, with the clip embeddings of its config's loss.vtc_video_feature."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f.name: getattr(index.videos, f.name).detach().cpu().contiguous() for f in dataclasses.fields(index.videos)}
    save_file(tensors, str(folder / FEATURES_FILE))
    video_feature = _video_feature(index.info)
    save_file({"embeddings": index.clip_embeddings(video_feature).detach().cpu().contiguous()},
              str(folder / EMBEDDINGS_FILE))
    info = {**index.info, "clip_embedding": video_feature}
    write_json_atomic(folder / INDEX_FILE, {"video_ids": index.video_ids, "paths": index.paths, **info}, indent=1)


def load_index(folder: str | Path, device="cpu") -> SearchIndex:
    folder = Path(folder)
    for name in (INDEX_FILE, FEATURES_FILE):
        _require_index_file(folder / name)
    info = read_json_object(folder / INDEX_FILE, {"video_ids": list, "paths": list, "checkpoint": str, "config": dict})
    tensors = _load_tensors(folder / FEATURES_FILE, device)
    expected = {f.name for f in dataclasses.fields(VideoFeatures)}
    if set(tensors) != expected:
        raise ValueError(f"{folder / FEATURES_FILE}: fields {sorted(tensors)} differ from VideoFeatures {sorted(expected)}")
    videos = VideoFeatures(**tensors)
    ids, paths = info.pop("video_ids"), info.pop("paths")
    if not len(ids) == len(paths) == videos.video.shape[0]:
        raise ValueError(f"{folder}: {len(ids)} ids, {len(paths)} paths and {videos.video.shape[0]} feature rows differ")
    index = SearchIndex(ids, paths, videos, info)
    video_feature = info.pop("clip_embedding", None)  # None: an index built before the clip embeddings were stored
    if video_feature is None:
        logger.info("%s holds no clip embeddings (built by an older version): computing them from its frames; "
                    "building the index again with `stoa-vlp index --overwrite` makes its searches faster", folder)
        index.clip_embeddings(_video_feature(info))
    else:
        embeddings = _load_tensors(folder / EMBEDDINGS_FILE, device).get("embeddings")
        if embeddings is None or embeddings.shape[:1] != (len(ids),):
            shape = None if embeddings is None else tuple(embeddings.shape)
            raise ValueError(f"{folder / EMBEDDINGS_FILE}: expected \"embeddings\" of {len(ids)} rows, got {shape}")
        index.embeddings, index.embedding_feature = embeddings, video_feature
    return index


def _require_index_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: not a search index (missing {path.name}; build one with `stoa-vlp index`)")


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    _require_index_file(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


@torch.no_grad()
def search(
    model,
    index: SearchIndex,
    query: str,
    tokenizer: Tokenizer,
    device,
    top: int = 10,
    rerank_k: int = 32,
    video_feature: str = "mean",
) -> list[SearchHit]:
    """The `top` best videos for `query`, best first: the contrastive top `rerank_k` re-ranked by the
    matching head (their `score` is the log fusion score), then the rest by cosine (`score` = `cosine`).
    The index's clip embeddings (of `video_feature`) move to `device` and stay there for the next query;
    of its other features only the re-ranked videos' go there."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be 0 (no re-ranking) or more, got {rerank_k}")
    require_text(query, "query", tokenizer)
    tokens, mask = tokenizer([query])
    text = encode_texts(model, tokens, mask, device)
    videos = index.videos
    cosine = embedding_similarity(text.sentence, index.clip_embeddings(video_feature, device))[0]  # (num_videos,)
    ranked = nan_lowest(cosine)  # a video whose features are NaN comes last
    k = min(rerank_k, len(ranked))
    order = ranked.topk(min(max(top, k), len(ranked))).indices.cpu()
    cosine, ranked = cosine.cpu(), ranked.cpu()
    hits = []
    if k > 0:
        candidates = order[:k]
        chosen = videos.index_select(candidates.to(videos.video.device))
        chosen = map_tensor_fields(lambda tensor: tensor.to(device), chosen)  # only the re-ranked videos
        log_odds = match_log_odds(model, chosen, text, torch.zeros(k, dtype=torch.long), torch.arange(k))
        prior = torch.log_softmax(logit_scale_value(model) * ranked[candidates].double(), dim=0)
        fused = prior + F.logsigmoid(log_odds)  # log(softmax_k(scale * cosine) * P(matched)), float64
        match = torch.sigmoid(log_odds)
        for rank in nan_lowest(fused).argsort(descending=True).tolist():
            row = int(candidates[rank])
            hits.append(SearchHit(index.video_ids[row], index.paths[row], float(fused[rank]), float(cosine[row]),
                                  float(match[rank])))
    for row in order[k:top].tolist():
        hits.append(SearchHit(index.video_ids[row], index.paths[row], float(cosine[row]), float(cosine[row]), None))
    return hits[:top]
