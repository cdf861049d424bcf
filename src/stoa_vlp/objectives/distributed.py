"""Collectives the objectives need: the rank/world, row-wise all-gather, global video ids.

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
