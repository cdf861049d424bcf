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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

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
    Returns (Q,) long. Scores are compared in float64, so that no rounding makes a tie; the matrix is
    read `RANK_BLOCK_PAIRS` scores at a time, never copied whole.
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ")
    return _blocked_ranks(_BlockedScores(similarity, device=similarity.device), positives)


# Scores per block when ranking (1M: 8 MiB in float64). Ranks, dual softmax and the grouped video-to-text
# scores are computed a block of rows at a time: a float64 copy of MSR-VTT's full 59,800 x 2,990 matrix
# takes 1.4 GB, and the unblocked code held several such copies.
RANK_BLOCK_PAIRS = 1 << 20


def _blocks(length: int, width: int) -> Iterator[slice]:
    """Consecutive slices of range(length), each of about RANK_BLOCK_PAIRS / width indices (at least one)."""
    step = max(1, RANK_BLOCK_PAIRS // max(1, width))
    for start in range(0, length, step):
        yield slice(start, min(start + step, length))


@dataclass
class _BlockedScores:
    """The scores to rank, materialised a block at a time: `matrix` (R, K) itself, or with `scale` its
    dual softmax over dim 0 (over the rows of the same column), as `dual_softmax` computes it."""

    matrix: torch.Tensor  # (R, K), any dtype and device; a view such as similarity.t() is fine
    device: torch.device | str = "cpu"  # where the float64 blocks are computed
    scale: float | None = None
    column_max: torch.Tensor | None = None  # (K,) float64: max over the rows of scale * matrix
    column_sum: torch.Tensor | None = None  # (K,) float64: sum over the rows of exp(scale * matrix - column_max)

    @classmethod
    def dual_softmax(cls, matrix: torch.Tensor, scale: float) -> "_BlockedScores":
        """Reads `matrix` twice (column maxima, then column sums) to get the softmax denominators."""
        column_max = torch.full((matrix.shape[1],), -math.inf, dtype=torch.float64)
        for rows in _blocks(matrix.shape[0], matrix.shape[1]):
            scaled = _float64(matrix[rows], "cpu") * scale  # (b, K)
            column_max = torch.maximum(column_max, scaled.amax(dim=0))
        column_sum = torch.zeros_like(column_max)
        for rows in _blocks(matrix.shape[0], matrix.shape[1]):
            exponentials = (_float64(matrix[rows], "cpu") * scale).sub_(column_max).exp_()  # (b, K)
            column_sum += exponentials.sum(dim=0)
        return cls(matrix, "cpu", scale, column_max, column_sum)

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    def block(self, rows: slice = slice(None), columns: slice = slice(None)) -> torch.Tensor:
        """(rows, columns) of the scores in float64 on `device`: a view of `matrix` where that is float64
        there already, so never to be written into."""
        scores = _float64(self.matrix[rows, columns], self.device)  # (b, k)
        if self.scale is None:
            return scores
        # s * softmax: the same formula as torch.softmax; only the order of the column sums differs
        softmax = (scores * self.scale).sub_(self.column_max[columns]).exp_().div_(self.column_sum[columns])
        return softmax.mul_(scores)


def _float64(scores: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return scores.to(device=device, dtype=torch.float64)


def _blocked_ranks(scores: _BlockedScores, positives: torch.Tensor) -> torch.Tensor:
    """`ranks` of scores (Q, C) against positives (Q, C) bool, a block of rows at a time. (Q,) long."""
    if not bool(positives.any(dim=1).all()):
        missing = torch.nonzero(~positives.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"queries without a positive candidate (first: {missing})")
    num_queries, num_candidates = scores.shape
    query_ranks, num_nan = [], 0
    for rows in _blocks(num_queries, num_candidates):
        block = scores.block(rows)  # (b, C) float64
        is_negative = ~positives[rows].to(block.device)  # (b, C)
        not_a_number = block.isnan()
        block_nan = int(not_a_number.count_nonzero())
        if block_nan:
            num_nan += block_nan
            block = block.masked_fill(not_a_number, float("-inf"))
        del not_a_number
        best_positive = block.masked_fill(is_negative, float("-inf")).max(dim=1, keepdim=True).values  # (b, 1)
        beaten_or_tied = (block >= best_positive).logical_and_(is_negative)  # (b, C)
        query_ranks.append(1 + beaten_or_tied.count_nonzero(dim=1))
    if num_nan:
        log.warning("%d of %d similarity scores are NaN; they rank below every other score",
                    num_nan, num_queries * num_candidates)
    if not query_ranks:
        return torch.zeros(0, dtype=torch.long, device=positives.device)
    return torch.cat(query_ranks)


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
    starts = range(0, bank_similarity.shape[0], chunk_rows)
    return querybank_normalise_blocks(similarity, (bank_similarity[i : i + chunk_rows] for i in starts), beta)


def querybank_normalise_blocks(
    similarity: torch.Tensor, bank_blocks: Iterable[torch.Tensor], beta: float = 20.0
) -> torch.Tensor:
    """`querybank_normalise` of a bank similarity given as consecutive blocks of its rows, each (b, C) on
    any device, so that the caller can compute them one at a time and never hold the (B, C) matrix."""
    similarity = similarity.double()
    activated = torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    log_bank_sum = torch.full((similarity.shape[1],), -math.inf, dtype=torch.float64, device=similarity.device)
    for block in bank_blocks:
        block = block.to(similarity.device, torch.float64)  # (b, C)
        activated[block.argmax(dim=1)] = True  # candidates some bank query retrieves first
        log_bank_sum = torch.logaddexp(log_bank_sum, torch.logsumexp(beta * block, dim=0))
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
    similarity = similarity.detach()  # (T, V), read a block at a time in float64 on the CPU
    num_videos = similarity.shape[1]
    positives = positive_mask(text_to_video, num_videos)
    if not bool(positives.any(dim=0).all()):
        missing = torch.nonzero(~positives.any(dim=0)).flatten()[:5].tolist()
        raise ValueError(f"videos without any caption (first: {missing})")
    captions_per_video = torch.bincount(torch.as_tensor(text_to_video, dtype=torch.long), minlength=num_videos)
    several_captions = bool((captions_per_video > 1).any())
    oriented = {"t2v": (similarity, positives), "v2t": (similarity.t(), positives.t())}
    metrics: dict[str, float] = {}
    for name in directions:
        matrix, mask = oriented[name]
        variants = {name: lambda: _BlockedScores(matrix)}
        if dual_softmax_scale is not None:
            variants[f"{name}_dsl"] = lambda: _BlockedScores.dual_softmax(matrix, dual_softmax_scale)
        for prefix, make_scores in variants.items():
            scores = make_scores()  # one variant at a time: no (T, V) matrix is materialised
            metrics.update(prefixed(prefix, rank_metrics(_blocked_ranks(scores, mask))))
            if name == "v2t" and several_captions:
                grouped = _best_caption_per_video(scores.block, scores.shape[1], text_to_video, num_videos)
                grouped_ranks = _blocked_ranks(_BlockedScores(grouped), torch.eye(num_videos, dtype=torch.bool))
                metrics.update(prefixed(f"{prefix}_grouped", rank_metrics(grouped_ranks)))
    return metrics


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in metrics.items()}


def best_caption_per_video(video_to_text: torch.Tensor, text_to_video: torch.Tensor, num_videos: int) -> torch.Tensor:
    """(num_videos, num_videos) video-to-text scores with each video's captions as one candidate:
    entry [i, j] is the best score of video j's captions for video i, so a video ranks among
    videos (CLIP4Clip's multi-sentence video-to-text). video_to_text: (num_videos, num_texts)."""
    return _best_caption_per_video(
        lambda columns: video_to_text[:, columns], video_to_text.shape[1], text_to_video, num_videos,
        dtype=video_to_text.dtype,
    )


def _best_caption_per_video(
    video_to_text_columns: Callable[..., torch.Tensor],
    num_texts: int,
    text_to_video: torch.Tensor,
    num_videos: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """`best_caption_per_video` of a (num_videos, num_texts) matrix given by its column blocks:
    video_to_text_columns(columns=slice) -> (num_videos, b). Reads a block of captions at a time."""
    groups_of_texts = torch.as_tensor(text_to_video, dtype=torch.long)  # (num_texts,)
    grouped = torch.full((num_videos, num_videos), float("-inf"), dtype=dtype)  # (group, video)
    for columns in _blocks(num_texts, num_videos):
        text_to_video_scores = nan_lowest(video_to_text_columns(columns=columns).t()).to("cpu", dtype)  # (b, V)
        groups = groups_of_texts[columns, None].expand_as(text_to_video_scores)
        grouped.scatter_reduce_(0, groups, text_to_video_scores, "amax")
    return grouped.t()


def top_k_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, k) columns of the k highest of each row of scores (Q, C, no NaN), in column order; where scores
    tie at the k-th, the lowest columns (torch.topk's own cut among them depends on the row's length and
    the device). Rows with such a tie are stably sorted whole; the others keep topk's choice."""
    num_columns = scores.shape[1]
    top = scores.topk(min(k + 1, num_columns), dim=1)  # one past the cut, to see a tie across it
    columns = top.indices[:, :k]  # (Q, k)
    if k < num_columns:
        tied_at_cut = (top.values[:, k - 1] == top.values[:, k]).nonzero().flatten()  # (R,) rows
        columns[tied_at_cut] = scores[tied_at_cut].sort(dim=1, descending=True, stable=True).indices[:, :k]
    return columns.sort(dim=1).values


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
    re-scored only where fewer than k are finite). Where candidates tie at the k-th score, those of
    the lowest columns are re-scored (`top_k_columns`). Returns a new (Q, C) float64 matrix.
    """
    num_queries, num_candidates = similarity.shape
    k = min(k, num_candidates)
    reranked = nan_lowest(similarity.detach().double().cpu())
    if k <= 0 or num_queries == 0:
        return reranked
    top = top_k_columns(reranked, k)  # (Q, k)
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
