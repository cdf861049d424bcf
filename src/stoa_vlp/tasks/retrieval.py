"""Text-video retrieval: feature extraction, contrastive similarity, fusion re-ranking, metrics.

Evaluation encodes every unique video and every caption once, scores all pairs by the VTC
similarity (cosine of the sentence feature and the clip embedding chosen by
`loss.vtc_video_feature`, meanP by default), then optionally re-ranks each query's contrastive
top-k with the fusion encoder's matching head (VTM), in both directions.
Only the top-k pairs are fused; the other candidates keep their (lower) contrastive scores.
With `progress=True`, the loops over batches show a tqdm bar on stderr; by default they are quiet.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stoa_vlp.batch import Batch
from stoa_vlp.data.annotations import clip_name, repeated_clips
from stoa_vlp.metrics.retrieval import RECALL_AT, querybank_normalise_blocks, rerank_top_k, retrieval_metrics
from stoa_vlp.objectives.distributed import map_tensor_fields
from stoa_vlp.objectives.vtc import clamped_scale, video_embedding
from stoa_vlp.tokenizer import Tokenizer

Features = TypeVar("Features")


def concat_features(parts: list[Features]) -> Features:
    """Concatenate VideoFeatures (or TextFeatures) along the batch dimension."""
    first = parts[0]
    values = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
    return type(first)(**values)


def encode_batch_videos(model, batch: Batch, rows: torch.Tensor | None = None):
    """VideoFeatures of the batch's clips (or only `rows` of it)."""
    fields = (batch.frames, batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask)
    if rows is not None:
        fields = tuple(t[rows] for t in fields)
    return model.encode_video(*fields)


def _encode(model, loader: Iterable[Batch], device, texts: bool, progress: bool = False, host: bool = False):
    """(VideoFeatures of each clip, TextFeatures of every row or None, text_to_video, each clip's video id)
    over a loader. Clips are told apart by `Batch.video_index` (one per annotation record), so two
    moments of one video are two clips. With `host`, each batch's video features move to the CPU as it
    is encoded, so that the device never holds more than one batch of them (an index of 1M videos is
    76 GB of features)."""
    was_training = model.training
    model.eval()
    video_parts, text_parts, text_to_video, video_ids = [], [], [], []
    clip_position: dict[int, int] = {}  # video_index -> position among the clips
    work = "encoding videos and captions" if texts else "encoding videos"
    # tqdm takes len(loader) as the total; a stream without a length (TypeError) gets none
    for batch in tqdm(loader, desc=work, unit="batch", disable=not progress):
        batch = batch.to(device)
        new_rows = []
        for row, (clip, video_id) in enumerate(zip(batch.video_index.tolist(), batch.video_ids)):
            if clip not in clip_position:
                clip_position[clip] = len(clip_position)
                video_ids.append(video_id)
                new_rows.append(row)
            text_to_video.append(clip_position[clip])
        if new_rows:
            rows = torch.tensor(new_rows, device=batch.frames.device)
            features = encode_batch_videos(model, batch, rows)
            video_parts.append(map_tensor_fields(torch.Tensor.cpu, features) if host else features)
        if texts:
            text_parts.append(model.encode_text(batch.tokens, batch.text_mask))
    model.train(was_training)
    if not video_parts:
        raise ValueError("the evaluation loader yielded no batches")
    text_features = concat_features(text_parts) if texts else None
    return concat_features(video_parts), text_features, torch.tensor(text_to_video, dtype=torch.long), video_ids


def require_one_clip_per_video(video_ids: list[str], task: str) -> None:
    """A ValueError naming the repeated ids when a video has several clips (e.g. DiDeMo moments), for
    a `task` that keys its results by video id."""
    repeated = sorted(video_id for video_id, count in Counter(video_ids).items() if count > 1)
    if repeated:
        raise ValueError(f"{task} needs one clip per video, but {len(repeated)} videos have several "
                         f"(e.g. {', '.join(repeated[:3])})")


def require_distinct_clips(records) -> None:
    """A ValueError naming the clips (same video, same start and end) that several records list: each
    copy would be a separate candidate, and every caption's retrieval of the other copy a miss."""
    repeated = [clip_name(*clip) for clip in repeated_clips(records)]
    if repeated:
        raise ValueError(f"retrieval evaluation needs each clip once, but {len(repeated)} clips are listed more "
                         f"than once (e.g. {', '.join(repeated[:3])}): list each clip once, with all its captions")


