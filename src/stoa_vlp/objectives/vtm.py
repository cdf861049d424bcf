"""Video-text matching (VTM) with hard negatives drawn from the global similarity (ALBEF style).

For each caption of this rank a negative video, and for each video of this rank a negative
caption, is drawn from the whole (all-gathered) batch with probability softmax(scaled
similarity) over the non-positives: a sample of the same video id has probability 0. A row whose
every candidate is a positive (the whole global batch shows one video) has no negative; its
negative pair gets weight 0 (explicitly flagged), so that step scores its positive pair and the
other rows' negatives only.
Draws use torch's RNG on the similarity's device, so a seeded run repeats exactly. They use the
exponential-race form of sampling, argmax(p / q) with q ~ Exp(1), which is what
`torch.multinomial(p, 1)` computes (the same draws) minus the validity check that older torch
versions make with a host sync.

The fusion encoder runs bidirectionally on [positives; caption-negatives; video-negatives]
(3B pairs, fixed shapes: no host sync; `vtm_rows`), in the pre-training step together with the
MLM and PLM rows, and `model.match_logits` gives the 2-way logits; the loss is the mean
cross-entropy over the pairs of weight 1 (`vtm_loss_from_fused`). Negatives from other ranks come
through `gather_features`, with gradient, so their owning rank's towers get the gradient as on one
rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stoa_vlp.model.stoa import FusionOutput
from stoa_vlp.objectives.distributed import global_mean, map_tensor_fields
from stoa_vlp.objectives.fusion_rows import FusionRows, concat_rows, fuse_rows


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative column per row of `similarity` (B, G) ∝ softmax over the non-positive columns.

    Returns (column index (B,) long, has_negative (B,) bool); the index of a row without any
    non-positive column is meaningless and must be masked out with `has_negative`.
    """
    has_negative = ~positives.all(dim=1)
    logits = similarity.float().masked_fill(positives, float("-inf"))
    # rows without a candidate get uniform weights so multinomial accepts them; they are masked out
    logits = logits.masked_fill(~has_negative[:, None], 0.0)
    probabilities = torch.softmax(logits, dim=1)
    race = torch.empty_like(probabilities).exponential_(1.0)  # (B, G)
    # a race time of exactly 0 would make a positive's 0 / 0 a NaN, which argmax takes for the largest
    return (probabilities / race).masked_fill(positives, -1.0).argmax(dim=1), has_negative


def select_rows(features, index: torch.Tensor):
    return map_tensor_fields(lambda tensor: tensor.index_select(0, index), features)


def vtm_rows(video, text, all_video, all_text, negative_video, negative_text) -> FusionRows:
    """The 3B pairs to fuse: [positives; (negative video, caption); (video, negative caption)].

    video, text: this rank's VideoFeatures / TextFeatures (B rows); all_video, all_text: gathered
    over ranks (W*B rows). negative_video: (index (B,), valid (B,)) into all_video, one per caption;
    negative_text: (index, valid) into all_text, one per video.
    """
    pair_video = concat_rows([video, select_rows(all_video, negative_video[0]), video])
    pair_text = concat_rows([text, text, select_rows(all_text, negative_text[0])])
    return FusionRows(pair_video, pair_text.tokens, pair_text.mask, prefix=False)


def vtm_loss_from_fused(model, fused: FusionOutput, video_valid: torch.Tensor, text_valid: torch.Tensor):
    """2-way matching cross-entropy over the fused pairs of `vtm_rows` (mean over every rank's pairs,
    `global_mean`); a pair whose negative is not valid (video_valid / text_valid False) weighs 0."""
    logits = model.match_logits(fused)  # (3B, 2)
    positives = torch.ones_like(video_valid)
    labels = torch.cat([positives, torch.zeros_like(video_valid), torch.zeros_like(text_valid)]).long()
    weights = torch.cat([positives, video_valid, text_valid]).float()
    pair_losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return global_mean((pair_losses * weights).sum(), weights.sum())


def vtm_loss(model, video, text, all_video, all_text, negative_video, negative_text) -> torch.Tensor:
    """2-way matching cross-entropy on B positive pairs and 2B hard-negative pairs, fused on their own."""
    fused = fuse_rows(model, vtm_rows(video, text, all_video, all_text, negative_video, negative_text))
    return vtm_loss_from_fused(model, fused, negative_video[1], negative_text[1])
