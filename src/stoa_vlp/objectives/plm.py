"""Prefix language modelling (PLM): next-token loss over a random suffix, in one fusion pass.

Decisions (docs/decisions.md, "Pre-training objectives", open point §6.7):
- One fusion pass in "prefix" mode (visual positions never see text; text sees all visual
  positions and earlier text); the pre-training step stacks these rows with the VTM and MLM rows.
  The reference runs one pass per prefix length; with this mask the single pass gives the same
  predictions (tested against the prefix-by-prefix loop).
- Per caption a start s is drawn uniformly from its word positions 1..e-1 (e = the end token's
  position); the targets are the tokens s..e, end token included, each predicted from the
  fusion output one position earlier. A caption without word tokens scores its end token only.
- The loss is the mean cross-entropy over all scored tokens of the batch, computed as a weighted
  mean over every position (weight 1 at the scored ones): fixed shapes, no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stoa_vlp.objectives.distributed import global_mean
from stoa_vlp.objectives.fusion_rows import FusionRows, fuse_rows


def sample_suffix_starts(text_mask: torch.Tensor) -> torch.Tensor:
    """(B,) long start position s per caption, uniform over the word positions 1..e-1."""
    end = text_mask.sum(dim=1) - 1  # (B,) end-token position e
    words = (end - 1).clamp(min=1)  # number of word positions; at least 1 so s = e when there are none
    offsets = (torch.rand(end.shape, device=end.device) * words).long().clamp(max=words - 1)
    return 1 + offsets


def scored_positions(text_mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool target positions s..e of each caption."""
    end = text_mask.sum(dim=1, keepdim=True) - 1
    position = torch.arange(text_mask.shape[1], device=text_mask.device)[None, :]
    return (position >= starts[:, None]) & (position <= end)


def plm_rows(video, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> FusionRows:
    """The prefix-mode fusion rows of the clean caption; text_tokens (B, L, E) text-tower features."""
    return FusionRows(video, text_tokens, text_mask, prefix=True)


def plm_loss_from_fused(model, fused_text: torch.Tensor, text_mask: torch.Tensor, tokens: torch.Tensor,
                        starts: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at the targets s..e (of every rank, `global_mean`), given the fused
    text outputs (B, L, E) of `plm_rows`; tokens: (B, L) ids."""
    targets = scored_positions(text_mask, starts)[:, 1:]  # (B, L-1): position 0 is never a target
    logits = model.lm_logits(fused_text[:, :-1])  # (B, L-1, V): position i predicts token i+1
    errors = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    weights = targets.flatten().to(errors.dtype)
    return global_mean((errors * weights).sum(), weights.sum())


def plm_loss(model, video, text_tokens: torch.Tensor, text_mask: torch.Tensor, tokens: torch.Tensor,
             starts: torch.Tensor) -> torch.Tensor:
    """`plm_loss_from_fused` of the clean caption fused on its own."""
    fused = fuse_rows(model, plm_rows(video, text_tokens, text_mask))
    return plm_loss_from_fused(model, fused.text, text_mask, tokens, starts)
