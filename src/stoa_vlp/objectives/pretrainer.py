"""The pre-training criterion: runs the towers once and combines the six objectives.

`Pretrainer(model, loss_config)(batch)` returns {"loss": weighted total, "<name>": detached value}
for every objective whose weight is above 0; an objective with weight 0 is not computed at all.
DDP wraps the Pretrainer, so the towers, every fusion pass and every loss run inside `forward`.

One step:
1. The video tower (with trajectories and actions) runs once. The text tower runs once on the
   clean caption stacked with its MLM-masked copy (the copy only when MLM is on).
2. DOTA and STASP start their one shared transfer of cost matrices to the host (asynchronous on
   CUDA), so the device keeps working on steps 3-4 while the host waits for it and matches.
3. VTC and VTM share the all-gathered normalised embeddings; VTM draws its hard negatives from
   their similarity (no gradient) and gathers the negatives' features from all ranks.
4. VTM (3B pairs), MLM (bidirectional rows of the masked copy) and PLM (prefix rows of the clean
   caption) reuse the tower outputs and run through the fusion encoder as one batch of 5B rows.
5. The Hungarian matchings finish on the host; their matches come back for the DOTA/STASP MSE.
Random draws (MLM positions, VTM negatives, then head dropout and PLM suffix starts in the order
of the losses) use torch's global RNG, so a seeded step repeats exactly. With
`loss.fusion_stop_gradient` the frame and text-token features entering the VTM/MLM/PLM fusion are
detached, as in the reference code (trajectories and actions stay attached); by default the towers
learn from every objective.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from stoa_vlp.batch import TAG_NOUN, TAG_VERB, Batch
from stoa_vlp.config import LossConfig
from stoa_vlp.objectives.distributed import gather_features, map_tensor_fields
from stoa_vlp.objectives.fusion_rows import FusionRows, fuse_together
from stoa_vlp.objectives.matching import (
    SIMILARITIES,
    AlignmentTask,
    costs_to_host,
    matched_columns,
    matched_losses,
    stacked_costs,
    text_candidates,
)
from stoa_vlp.objectives.mlm import choose_mlm_positions, masked_input_ids, mlm_loss_from_fused, mlm_rows
from stoa_vlp.objectives.plm import plm_loss_from_fused, plm_rows, sample_suffix_starts
from stoa_vlp.objectives.vtc import (
    VIDEO_FEATURES,
    ContrastiveEmbeddings,
    clamped_scale,
    scaled_similarity,
    video_embedding,
    vtc_loss,
)
from stoa_vlp.objectives.vtm import sample_hard_negatives, vtm_loss_from_fused, vtm_rows

OBJECTIVES = ("vtc", "vtm", "mlm", "plm", "dota", "stasp")


def check_loss_config(config: LossConfig, model_config, objectives: tuple[str, ...] = OBJECTIVES) -> None:
    """Raise ValueError naming every inconsistent `loss.*` setting. `objectives`: those the task trains
    with (a task that trains with none, as captioning and QA, still gets its weights and choices
    checked, but not the settings only an objective uses, nor that one is on)."""
    problems = []
    for name in OBJECTIVES:
        weight = getattr(config, name)
        if not math.isfinite(weight):  # a NaN weight compares false with 0: the objective silently off
            problems.append(f"loss.{name} must be a finite number, got {weight}")
        elif weight < 0:
            problems.append(f"loss.{name} must be >= 0, got {weight}")
    if objectives and not any(getattr(config, name) > 0 for name in objectives):
        problems.append("every loss weight is 0: enable at least one of " + ", ".join(objectives))
    if config.vtc_video_feature not in VIDEO_FEATURES:
        problems.append(f"loss.vtc_video_feature must be one of {VIDEO_FEATURES}, got {config.vtc_video_feature!r}")
    if config.match_similarity not in SIMILARITIES:
        problems.append(f"loss.match_similarity must be one of {SIMILARITIES}, got {config.match_similarity!r}")

    def on(name: str) -> bool:
        return name in objectives and getattr(config, name) > 0

    if on("mlm") and not 0.0 < config.mlm_probability <= 1.0:
        problems.append(f"loss.mlm_probability must be in (0, 1], got {config.mlm_probability}")
    if on("dota") and not model_config.objects:
        problems.append("loss.dota > 0 needs trajectories: set model.objects=true or loss.dota=0")
    if on("stasp") and not model_config.actions:
        problems.append("loss.stasp > 0 needs action features: set model.actions=true or loss.stasp=0")
    if problems:
        raise ValueError("invalid loss config: " + "; ".join(problems))


def split_rows(features, size: int):
    """(first `size` rows, the rest) of every tensor field of a feature dataclass."""
    return map_tensor_fields(lambda t: t[:size], features), map_tensor_fields(lambda t: t[size:], features)


class Pretrainer(nn.Module):
    def __init__(self, model: nn.Module, loss_config: LossConfig):
        super().__init__()
        check_loss_config(loss_config, model.config)
        self.model = model
        self.loss_config = loss_config
        self.weights = {name: getattr(loss_config, name) for name in OBJECTIVES if getattr(loss_config, name) > 0}

    def encode(self, batch: Batch, mlm_positions: torch.Tensor | None):
        """Towers once: (VideoFeatures, clean TextFeatures, masked-copy TextFeatures or None)."""
        video = self.model.encode_video(
            batch.frames, batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask
        )
        if mlm_positions is None:
            return video, self.model.encode_text(batch.tokens, batch.text_mask), None
        tokens = torch.cat([batch.tokens, masked_input_ids(batch.tokens, mlm_positions)])
        both = self.model.encode_text(tokens, torch.cat([batch.text_mask, batch.text_mask]))
        clean, masked = split_rows(both, len(batch))
        return video, clean, masked

    def fusion_inputs(self, video, text):
        """The features the fusion objectives see (detached tower outputs with fusion_stop_gradient)."""
        if not self.loss_config.fusion_stop_gradient:
            return video, text
        video = dataclasses.replace(video, frames=video.frames.detach(), video=video.video.detach())
        return video, dataclasses.replace(text, tokens=text.tokens.detach(), sentence=text.sentence.detach())

    def contrastive(self, video, text, batch: Batch, losses: dict):
        """VTC into `losses`; with VTM, (its fusion rows, valid caption-negatives, valid video-negatives)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and "vtc" in self.weights):
            embeddings = ContrastiveEmbeddings.gather(
                video_embedding(video.frames, video.video, self.loss_config.vtc_video_feature),
                F.normalize(text.sentence, dim=-1),
                batch.video_index,
            )
        if "vtc" in self.weights:
            losses["vtc"] = vtc_loss(embeddings, self.model.logit_scale, self.loss_config.local_loss)
        if "vtm" not in self.weights:
            return None
        with torch.no_grad():
            scale = clamped_scale(self.model.logit_scale)
            positives = embeddings.positives()  # (B, W*B)
            text_to_video = scaled_similarity(scale, embeddings.text, embeddings.all_video)  # (B, W*B)
            video_to_text = scaled_similarity(scale, embeddings.video, embeddings.all_text)
            negative_video = sample_hard_negatives(text_to_video, positives)
            negative_text = sample_hard_negatives(video_to_text, positives)
        video, text = self.fusion_inputs(video, text)
        rows = vtm_rows(video, text, gather_features(video), gather_features(text), negative_video, negative_text)
        return rows, negative_video[1], negative_text[1]

    def start_alignment(self, video, text, batch: Batch) -> tuple[list[str], list[AlignmentTask], torch.Tensor]:
        """DOTA and/or STASP: (names, tasks, host costs) with the costs' transfer to the host started."""
        names, tasks = [], []
        for name, predictions, prediction_mask, tag in (
            ("dota", video.trajectories, video.traj_mask, TAG_NOUN),
            ("stasp", video.actions, torch.ones_like(video.actions[..., 0], dtype=torch.bool), TAG_VERB),
        ):
            if name in self.weights:
                targets, target_mask = text_candidates(text.tokens, text.sentence, batch.text_mask, batch.pos_tags, tag)
                names.append(name)
                tasks.append(AlignmentTask(predictions, prediction_mask, targets, target_mask))
        return names, tasks, costs_to_host(stacked_costs(tasks, self.loss_config.match_similarity))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        mlm_positions = None
        if "mlm" in self.weights:
            mlm_positions = choose_mlm_positions(batch.text_mask, self.loss_config.mlm_probability)
        video, clean, masked = self.encode(batch, mlm_positions)
        losses: dict[str, torch.Tensor] = {}
        alignment = None
        if "dota" in self.weights or "stasp" in self.weights:
            alignment = self.start_alignment(video, clean, batch)
        rows: dict[str, FusionRows] = {}
        vtm = None
        if "vtc" in self.weights or "vtm" in self.weights:
            vtm = self.contrastive(video, clean, batch, losses)
        if vtm is not None:
            rows["vtm"] = vtm[0]
        if "mlm" in self.weights:
            fusion_video, fusion_masked = self.fusion_inputs(video, masked)
            rows["mlm"] = mlm_rows(self.model, fusion_video, fusion_masked.tokens, batch.text_mask, mlm_positions)
        if "plm" in self.weights:
            fusion_video, fusion_clean = self.fusion_inputs(video, clean)
            rows["plm"] = plm_rows(fusion_video, fusion_clean.tokens, batch.text_mask)
        fused = {}
        if rows:
            for name, output in zip(rows, fuse_together(self.model, list(rows.values()))):
                fused[name] = output
        if vtm is not None:
            losses["vtm"] = vtm_loss_from_fused(self.model, fused["vtm"], vtm[1], vtm[2])
        if "mlm" in self.weights:
            losses["mlm"] = mlm_loss_from_fused(self.model, fused["mlm"].text, mlm_positions, batch.tokens)
        if "plm" in self.weights:
            starts = sample_suffix_starts(batch.text_mask)
            losses["plm"] = plm_loss_from_fused(self.model, fused["plm"].text, batch.text_mask, batch.tokens, starts)
        if alignment is not None:
            names, tasks, host_costs = alignment
            columns = matched_columns(host_costs, batch.tokens.device)  # (G, R): the one wait for the device
            for name, loss in zip(names, matched_losses(tasks, columns)):
                losses[name] = loss
        total = sum(self.weights[name] * losses[name] for name in OBJECTIVES if name in losses)
        return {"loss": total, **{name: losses[name].detach() for name in OBJECTIVES if name in losses}}
