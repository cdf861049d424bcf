"""Video-text contrastive loss (VTC): symmetric InfoNCE over the all-gathered global batch.

Decisions (docs/decisions.md, "Pre-training objectives", open point §6.5):
- VTC is an ordinary objective with a config weight, in every step (the reference code adds it in
  epoch 0 only, behind a flag its README does not pass).
- Video feature, `loss.vtc_video_feature`: "mean" is CLIP4Clip's meanP as in the reference
  (mean of the L2-normalised frame features); "sep" is `VideoFeatures.video`, the mean of the
  unnormalised frame features, which is what the fusion encoder receives in its video-SEP slot.
  Both are L2-normalised before the dot product, like the caption's end-token feature.
- Temperature: exp(model.logit_scale) clamped at 100 inside the loss (`clamp(max=100)` on the
  exp). Past the bound the scale gets no gradient, the same effect as CLIP's clamp of the
  parameter after each step, without touching the parameter.
- Several captions of one video: every caption of the video is a positive (equal global video
  ids, not the diagonal). The target of a row is the uniform distribution over its positives,
  i.e. the loss is minus the mean log-probability of the positives (soft-target cross-entropy).
  With one positive per row this is plain InfoNCE.
- Across ranks: features are all-gathered with gradient as in open_clip's ClipLoss
  (`gather_with_grad=True`). Without `local_loss` every rank scores the global matrix; with it,
  each rank scores its own rows against all columns (less compute, the same gradient under DDP
  averaging when ranks hold equal batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stoa_vlp.objectives.distributed import gather_rows, global_video_index

MAX_LOGIT_SCALE = 100.0
VIDEO_FEATURES = ("mean", "sep")


def video_embedding(frames: torch.Tensor, video: torch.Tensor, kind: str) -> torch.Tensor:
    """L2-normalised clip embedding (B, E) from frame features (B, T, E) and their mean (B, E)."""
    if kind == "mean":
        return F.normalize(F.normalize(frames, dim=-1).mean(dim=1), dim=-1)
    if kind == "sep":
        return F.normalize(video, dim=-1)
    raise ValueError(f"loss.vtc_video_feature must be one of {VIDEO_FEATURES}, got {kind!r}")


@dataclass
class ContrastiveEmbeddings:
    """Normalised embeddings of this rank and of all ranks, with globally unique video ids."""

    video: torch.Tensor  # (B, E) this rank
    text: torch.Tensor  # (B, E) this rank
    video_index: torch.Tensor  # (B,) long
    all_video: torch.Tensor  # (W*B, E), rank order
    all_text: torch.Tensor  # (W*B, E)
    all_video_index: torch.Tensor  # (W*B,) long

    @classmethod
    def gather(cls, video: torch.Tensor, text: torch.Tensor, video_index: torch.Tensor) -> "ContrastiveEmbeddings":
        local_index, all_index = global_video_index(video_index)
        return cls(video, text, local_index, gather_rows(video), gather_rows(text), all_index)

    def positives(self) -> torch.Tensor:
        """(B, W*B) bool: this rank's row i and global column j show the same video."""
        return self.video_index[:, None] == self.all_video_index[None, :]


def clamped_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def scaled_similarity(scale: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """scale x rows @ columns.T, in float32 under any autocast: bf16 logits near scale 100 are 0.5
    apart, which put 2% of error in the contrastive gradient and up to 24% in hard-negative
    probabilities. One (B, W*B) product, cheap in float32."""
    with torch.autocast(rows.device.type, enabled=False):
        return scale.float() * (rows.float() @ columns.float().T)


def multi_positive_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -mean_{j in positives(i)} log softmax(logits_i)_j. Every row needs a positive."""
    target = positives.float() / positives.sum(dim=1, keepdim=True)
    return F.cross_entropy(logits, target)


def vtc_loss(embeddings: ContrastiveEmbeddings, logit_scale: torch.Tensor, local_loss: bool) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE; the mean of the text-to-video and video-to-text terms."""
    scale = clamped_scale(logit_scale)
    if local_loss:
        positives = embeddings.positives()  # (B, W*B)
        text_to_video = scaled_similarity(scale, embeddings.text, embeddings.all_video)
        video_to_text = scaled_similarity(scale, embeddings.video, embeddings.all_text)
    else:
        index = embeddings.all_video_index
        positives = index[:, None] == index[None, :]  # (W*B, W*B)
        text_to_video = scaled_similarity(scale, embeddings.all_text, embeddings.all_video)
        video_to_text = text_to_video.T
    return (
        multi_positive_cross_entropy(text_to_video, positives)
        + multi_positive_cross_entropy(video_to_text, positives)
    ) / 2
