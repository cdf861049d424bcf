"""Collectives the objectives need: the rank/world, row-wise all-gather, global video ids, means over
the terms of every rank.

Nothing here initialises a process group; without one (or with one rank) every function is the
identity. Gathering assumes every rank holds the same batch shape, as training with
`drop_last=True` guarantees; open_clip's ClipLoss makes the same assumption.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

Features = TypeVar("Features")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` of every rank along dim 0, rank order.

    Floating tensors are gathered with gradient (functional collectives' all_gather_single_autograd,
    which torch.compile traces, where torch.distributed.nn's all_gather, deprecated, breaks the
    graph): the backward pass sums, on each rank, the gradients every rank computed for that rank's
    rows, which is what makes 2 ranks under DDP gradient averaging equal one rank on the whole batch.
    Other dtypes (masks, ids) are gathered without gradient; bools travel as uint8.
    """
    _, world = rank_and_world()
    if world == 1:
        return tensor
    if tensor.is_floating_point():
        gathered = funcol.all_gather_single_autograd(tensor.contiguous(), 0, dist.group.WORLD)
        return funcol.wait_tensor(gathered)  # a plain tensor, not the asynchronous wrapper
    payload = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    parts = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(parts, payload)
    return torch.cat(parts, dim=0).to(tensor.dtype)


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over the terms of every rank: `total` (the sum of this rank's terms)
    times the world size, over the number of terms on all ranks (`count` summed; at least 1).

    DDP and FSDP average gradients over ranks, so every rank applies the gradient of the mean over the
    whole batch, however the terms fall across ranks (masked tokens, valid pairs, matched trajectories:
    a rank without detections has no DOTA pair); a per-rank mean would weigh each rank alike instead,
    so that an objective's weight changed with the world size and the data. The mean of the ranks'
    values is the whole batch's mean. The count is summed without gradient, by a functional all-reduce
    (which torch.compile traces) and no host sync; with one rank this is total / max(count, 1).
    """
    _, world = rank_and_world()
    if world > 1:
        count = funcol.wait_tensor(funcol.all_reduce(count.detach(), "sum", dist.group.WORLD))
    return total * world / count.clamp(min=1.0)


def map_tensor_fields(function, features: Features) -> Features:
    """A copy of the dataclass `features` with `function` applied to each of its tensor fields."""
    changed = {
        field.name: function(getattr(features, field.name))
        for field in dataclasses.fields(features)
        if isinstance(getattr(features, field.name), torch.Tensor)
    }
    return dataclasses.replace(features, **changed)


def gather_features(features: Features) -> Features:
    """`gather_rows` applied to every tensor field of a feature dataclass (VideoFeatures, TextFeatures)."""
    return map_tensor_fields(gather_rows, features)


def global_video_index(video_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's video ids (B,), all ranks' ids (W*B,)). The datasets number videos per dataset
    (a record's index, a shard key's stable hash), so equal ids on two ranks are one video: its
    captions are positives of each other, and never hard negatives of each other, wherever they are."""
    return video_index, gather_rows(video_index)
