"""Text-video retrieval metrics from a similarity matrix.

Rank definition (tie-robust: a tie counts against the model). For a query with score row s and a
set P of positive candidates (one video for a caption; all captions of a video for a video):

    rank = 1 + #{c not in P : s[c] >= max_{p in P} s[p]}

So rank 1 means the best positive is strictly above every negative; other positives never count
against the query (the MSR-VTT full protocol: video-to-text takes the best-ranked of the video's
captions). A constant similarity matrix gives every query the worst rank, not the best, and a NaN
score (a diverged model, an fp16 overflow) counts as the lowest score there is, with a warning.

Recalls R@1/5/10 are percentages of queries with rank <= K; MdR is the median rank (numpy's median,
the mean of the two middle ranks for an even count), MnR the mean rank.

Dual-softmax re-ranking (CLIP4Clip's DSL) multiplies each similarity by a softmax over the
queries of the same candidate; it is always reported next to the plain numbers, never instead.
So is QB-Norm (Bogolin et al., CVPR 2022) with its dynamic inverted softmax: a query whose top
candidate is the top candidate of some query in a bank of training queries gets its scores
divided, per candidate, by the sum over the bank of exp(beta * bank similarity); this demotes
"hub" candidates that many queries retrieve. Other queries keep their scores.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


def positive_mask(text_to_video: torch.Tensor, num_videos: int) -> torch.Tensor:
    """(num_texts, num_videos) bool, True where the caption belongs to the video."""
    text_to_video = torch.as_tensor(text_to_video, dtype=torch.long)
    if text_to_video.numel() and (text_to_video.min() < 0 or text_to_video.max() >= num_videos):
        raise ValueError(f"text_to_video holds indices outside [0, {num_videos})")
    mask = torch.zeros(len(text_to_video), num_videos, dtype=torch.bool)
    mask[torch.arange(len(text_to_video)), text_to_video] = True
    return mask


def ranks(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Tie-robust rank (1-based) of the best positive of each query.

    similarity: (Q, C) scores, higher = more similar; positives: (Q, C) bool.
    Returns (Q,) long. Scores are compared in float64, so that no rounding makes a tie.
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ")
    if not bool(positives.any(dim=1).all()):
        missing = torch.nonzero(~positives.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"queries without a positive candidate (first: {missing})")
    similarity = similarity.double()
    not_a_number = similarity.isnan()
    if bool(not_a_number.any()):
        log.warning("%d of %d similarity scores are NaN; they rank below every other score",
                    int(not_a_number.sum()), not_a_number.numel())
        similarity = similarity.masked_fill(not_a_number, float("-inf"))
    best_positive = similarity.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    beaten_or_tied = (similarity >= best_positive) & ~positives
    return 1 + beaten_or_tied.sum(dim=1)


def nan_lowest(scores: torch.Tensor) -> torch.Tensor:
    """`scores` with NaN made -inf, the lowest score there is, as `ranks` takes it (torch's sort and
    topk take NaN for the largest)."""
    return scores.masked_fill(scores.isnan(), float("-inf"))


def rank_metrics(query_ranks: torch.Tensor) -> dict[str, float]:
    """Keys r1, r5, r10 (R@K in percent), mdr (median rank) and mnr (mean rank) of 1-based ranks."""
    values = query_ranks.detach().cpu().numpy().astype(np.float64)
    metrics = {f"r{k}": float(100.0 * np.mean(values <= k)) for k in RECALL_AT}
    metrics["mdr"] = float(np.median(values))
    metrics["mnr"] = float(np.mean(values))
    return metrics


def dual_softmax(similarity: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """CLIP4Clip's dual-softmax: s * softmax over the queries (dim 0) of scale * s. (Q, C) -> (Q, C),
    float64: in float32, exp(scale * s) underflows to 0 beyond a cosine gap of about 1 and makes ties."""
    similarity = similarity.double()
    return similarity * torch.softmax(similarity * scale, dim=0)


def querybank_normalise(
    similarity: torch.Tensor, bank_similarity: torch.Tensor, beta: float = 20.0, chunk_rows: int = 8192
) -> torch.Tensor:
    """QB-Norm's dynamic inverted softmax. similarity (Q, C), bank_similarity (B, C) of the bank's
    queries to the same candidates -> (Q, C) scores to rank by.

    A query whose top-1 candidate is the top-1 of some bank query gets beta * s - log sum_b
    exp(beta * bank[b]) per candidate (the log of QB-Norm's exp-ratio, so the same ranking without
    overflow); every other query keeps its row. The bank is read `chunk_rows` rows at a time (in
    float64; the same scores up to float64 rounding): MSR-VTT's 180k training captions x 3k videos
    would take 4 GB per float64 copy.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    similarity = similarity.double()
    activated = torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    log_bank_sum = torch.full((similarity.shape[1],), -math.inf, dtype=torch.float64, device=similarity.device)
    for start in range(0, bank_similarity.shape[0], chunk_rows):
        chunk = bank_similarity[start : start + chunk_rows].to(similarity.device, torch.float64)  # (b, C)
        activated[chunk.argmax(dim=1)] = True  # candidates some bank query retrieves first
        log_bank_sum = torch.logaddexp(log_bank_sum, torch.logsumexp(beta * chunk, dim=0))
    normalised = beta * similarity - log_bank_sum  # (Q, C)
    rows = activated[similarity.argmax(dim=1)]  # (Q,)
    return torch.where(rows[:, None], normalised, similarity)


