"""Object tokens (RoIAlign on a ViT block's patch tokens) and the Object Trajectory Encoder.

Object token o_{t,k} = maxpool(MLP(RoIAlign(patch map_t, box))) + MLP(box / image_size)
                       + E_frame[t] + E_slot[k] + E_label[class]          (width W of the ViT)
Trajectories: for each of the N categories of a clip, the tokens of that category's boxes (across all
frames) are gathered into one short sequence behind a learnable [CLS]; a transformer runs over all
B * N sequences at once, and the [CLS] output (ln, proj) is the trajectory feature.
Every sequence has the fixed length 1 + S, S = `model.trajectory_length` (T*K when 0, which is exact),
so no shape depends on the data (no host sync, one compiled graph). A category with more than S boxes
keeps S of them evenly spaced in frame order, its first and last included.
"""

from __future__ import annotations

import torch
from torch import nn

from stoa_vlp.checks import require
from stoa_vlp.config import ModelConfig
from stoa_vlp.model.transformer import Transformer, key_padding_mask

ROI_OUTPUT_SIZE = 2  # RoIAlign output cells per side; the region MLP's outputs are max-pooled over them
ROI_SAMPLES = 2  # bilinear samples per cell and axis (torchvision's sampling_ratio)


def mlp(in_width: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_width, width), nn.GELU(), nn.Linear(width, width))


def roi_axis_weights(low: torch.Tensor, high: torch.Tensor, size: int) -> torch.Tensor:
    """RoIAlign along one axis as weights on the grid: box edges (R,) in grid units, cell centres at
    integers (aligned=True) -> (R, ROI_OUTPUT_SIZE, size).

    Output cell c averages ROI_SAMPLES bilinear samples spread evenly over its bin, with torchvision's
    border rules: a sample beyond [-1, size] reads nothing, one in [-1, 0] reads cell 0, one past the
    last cell centre reads the last cell.
    """
    bin_size = (high - low) / ROI_OUTPUT_SIZE  # (R,)
    cell = torch.arange(ROI_OUTPUT_SIZE, device=low.device, dtype=low.dtype)
    offset = (torch.arange(ROI_SAMPLES, device=low.device, dtype=low.dtype) + 0.5) / ROI_SAMPLES
    position = low[:, None, None] + (cell[:, None] + offset) * bin_size[:, None, None]  # (R, cells, samples)
    inside = (position >= -1) & (position <= size)
    position = position.clamp(min=0)
    below = position.floor().clamp(max=size - 1)
    fraction = torch.where(position >= size - 1, 0.0, position - below)
    above = (below + 1).clamp(max=size - 1)
    grid = torch.arange(size, device=low.device, dtype=low.dtype)
    weights = (1 - fraction)[..., None] * (grid == below[..., None])
    weights = weights + fraction[..., None] * (grid == above[..., None])  # (R, cells, samples, size)
    return (weights * inside[..., None]).mean(dim=2)  # (R, cells, size)


def evenly_spaced_members(counts: torch.Tensor, length: int) -> torch.Tensor:
    """The S = `length` members a category of `counts` (> S) members keeps: (B, N) -> (B, N, S). Slot s takes
    member round(s * (count - 1) / (S - 1)), rounded half up, so the first and last members are kept; with
    S = 1 the middle member, (count - 1) // 2. Integer tensor ops only: no host sync."""
    last = counts[..., None] - 1  # (B, N, 1)
    if length == 1:
        return torch.div(last, 2, rounding_mode="floor")
    slot = torch.arange(length, device=counts.device)
    return torch.div(2 * slot * last + length - 1, 2 * (length - 1), rounding_mode="floor")


