"""Modality-agnostic fusion encoder over one sequence of visual and text tokens.

Sequence (S = T + 1 + N + M + L + X positions, all E = text_width wide):
    [frame features | video-SEP | trajectories | actions | text tokens | extra slots]
A learned position table (rows 0.. copied from CLIP's text positions) is added to every position.
Masks: padded trajectories and padded text tokens are never attended to. In "prefix" mode the visual
positions see only visual positions, and text (then extra) positions see all visual positions and the
text/extra positions up to their own. `mode` may also be a (B,) bool tensor that picks the mode per
row (True = prefix), so that passes of both kinds run as one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from stoa_vlp.config import ModelConfig
from stoa_vlp.model.transformer import Transformer

MODES = ("bidirectional", "prefix")


class FusionEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.text_width
        self.position_embedding = nn.Parameter(0.01 * torch.randn(config.fusion_positions, width))
        self.transformer = Transformer(
            width, config.fusion_layers, config.text_heads, config.quick_gelu, config.grad_checkpointing
        )
        self.ln_final = nn.LayerNorm(width)

    @torch.no_grad()
    def initialise_positions(self, text_positions: torch.Tensor) -> None:
        """Copy CLIP's text positions into the first rows of the position table."""
        rows = min(self.position_embedding.shape[0], text_positions.shape[0])
        self.position_embedding[:rows].copy_(text_positions[:rows])

    def forward(
        self, sequence: torch.Tensor, valid: torch.Tensor, visual_length: int, mode: str | torch.Tensor
    ) -> torch.Tensor:
        """sequence (B, S, E); valid (B, S) bool real positions; the first `visual_length` are visual;
        mode "bidirectional", "prefix" or a (B,) bool tensor, True at the rows in prefix mode."""
        if isinstance(mode, str) and mode not in MODES:
            raise ValueError(f"fusion mode must be one of {MODES} or a (B,) bool tensor, got {mode!r}")
        length = sequence.shape[1]
        if length > self.position_embedding.shape[0]:
            raise ValueError(
                f"fusion sequence of {length} positions exceeds model.fusion_positions="
                f"{self.position_embedding.shape[0]}"
            )
        x = sequence + self.position_embedding[:length].to(sequence.dtype)
        attn_mask = valid[:, None, None, :]  # (B, 1, 1, S)
        if not isinstance(mode, str) or mode == "prefix":
            position = torch.arange(length, device=sequence.device)
            key_visual = position < visual_length
            query_visual = key_visual[:, None]
            allowed = key_visual[None, :] | (~query_visual & (position[None, :] <= position[:, None]))  # (S, S)
            if not isinstance(mode, str):
                allowed = (allowed | ~mode[:, None, None])[:, None]  # (B, 1, S, S): bidirectional rows allow all
            attn_mask = attn_mask & allowed
        return self.ln_final(self.transformer(x, attn_mask))