def retrieval_metrics(
    similarity: torch.Tensor,
    text_to_video: torch.Tensor,
    dual_softmax_scale: float | None = None,
    directions: tuple[str, ...] = ("t2v", "v2t"),
) -> dict[str, float]:
    """Metrics of each of `directions` from a (num_texts, num_videos) similarity matrix.

    text_to_video: (num_texts,) index of each caption's video. Several captions per video give the
    MSR-VTT full protocol; one caption per video the 1k-A protocol. Keys: "t2v_r1", "t2v_r5",
    "t2v_r10", "t2v_mdr", "t2v_mnr" and the same for "v2t"; with `dual_softmax_scale`, also
    "t2v_dsl_r1", ... and "v2t_dsl_..." computed from the same matrix. Where a video has several
    captions, also "v2t_grouped_..." (and "v2t_dsl_grouped_..."): a video ranked among videos by
    their best caption (`best_caption_per_video`), as CLIP4Clip-derived papers report video-to-text
    on MSVD and the full MSR-VTT test; "v2t_..." ranks it among captions, so that another video's
    20 captions can all count against it.
    """
    similarity = similarity.detach().double().cpu()
    num_videos = similarity.shape[1]
    positives = positive_mask(text_to_video, num_videos)
    if not bool(positives.any(dim=0).all()):
        missing = torch.nonzero(~positives.any(dim=0)).flatten()[:5].tolist()
        raise ValueError(f"videos without any caption (first: {missing})")
    several_captions = bool((positives.sum(dim=0) > 1).any())
    oriented = {"t2v": (similarity, positives), "v2t": (similarity.t(), positives.t())}
    metrics: dict[str, float] = {}
    for name in directions:
        scores, mask = oriented[name]
        variants = {name: scores}
        if dual_softmax_scale is not None:
            variants[f"{name}_dsl"] = dual_softmax(scores, dual_softmax_scale)
        for prefix, values in variants.items():
            metrics.update(prefixed(prefix, rank_metrics(ranks(values, mask))))
            if name == "v2t" and several_captions:
                grouped = best_caption_per_video(values, text_to_video, num_videos)
                metrics.update(prefixed(f"{prefix}_grouped", rank_metrics(ranks(grouped, torch.eye(num_videos, dtype=torch.bool)))))
    return metrics


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in metrics.items()}


def best_caption_per_video(video_to_text: torch.Tensor, text_to_video: torch.Tensor, num_videos: int) -> torch.Tensor:
    """(num_videos, num_videos) video-to-text scores with each video's captions as one candidate:
    entry [i, j] is the best score of video j's captions for video i, so a video ranks among
    videos (CLIP4Clip's multi-sentence video-to-text). video_to_text: (num_videos, num_texts)."""
    text_to_video_scores = nan_lowest(video_to_text.t())  # (num_texts, num_videos)
    groups = torch.as_tensor(text_to_video, dtype=torch.long)[:, None].expand_as(text_to_video_scores)
    grouped = torch.full((num_videos, video_to_text.shape[0]), float("-inf"), dtype=video_to_text.dtype)
    return grouped.scatter_reduce_(0, groups, text_to_video_scores, "amax").t()


def rerank_top_k(
    similarity: torch.Tensor,
    k: int,
    pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prior_scale: float | None = None,
) -> torch.Tensor:
    """Re-score the top-k candidates of every query; all other entries keep their value.

    similarity: (Q, C). pair_scores(query_index (n,), candidate_index (n,)) -> (n,) new log-scores for
    those pairs (higher = better), e.g. the matching head's log P(matched). With `prior_scale`, the
    new score is log softmax_k(prior_scale * similarity) + pair score: the log of the reference code's
    fusion score softmax_k * P(matched), the softmax taken over the query's top-k. Working with logs
    in float64 keeps apart the small products that float32 rounds to one value. In each row the
    re-scored top-k are then placed, in the order of their new scores (equal scores stay equal),
    strictly above the row's untouched entries, so re-ranking only reorders the top-k among
    themselves; a NaN new score goes last among them, and a NaN similarity is the lowest score (it is
    re-scored only where fewer than k are finite). Where candidates tie at the k-th score, which of
    them are re-scored is torch.topk's cut, set by their columns (not always the first ones). Returns
    a new (Q, C) float64 matrix.
    """
    num_queries, num_candidates = similarity.shape
    k = min(k, num_candidates)
    reranked = nan_lowest(similarity.detach().double().cpu())
    if k <= 0 or num_queries == 0:
        return reranked
    top = reranked.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(num_queries).unsqueeze(1).expand(-1, k)
    new_scores = pair_scores(queries.reshape(-1), top.reshape(-1)).detach().double().cpu().view(num_queries, k)
    if prior_scale is not None:
        new_scores = new_scores + torch.log_softmax(prior_scale * reranked.gather(1, top), dim=1)
    new_scores = new_scores.nan_to_num(nan=float("-inf"), posinf=float("inf"))
    # positions of the new scores in the sorted distinct values of all rows: their order within a
    # row, equal scores sharing a position, as small exact integers
    positions = torch.unique(new_scores, return_inverse=True)[1].double()  # (Q, k)
    rest = reranked.scatter(1, top, float("-inf"))
    rest_max = rest.max(dim=1, keepdim=True).values  # (Q, 1), -inf when k == C
    rest_max = torch.where(torch.isinf(rest_max), torch.zeros_like(rest_max), rest_max)
    reranked.scatter_(1, top, rest_max + 1.0 + positions)
    return reranked