@torch.no_grad()
def encode_videos(model, loader: Iterable[Batch], device, progress: bool = False,
                  host: bool = False) -> tuple[list[str], object]:
    """(each clip's video id, VideoFeatures of each clip) in first-seen order over a loader of Batches;
    on `device`, or with `host` on the CPU, each batch moved there as it is encoded."""
    videos, _, _, ids = _encode(model, loader, device, texts=False, progress=progress, host=host)
    return ids, videos


def _text_batches(model, tokens: torch.Tensor, mask: torch.Tensor, device, batch_size: int, progress: bool):
    """TextFeatures of each batch of token rows (N, L), the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    starts = tqdm(range(0, len(tokens), batch_size), desc="encoding captions", unit="batch", disable=not progress)
    try:
        for i in starts:
            yield model.encode_text(tokens[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, mask: torch.Tensor, device, batch_size: int = 256,
                 progress: bool = False):
    """TextFeatures of token rows (N, L) with their masks, in batches."""
    return concat_features(list(_text_batches(model, tokens, mask, device, batch_size, progress)))


@torch.no_grad()
def encode_sentences(model, tokens: torch.Tensor, mask: torch.Tensor, device, batch_size: int = 256,
                     progress: bool = False) -> torch.Tensor:
    """(N, E) sentence features of token rows (N, L), without keeping every token's feature as
    `encode_texts` does: for a query bank of MSR-VTT's 180k training captions those would be 12 GB
    (32 tokens x 512 float32 each)."""
    return torch.cat([text.sentence for text in _text_batches(model, tokens, mask, device, batch_size, progress)])


@torch.no_grad()
def extract_features(model, loader: Iterable[Batch], device: torch.device | str, progress: bool = False):
    """Encode each clip once and every caption.

    Returns (VideoFeatures of the clips in first-seen order, TextFeatures of all captions in loader
    order, text_to_video (num_texts,) long index into the clips). Clips are told apart by
    `Batch.video_index`. Features stay on `device`.
    """
    videos, texts, text_to_video, _ = _encode(model, loader, device, texts=True, progress=progress)
    return videos, texts, text_to_video


def contrastive_similarity(videos, texts, video_feature: str) -> torch.Tensor:
    """(num_texts, num_videos) VTC cosine similarity in float32 (also under autocast, which would round
    it to bf16 and make ties that count against the model); video_feature as loss.vtc_video_feature."""
    return sentence_similarity(videos, texts.sentence, video_feature)


def sentence_similarity(videos, sentences: torch.Tensor, video_feature: str) -> torch.Tensor:
    """`contrastive_similarity` of sentence features (num_texts, E)."""
    return embedding_similarity(sentences, clip_embeddings(videos, video_feature))


def clip_embeddings(videos, video_feature: str, chunk: int = 4096) -> torch.Tensor:
    """(num_videos, E) float32 L2-normalised clip embeddings that the VTC cosine compares sentences
    with (`video_embedding` of loss.vtc_video_feature), on the videos' device, computed `chunk` videos
    at a time so that the normalised frames are never held for every video at once."""
    frames, video = videos.frames, videos.video
    with torch.autocast(video.device.type, enabled=False):
        parts = [video_embedding(frames[start : start + chunk].float(), video[start : start + chunk].float(),
                                 video_feature) for start in range(0, len(video), chunk)]
        return torch.cat(parts) if parts else video_embedding(frames.float(), video.float(), video_feature)


def sentence_similarity_blocks(videos, sentences: torch.Tensor, video_feature: str,
                               block_rows: int) -> Iterator[torch.Tensor]:
    """`sentence_similarity` of sentence features (N, E), `block_rows` sentences at a time: (b, num_videos)
    blocks on the videos' device, so that a query bank's whole matrix (200k captions x 10k videos: 8 GB
    in float32) is never held."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    embeddings = clip_embeddings(videos, video_feature)  # (num_videos, E)
    for start in range(0, len(sentences), block_rows):
        yield embedding_similarity(sentences[start : start + block_rows], embeddings)


