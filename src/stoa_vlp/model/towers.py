"""CLIP towers: the video tower (ViT with joint space-time blocks and taps) and the causal text tower.

Attribute names follow open_clip's `VisionTransformer` and `CLIP` text part, so that CLIP checkpoints
load by name (see `checkpoint.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stoa_vlp.config import ModelConfig
from stoa_vlp.model.transformer import Transformer, layer_norm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB pixel mean and std of CLIP's training images
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoTowerOutput:
    frames: torch.Tensor  # (B, T, E) ln_post(CLS) @ proj per frame
    action_tap: torch.Tensor  # (B, T, 1 + P, W) output of block `action_tap_layer`, detached
    object_tap: torch.Tensor  # (B * T, grid * grid, W) patch tokens of block `object_tap_layer` (row-major grid)


class VideoTower(nn.Module):
    """CLIP ViT over T frames: the first blocks run per frame, the last `joint_blocks` over all frames' tokens.

    Frames arrive as uint8 RGB, as the data pipeline makes them, and are CLIP-normalised here on
    the model's device: a quarter of the bytes of float32 frames to collate, pin and copy to the
    GPU, and no normalisation pass in the data-loading processes. Floating-point frames are taken
    as CLIP-normalised already (open_clip's preprocessing, for instance).

    With `temporal_embedding` a learnable (T, W) frame position is added to every token before the
    first joint block (only when there are joint blocks: per-frame blocks cannot use it).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        width, self.frames_per_clip = config.vision_width, config.frames
        self.grid = config.image_size // config.patch_size
        self.first_joint = config.vision_layers - config.joint_blocks
        self.action_tap_layer = config.action_tap_layer
        self.object_tap_layer = config.object_tap_layer
        scale = width**-0.5
        # a Conv2d so that CLIP's `conv1.weight` loads by name; `patch_embed` uses its weight as a matrix
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = layer_norm(width, config.low_precision_residual)
        self.transformer = Transformer(
            width, config.vision_layers, config.vision_heads, config.quick_gelu, config.grad_checkpointing,
            config.low_precision_residual,
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))
        if config.temporal_embedding and config.joint_blocks > 0:
            self.temporal_embedding = nn.Parameter(0.01 * torch.randn(config.frames, width))
        else:
            self.temporal_embedding = None
        # not in the state dict: constants, not weights
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> CLIP-normalised, in float32 with torchvision's `ToDtype(scale=True)` and
        `Normalize` operations in their order (equal results); floating-point frames are taken as
        normalised. Either way in the weights' dtype (float32 but for a model cast to another, which
        also rounds the mean and std buffers, as it rounds every weight)."""
        if frames.dtype == torch.uint8:
            frames = frames.to(torch.float32).mul_(1.0 / 255).sub_(self.pixel_mean.float()).div_(self.pixel_std.float())
        elif not frames.is_floating_point():
            raise ValueError(f"frames must be uint8 RGB or CLIP-normalised floats, got {frames.dtype}")
        return frames.to(self.conv1.weight.dtype)

    def patch_embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised frames -> (N, P, W): `conv1` (stride = kernel = patch) computed as one
        matrix product.

        Cutting the images into patches and multiplying by the flattened kernel is the same
        function as the convolution; a GPU runs it as a plain GEMM, where cuDNN's convolution
        kernels for this shape were several times slower (bench/RESULTS.md).
        """
        count, channels, height, width = images.shape
        patch = self.conv1.kernel_size[0]
        if (height, width) != (self.grid * patch, self.grid * patch):
            raise ValueError(f"video tower built for {self.grid * patch} px frames, got {height}x{width}")
        patches = images.reshape(count, channels, self.grid, patch, self.grid, patch)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(count, self.grid**2, -1)  # (N, P, 3*p*p)
        return F.linear(patches, self.conv1.weight.flatten(1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised frames -> (N, 1 + P, W) tokens after ln_pre."""
        x = self.patch_embed(images)  # (N, P, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, frames: torch.Tensor) -> VideoTowerOutput:
        """frames (B, T, 3, H, W): uint8 RGB, or floats already CLIP-normalised."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (clips, frames, 3, height, width), got shape {tuple(frames.shape)}")
        batch, frames_per_clip = frames.shape[:2]
        if frames_per_clip != self.frames_per_clip:
            raise ValueError(f"video tower built for {self.frames_per_clip} frames, got {frames_per_clip}")
        x = self.embed(self.normalize(frames.flatten(0, 1)))  # (B*T, 1+P, W)
        tokens, width = x.shape[1], x.shape[2]
        action_tap = object_tap = None
        for index in range(len(self.transformer.resblocks)):
            if index >= self.first_joint:
                if index == self.first_joint and self.temporal_embedding is not None:
                    x = x + self.temporal_embedding.to(x.dtype).repeat(batch, 1)[:, None, :]
                joint = self.transformer.run_block(index, x.reshape(batch, frames_per_clip * tokens, width))
                x = joint.reshape(batch * frames_per_clip, tokens, width)
            else:
                x = self.transformer.run_block(index, x)
            if index + 1 == self.action_tap_layer:
                action_tap = x.detach().reshape(batch, frames_per_clip, tokens, width)
            if index + 1 == self.object_tap_layer:
                object_tap = x[:, 1:]
        frame_features = self.ln_post(x[:, 0]) @ self.proj  # (B*T, E)
        return VideoTowerOutput(
            frames=frame_features.reshape(batch, frames_per_clip, -1),
            action_tap=action_tap,
            object_tap=object_tap,
        )


class TextTower(nn.Module):
    """CLIP's causal text transformer: every token's ln_final(x) @ text_projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(config.context_length, width))
        self.transformer = Transformer(
            width, config.text_layers, config.text_heads, config.quick_gelu, config.grad_checkpointing
        )
        self.transformer.init_like_clip_text()
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, config.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, E) projected features; position i sees positions <= i only."""
        length = tokens.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ValueError(f"text of {length} tokens exceeds the context length {self.positional_embedding.shape[0]}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, is_causal=True)  # no padding mask: padding sits after the end token
        return self.ln_final(x) @ self.text_projection
