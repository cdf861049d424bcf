"""CLIP's pre-LN residual attention block, with attention through `scaled_dot_product_attention`.

Parameter names equal open_clip's (`ln_1`, `attn.in_proj_weight`, `attn.in_proj_bias`, `attn.out_proj`,
`ln_2`, `mlp.c_fc`, `mlp.c_proj`), so CLIP weights load into these blocks by name.
Attention masks are boolean, True = may attend, broadcastable to (B, heads, queries, keys).
`is_causal=True` (with no mask) is the causal mask without materialising it, so SDPA may use flash attention.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class InputDtypeLayerNorm(nn.LayerNorm):
    """LayerNorm whose output has its input's dtype (open_clip's): under autocast, F.layer_norm computes
    in float32 and this casts back, so a bf16 residual stream stays bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


def layer_norm(width: int, low_precision_residual: bool) -> nn.LayerNorm:
    return InputDtypeLayerNorm(width) if low_precision_residual else nn.LayerNorm(width)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed input projection (nn.MultiheadAttention's layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3W)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, is_causal=is_causal
        )  # (B, H, S, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualBlock(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)), MLP 4x wide.

    With `low_precision_residual` the LayerNorms return their input's dtype, so under autocast x stays
    in bf16/fp16 between blocks (half the bytes per elementwise op); otherwise float32 LayerNorm
    outputs make it float32 after the first block. Without autocast both are the same function.
    """

    def __init__(self, width: int, heads: int, quick_gelu: bool, low_precision_residual: bool = False):
        super().__init__()
        self.ln_1 = layer_norm(width, low_precision_residual)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = layer_norm(width, low_precision_residual)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                gelu=QuickGELU() if quick_gelu else nn.GELU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks; `grad_checkpointing` recomputes each block in the backward pass."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        quick_gelu: bool,
        grad_checkpointing: bool = False,
        low_precision_residual: bool = False,
    ):
        super().__init__()
        self.width = width
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, quick_gelu, low_precision_residual) for _ in range(layers)
        )

    @torch.no_grad()
    def init_like_clip_text(self) -> None:
        """open_clip's text-transformer init: attention in_proj std width^-0.5, out_proj and mlp c_proj
        width^-0.5 * (2 * layers)^-0.5 (smaller for a deeper stack), mlp c_fc (2 * width)^-0.5."""
        projection_std = self.width**-0.5 * (2 * len(self.resblocks)) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=projection_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=projection_std)

    def run_block(
        self, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        block = self.resblocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
        return block(x, attn_mask, is_causal)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        for index in range(len(self.resblocks)):
            x = self.run_block(index, x, attn_mask, is_causal)
        return x


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of real keys -> (B, 1, 1, S) attention mask for `SelfAttention`."""
    return valid[:, None, None, :]
