"""Optimiser and learning-rate schedule: AdamW over the model's parameter groups, linear warmup
then cosine decay."""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from stoa_vlp.config import TrainConfig

# the train.* settings of the optimiser's groups and of the LR schedule; a resumed run uses its own
SETTINGS = ("lr", "tower_lr_scale", "weight_decay", "betas", "eps", "steps", "warmup_steps", "min_lr_scale")
_GROUP_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps")  # what the config sets in a parameter group


def parameter_groups(module: nn.Module, train: TrainConfig) -> list[dict]:
    """The groups of `module.param_groups(...)` (or of `module.model`'s, the Pretrainer case), plus one
    group for any other trainable parameter; a plain module gets decay / no-decay groups.
    Every trainable parameter lands in exactly one group (checked)."""
    owner = module if hasattr(module, "param_groups") else getattr(module, "model", None)
    groups = []
    if owner is not None and hasattr(owner, "param_groups"):
        groups = owner.param_groups(train.lr, train.tower_lr_scale, train.weight_decay)
    grouped = {id(p) for group in groups for p in group["params"]}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in grouped]
    decay = [p for p in rest if p.ndim >= 2]
    no_decay = [p for p in rest if p.ndim < 2]
    if decay:
        groups.append({"params": decay, "lr": train.lr, "weight_decay": train.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": train.lr, "weight_decay": 0.0})
    seen: set[int] = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears in two optimiser parameter groups")
            seen.add(id(p))
    return [group for group in groups if group["params"]]


def build_optimizer(groups: list[dict], train: TrainConfig, device: torch.device, fsdp: bool = False) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(...)`, fused where the device has fused kernels (CUDA and CPU in
    torch >= 2.4), except under FSDP with amp_fp16: its ShardedGradScaler hands the optimiser an
    overflow flag of shape (1,), which the fused kernels refuse (they take a 0-d one)."""
    sharded_scaler = fsdp and train.precision == "amp_fp16"
    fused = device.type in _get_fused_kernels_supported_devices() and not sharded_scaler
    return torch.optim.AdamW(
        groups,
        lr=train.lr,
        betas=train.betas,
        eps=train.eps,
        weight_decay=train.weight_decay,
        fused=fused,
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_scale: float) -> float:
    """LR multiplier at optimiser step `step` (0-based): linear ramp to 1 over `warmup_steps`,
    then cosine down to `min_scale` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, train.warmup_steps, train.steps, train.min_lr_scale),
    )


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings from the config: base lr (the scheduler's), weight decay, betas, eps."""
    return [{key: group[key] for key in _GROUP_SETTINGS} for group in optimizer.param_groups]


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                   settings: list[dict]) -> None:
    """After loading a checkpoint's optimiser and scheduler states, which carry the old run's settings:
    `settings` (`group_settings` of the fresh optimiser) in every group and as the base lrs, Adam's
    moments kept, and every group's lr from this run's schedule at the restored step."""
    for group, values in zip(optimizer.param_groups, settings, strict=True):
        group.update(values)
    scheduler.base_lrs = [values["initial_lr"] for values in settings]
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


def changed_settings(saved: dict, train: TrainConfig) -> list[str]:
    """"train.lr 0.01 -> 0.1" for every SETTINGS key in which `train` differs from a saved train config."""
    current = json.loads(json.dumps(dataclasses.asdict(train)))  # as saved: tuples are lists
    return [f"train.{key} {saved.get(key)} -> {current[key]}" for key in SETTINGS if saved.get(key) != current[key]]
