"""Masked language modelling (MLM) through the fusion encoder and the tied LM head.

Decisions (docs/decisions.md, "Pre-training objectives", open point §6.8):
- Each word token (not the start token, not the end token, not padding) is masked with
  probability `loss.mlm_probability` (Bernoulli, no 80/10/10 scheme). A caption where the draw
  masks nothing gets one word masked, chosen uniformly; a caption without any word token gets no
  MLM target.
- The text tower is causal, so the clean caption's features at later positions would carry the
  masked word. The masked caption is therefore encoded separately (stacked with the clean one in
  the same tower call) with the masked ids replaced by MASK_INPUT_ID = 0. Id 0 is the reference's
  choice; it is the padding id and the punctuation "!", so it names no word, and it can never be
  taken for the start/end token (CLIP locates the end token as the largest id).
- At the fusion input the masked positions hold `model.mask_embedding` (a learned [MASK] vector)
  instead of the reference's zero vector; the fusion runs bidirectionally.
- The loss is the cross-entropy of `model.lm_logits` at the masked positions only, computed as a
  weighted mean over all B x L positions (weight 1 at masked ones): fixed shapes, no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stoa_vlp.objectives.distributed import global_mean
from stoa_vlp.objectives.fusion_rows import FusionRows, fuse_rows

MASK_INPUT_ID = 0


def word_positions(text_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: real tokens that are neither the first (start) nor the last real one (end)."""
    length = text_mask.sum(dim=1, keepdim=True)  # (B, 1)
    position = torch.arange(text_mask.shape[1], device=text_mask.device)[None, :]
    return text_mask & (position > 0) & (position < length - 1)


def choose_mlm_positions(text_mask: torch.Tensor, probability: float) -> torch.Tensor:
    """(B, L) bool positions to mask: Bernoulli(probability) over word tokens, at least one per caption."""
    words = word_positions(text_mask)
    masked = words & (torch.rand(words.shape, device=words.device) < probability)
    # one word uniformly at random for captions whose draw came out empty
    scores = torch.rand(words.shape, device=words.device).masked_fill(~words, -1.0)
    position = torch.arange(words.shape[1], device=words.device)
    fallback = (position[None, :] == scores.argmax(dim=1, keepdim=True)) & words  # (one_hot would sync)
    empty = ~masked.any(dim=1, keepdim=True)
    return masked | (fallback & empty)


def masked_input_ids(tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Token ids for the text tower with the masked positions replaced by MASK_INPUT_ID."""
    return tokens.masked_fill(masked, MASK_INPUT_ID)


def mlm_rows(model, video, masked_text_tokens: torch.Tensor, text_mask: torch.Tensor,
             masked: torch.Tensor) -> FusionRows:
    """The bidirectional fusion rows of the masked caption: [MASK] embeddings at the masked positions.

    masked_text_tokens: (B, L, E) text-tower features of the masked caption.
    """
    fusion_text = torch.where(masked[..., None], model.mask_embedding.to(masked_text_tokens.dtype), masked_text_tokens)
    return FusionRows(video, fusion_text, text_mask, prefix=False)


def position_logits(model, video, masked_text_tokens: torch.Tensor, text_mask: torch.Tensor,
                    masked: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits (B, L, V) at every text position of the bidirectional fusion of the masked caption."""
    return model.lm_logits(fuse_rows(model, mlm_rows(model, video, masked_text_tokens, text_mask, masked)).text)


def mlm_loss_from_fused(model, fused_text: torch.Tensor, masked: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at the masked positions (of every rank, `global_mean`) given the fused text
    outputs (B, L, E) of `mlm_rows`; 0 (still attached to the graph) when nothing is masked."""
    logits = model.lm_logits(fused_text)  # (B, L, V)
    errors = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")  # (B*L,)
    weights = masked.flatten().to(errors.dtype)
    return global_mean((errors * weights).sum(), weights.sum())