class ObjectTokens(nn.Module):
    """Boxes of every frame -> (B, T, K, W) object tokens; padded boxes give zero tokens."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.vision_width
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size
        self.spatial_scale = self.grid / config.image_size
        self.region_mlp = mlp(width, width)
        self.box_mlp = mlp(4, width)
        self.frame_embedding = nn.Parameter(0.01 * torch.randn(config.frames, width))
        self.slot_embedding = nn.Parameter(torch.zeros(config.boxes_per_frame, width))
        self.label_embedding = nn.Embedding(config.num_object_classes, width, padding_idx=0)
        nn.init.normal_(self.label_embedding.weight, std=0.02)
        with torch.no_grad():
            self.label_embedding.weight[0].zero_()

    def regions(self, patch_tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """RoIAlign of every box on its frame's patch tokens: (B*T, g*g, W), (B, T, K, 4) pixels -> (B*T*K, s*s, W).

        torchvision's `roi_align` (aligned=True, sampling ratio ROI_SAMPLES) written as one batched
        matrix product per frame: the bilinear weights are separable in rows and columns, so each box
        is a (s*s, g*g) weight matrix on its frame's tokens. Forward and backward are then GEMMs,
        where `roi_align`'s backward scatters with atomic adds into a float32 copy of the map.
        """
        frames, tokens, _ = patch_tokens.shape
        if tokens != self.grid**2:
            raise ValueError(f"object tokens built for a {self.grid}x{self.grid} patch grid, got {tokens} patches")
        slots, cells = boxes.shape[2], ROI_OUTPUT_SIZE**2
        edges = boxes.reshape(-1, 4).float() * self.spatial_scale - 0.5  # grid units; -0.5: aligned=True
        rows = roi_axis_weights(edges[:, 1], edges[:, 3], self.grid)  # (B*T*K, s, g)
        columns = roi_axis_weights(edges[:, 0], edges[:, 2], self.grid)  # (B*T*K, s, g)
        weights = torch.einsum("rpy,rqx->rpqyx", rows, columns).reshape(frames, slots * cells, tokens)
        regions = torch.bmm(weights.to(patch_tokens.dtype), patch_tokens)  # (B*T, K*s*s, W)
        return regions.reshape(frames * slots, cells, -1)

    def check_labels(self, box_labels: torch.Tensor) -> None:
        """ValueError for labels outside the table (`stoa_vlp.checks.require`: no host sync on an accelerator)."""
        classes = self.label_embedding.num_embeddings
        require(((box_labels >= 0) & (box_labels < classes)).all(),
                f"box labels must be in 0..{classes - 1} (model.num_object_classes={classes})")

    def forward(
        self, patch_tokens: torch.Tensor, boxes: torch.Tensor, box_labels: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """patch_tokens (B*T, g*g, W); boxes (B, T, K, 4) pixels; labels, mask (B, T, K) -> (B, T, K, W)."""
        batch, frames, slots = box_mask.shape
        if slots != self.slot_embedding.shape[0]:
            raise ValueError(f"object tokens built for {self.slot_embedding.shape[0]} boxes per frame, got {slots}")
        self.check_labels(box_labels)
        # padded boxes become empty boxes at the origin, so their content cannot reach any output
        safe_boxes = torch.where(box_mask[..., None], boxes, torch.zeros_like(boxes))
        regions = self.regions(patch_tokens, safe_boxes)  # (B*T*K, s*s, W)
        regions = self.region_mlp(regions).amax(dim=1)  # (B*T*K, W)
        tokens = regions.reshape(batch, frames, slots, -1)
        tokens = tokens + self.box_mlp((safe_boxes / self.image_size).to(tokens.dtype))  # a model cast to bf16
        tokens = tokens + self.frame_embedding[:, None, :] + self.slot_embedding[None, :, :]
        tokens = tokens + self.label_embedding(box_labels * box_mask)
        return torch.where(box_mask[..., None], tokens, torch.zeros_like(tokens))


class TrajectoryEncoder(nn.Module):
    """One sequence per category: [CLS; that category's object tokens], batched over B * N."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.vision_width
        self.length = config.trajectory_length or config.frames * config.boxes_per_frame  # S
        self.cls_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.transformer = Transformer(
            width, config.object_layers, config.vision_heads, config.quick_gelu, config.grad_checkpointing
        )
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, config.embed_dim))

    def forward(
        self,
        object_tokens: torch.Tensor,
        box_labels: torch.Tensor,
        box_mask: torch.Tensor,
        traj_labels: torch.Tensor,
        traj_mask: torch.Tensor,
    ) -> torch.Tensor:
        """object_tokens (B, T, K, W); box labels/mask (B, T, K); traj labels/mask (B, N) -> (B, N, E)."""
        batch, categories = traj_labels.shape
        width = object_tokens.shape[-1]
        flat_tokens = object_tokens.flatten(1, 2)  # (B, T*K, W)
        members = (
            box_mask.flatten(1)[:, None, :]
            & (box_labels.flatten(1)[:, None, :] == traj_labels[:, :, None])
            & traj_mask[:, :, None]
        )  # (B, N, T*K): box j belongs to category n
        counts = members.sum(dim=-1)  # (B, N)
        length = min(self.length, flat_tokens.shape[1])  # S
        # members first, in frame order: a stable sort of "not member"
        members_first = torch.sort((~members).to(torch.uint8), dim=-1, stable=True).indices  # (B, N, T*K)
        slot = torch.arange(length, device=counts.device)  # (S,)
        pick = torch.where(counts[..., None] > length, evenly_spaced_members(counts, length), slot)  # (B, N, S)
        order = torch.gather(members_first, 2, pick)  # (B, N, S) box index per slot
        boxes_per_clip = flat_tokens.shape[1]
        rows = order + torch.arange(batch, device=order.device)[:, None, None] * boxes_per_clip  # into B*T*K rows
        gathered = flat_tokens.reshape(-1, width).index_select(0, rows.flatten())
        gathered = gathered.reshape(batch, categories, length, width)  # (B, N, S, W)
        real = slot < counts[..., None]  # (B, N, S)
        cls = self.cls_embedding.to(gathered.dtype).expand(batch, categories, 1, width)
        sequence = torch.cat([cls, gathered], dim=2).flatten(0, 1)  # (B*N, 1+S, W)
        cls_valid = torch.ones(batch, categories, 1, dtype=torch.bool, device=real.device)
        valid = torch.cat([cls_valid, real], dim=2).flatten(0, 1)  # (B*N, 1+S)
        out = self.transformer(sequence, key_padding_mask(valid))
        return (self.ln(out[:, 0]) @ self.proj).reshape(batch, categories, -1)