def embedding_similarity(sentences: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """(num_texts, num_videos) float32 cosine of sentence features (num_texts, E) and `embeddings`
    (num_videos, E), already L2-normalised (as `clip_embeddings` returns them)."""
    with torch.autocast(sentences.device.type, enabled=False):
        return F.normalize(sentences.float(), dim=-1) @ embeddings.float().t()


@torch.no_grad()
def match_log_odds(
    model, videos, texts, text_index: torch.Tensor, video_index: torch.Tensor, batch_size: int = 256,
    progress: bool = False, work: str = "matching pairs",
) -> torch.Tensor:
    """log P(matched) - log P(not matched) from the fusion encoder's matching head for the pairs
    (text_index[i], video_index[i]), float64 (n,). Scores rank by these rather than by the probability,
    which float32 rounds to 1.0 for every pair past log-odds of about 17. `work` names the bar shown
    with `progress`."""
    was_training = model.training
    model.eval()
    device = videos.video.device
    log_odds = []
    for start in tqdm(range(0, len(text_index), batch_size), desc=work, unit="batch", disable=not progress):
        t = text_index[start : start + batch_size].to(device)
        v = video_index[start : start + batch_size].to(device)
        fused = model.fuse(videos.index_select(v), texts.tokens[t], texts.mask[t], mode="bidirectional")
        logits = model.match_logits(fused).double()  # (n, 2) [not matched, matched]
        log_odds.append((logits[:, 1] - logits[:, 0]).cpu())
    model.train(was_training)
    return torch.cat(log_odds) if log_odds else torch.zeros(0, dtype=torch.float64)


def match_probability(model, videos, texts, text_index: torch.Tensor, video_index: torch.Tensor, **kwargs) -> torch.Tensor:
    """P(matched) for the pairs of `match_log_odds` (same arguments), float64 (n,)."""
    return torch.sigmoid(match_log_odds(model, videos, texts, text_index, video_index, **kwargs))


def logit_scale_value(model) -> float:
    """exp(logit_scale), clamped at 100 like CLIP (`clamped_scale`, as in the VTC loss)."""
    return float(clamped_scale(model.logit_scale.detach()))


def rerank_similarities(
    model, videos, texts, similarity: torch.Tensor, k: int, batch_size: int = 256, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fusion re-ranking of the contrastive top-k in both directions.

    Returns (t2v scores (num_texts, num_videos), v2t scores (num_videos, num_texts)); each query's
    top-k are ordered by softmax_k(logit_scale * cosine) * P(matched) (as logs) and placed above its
    other candidates.
    """
    scale = logit_scale_value(model)

    def text_queries(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        work = f"re-ranking top-{k} t2v pairs"
        return F.logsigmoid(match_log_odds(model, videos, texts, t, v, batch_size, progress, work))

    def video_queries(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        work = f"re-ranking top-{k} v2t pairs"
        return F.logsigmoid(match_log_odds(model, videos, texts, t, v, batch_size, progress, work))

    t2v = rerank_top_k(similarity, k, text_queries, prior_scale=scale)
    v2t = rerank_top_k(similarity.t(), k, video_queries, prior_scale=scale)
    return t2v, v2t


def retrieval_metric_names(rerank: bool = False, dual_softmax: bool = False, qb_norm: bool = False) -> set[str]:
    """The recalls (higher is better) that `retrieval_metrics_of_features` can give with these options:
    "t2v_r1" ... and "v2t_..." always, the grouped video-to-text ("v2t_grouped_...") where a video has
    several captions, and the "_dsl", "_qb" and "_rerank" variants of dual softmax, QB-Norm (text to
    video only) and fusion re-ranking."""
    t2v, v2t = ["t2v"], ["v2t", "v2t_grouped"]
    if dual_softmax:
        t2v, v2t = t2v + ["t2v_dsl"], v2t + ["v2t_dsl", "v2t_dsl_grouped"]
    if qb_norm:
        t2v = t2v + ["t2v_qb"]
    if rerank:
        t2v, v2t = t2v + ["t2v_rerank"], v2t + ["v2t_rerank", "v2t_rerank_grouped"]
    return {f"{prefix}_r{k}" for prefix in t2v + v2t for k in RECALL_AT}


def retrieval_metrics_of_features(
    model,
    videos,
    texts,
    text_to_video: torch.Tensor,
    rerank_k: int = 0,
    dual_softmax_scale: float | None = None,
    video_feature: str = "mean",
    pair_batch_size: int = 256,
    querybank=None,
    qb_norm_beta: float = 20.0,
    progress: bool = False,
    querybank_block: int = 8192,
) -> dict[str, float]:
    """Metrics from encoded videos and captions (see `evaluate_retrieval` for the keys); with
    `querybank` ((B, E) sentence features of the training captions, `encode_sentences`), also
    "t2v_qb_..." after QB-Norm, its similarity to the videos computed `querybank_block` bank rows at a
    time."""
    similarity = contrastive_similarity(videos, texts, video_feature).cpu()
    metrics = retrieval_metrics(similarity, text_to_video, dual_softmax_scale)
    if querybank is not None:
        bank_blocks = sentence_similarity_blocks(videos, querybank, video_feature, querybank_block)
        normalised = querybank_normalise_blocks(similarity, bank_blocks, qb_norm_beta)
        t2v = retrieval_metrics(normalised, text_to_video, directions=("t2v",))
        metrics.update({k.replace("t2v_", "t2v_qb_"): v for k, v in t2v.items()})
    if rerank_k > 0:
        t2v, v2t = rerank_similarities(model, videos, texts, similarity, rerank_k, pair_batch_size, progress)
        reranked_t2v = retrieval_metrics(t2v, text_to_video, directions=("t2v",))
        reranked_v2t = retrieval_metrics(v2t.t(), text_to_video, directions=("v2t",))
        metrics.update({k.replace("t2v_", "t2v_rerank_"): v for k, v in reranked_t2v.items()})
        metrics.update({k.replace("v2t_", "v2t_rerank_"): v for k, v in reranked_v2t.items()})
    metrics["num_texts"] = float(len(text_to_video))
    metrics["num_videos"] = float(videos.video.shape[0])
    return metrics


def evaluate_retrieval(
    model,
    loader: Iterable[Batch],
    device: torch.device | str,
    rerank_k: int = 0,
    dual_softmax_scale: float | None = None,
    video_feature: str = "mean",
    pair_batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Retrieval metrics of `model` on the captions and videos of `loader` (one row per caption).

    Keys "t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "t2v_mnr" and "v2t_..." come from the
    contrastive similarity; with `rerank_k` > 0, "t2v_rerank_..." and "v2t_rerank_..." from the
    fusion re-ranking of each query's top-k; with `dual_softmax_scale`, "t2v_dsl_..." and
    "v2t_dsl_..." from dual softmax on the contrastive similarity. Also "num_texts", "num_videos".
    """
    videos, texts, text_to_video = extract_features(model, loader, device, progress)
    return retrieval_metrics_of_features(
        model, videos, texts, text_to_video, rerank_k, dual_softmax_scale, video_feature, pair_batch_size,
        progress=progress,
    )


def records_text_to_video(records) -> torch.Tensor:
    """(num_texts,) long: the record of each caption, the captions of the records taken in order (the
    queries of `evaluate_retrieval_records`)."""
    return torch.tensor([i for i, record in enumerate(records) for _ in record.captions], dtype=torch.long)


def evaluate_retrieval_records(
    model,
    video_loader: Iterable[Batch],
    records,
    tokenizer: Tokenizer,
    device,
    rerank_k: int = 0,
    dual_softmax_scale: float | None = None,
    video_feature: str = "mean",
    pair_batch_size: int = 256,
    querybank_captions: list[str] | None = None,
    qb_norm_beta: float = 20.0,
    progress: bool = False,
) -> dict[str, float]:
    """Like `evaluate_retrieval`, but decodes each record's clip once (`video_loader` has one row per
    record, in record order) and takes every caption of every record as a query; with
    `querybank_captions` (e.g. the training captions), also QB-Norm's "t2v_qb_..." numbers. A clip
    listed twice is refused (`require_distinct_clips`)."""
    require_distinct_clips(records)
    ids, videos = encode_videos(model, video_loader, device, progress)
    if ids != [record.video_id for record in records]:
        raise ValueError("the video loader must hold one row per record, in record order")
    captions = [caption for record in records for caption in record.captions]
    text_to_video = records_text_to_video(records)
    tokens, mask = tokenizer(captions)
    texts = encode_texts(model, tokens, mask, device, pair_batch_size, progress)
    querybank = None
    if querybank_captions is not None:
        querybank = encode_sentences(model, *tokenizer(querybank_captions), device, pair_batch_size, progress)
    return retrieval_metrics_of_features(
        model, videos, texts, text_to_video, rerank_k, dual_softmax_scale, video_feature, pair_batch_size,
        querybank, qb_norm_beta, progress,
    )
