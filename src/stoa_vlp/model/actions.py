"""Spatial-Temporal Action Encoder.

Spatial step, per frame t and query m: a_{t,m} = softmax(LN(q_m) · LN(X_t)ᵀ / √W) LN(X_t), with X_t the
frame's [patch tokens of the action tap (detached); object tokens of the frame (pads masked)].
Temporal step, per query m: a transformer over [action CLS; a_{1,m} + P_1 ... a_{T,m} + P_T], where the
CLS input is the mean over frames of the tap's CLS token and P are learnable temporal positions (only
with `temporal_embedding`). The CLS output (ln, proj) is the action feature A_m.
"""

from __future__ import annotations

import torch
from torch import nn

from stoa_vlp.config import ModelConfig
from stoa_vlp.model.transformer import Transformer


class ActionEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.vision_width
        self.query_embedding = nn.Parameter(width**-0.5 * torch.randn(config.action_queries, width))
        self.ln_query = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(width)
        if config.temporal_embedding:
            self.temporal_embedding = nn.Parameter(0.01 * torch.randn(config.frames, width))
        else:
            self.temporal_embedding = None
        self.transformer = Transformer(
            width, config.action_layers, config.vision_heads, config.quick_gelu, config.grad_checkpointing
        )
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, config.embed_dim))

    def spatial_attention(
        self, tap: torch.Tensor, object_tokens: torch.Tensor | None, box_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 weights (B, T, M, P+K) of each query over each frame's patches then objects, the
        normalised context (B, T, P+K, W)); arguments as `forward`."""
        batch, frames, _, width = tap.shape
        context = tap[:, :, 1:]  # (B, T, P, W)
        valid = torch.ones(context.shape[:3], dtype=torch.bool, device=tap.device)
        if object_tokens is not None:
            context = torch.cat([context, object_tokens.to(context.dtype)], dim=2)  # (B, T, P+K, W)
            valid = torch.cat([valid, box_mask], dim=2)
        context = self.ln_context(context)
        queries = self.ln_query(self.query_embedding).to(context.dtype).expand(batch, frames, -1, -1)  # (B, T, M, W)
        # one head as wide as the model: written out, since SDPA's kernels for such a head dim are slow
        scores = (queries @ context.transpose(-1, -2)) * width**-0.5  # (B, T, M, P+K)
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        return torch.softmax(scores.float(), dim=-1), context

    def forward(
        self, tap: torch.Tensor, object_tokens: torch.Tensor | None, box_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """tap (B, T, 1+P, W) detached; object_tokens (B, T, K, W) and box_mask (B, T, K) or None -> (B, M, E)."""
        batch = tap.shape[0]
        weights, context = self.spatial_attention(tap, object_tokens, box_mask)
        per_frame = weights.to(context.dtype) @ context  # (B, T, M, W)
        if self.temporal_embedding is not None:
            per_frame = per_frame + self.temporal_embedding.to(per_frame.dtype)[None, :, None, :]
        queries_count = per_frame.shape[2]
        cls = tap[:, :, 0].mean(dim=1)  # (B, W)
        sequence = torch.cat(
            [cls[:, None, None, :].expand(-1, queries_count, 1, -1).to(per_frame.dtype), per_frame.transpose(1, 2)],
            dim=2,
        )  # (B, M, 1+T, W)
        out = self.transformer(sequence.flatten(0, 1))[:, 0]  # (B*M, W)
        return (self.ln(out) @ self.proj).reshape(batch, queries_count, -1)
