"""STOA-VLP: CLIP towers + object trajectory encoder + action encoder + fusion encoder and heads.

`encode_video` / `encode_text` run the towers and the new encoders, `fuse` runs the fusion encoder in
bidirectional or prefix-LM mode, `match_logits` and `lm_logits` are the VTM and tied LM heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from stoa_vlp.batch import Batch
from stoa_vlp.config import ModelConfig
from stoa_vlp.model.actions import ActionEncoder
from stoa_vlp.model.fusion import FusionEncoder
from stoa_vlp.model.objects import ObjectTokens, TrajectoryEncoder
from stoa_vlp.model.towers import TextTower, VideoTower

TOWER_PREFIXES = ("visual.", "text.", "logit_scale")
# token ids of the CLIP BPE tokenizer (stoa_vlp.tokenizer): 2 x 256 byte tokens, 48,894 merges, start and end
TOKENIZER_VOCAB_SIZE = 49408
NEW_TOWER_PARAMETERS = ("visual.temporal_embedding",)  # live in a tower but are not CLIP weights


@dataclass
class VideoFeatures:
    frames: torch.Tensor  # (B, T, E) projected per-frame features
    video: torch.Tensor  # (B, E) mean over frames of `frames`
    trajectories: torch.Tensor  # (B, N, E); (B, 0, E) when objects are off
    traj_mask: torch.Tensor  # (B, N) bool, True = real trajectory
    actions: torch.Tensor  # (B, M, E); (B, 0, E) when actions are off

    def index_select(self, index: torch.Tensor) -> "VideoFeatures":
        return VideoFeatures(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))

    def detach(self) -> "VideoFeatures":
        return VideoFeatures(*(getattr(self, f.name).detach() for f in fields(self)))


@dataclass
class TextFeatures:
    tokens: torch.Tensor  # (B, L, E) projected per-token features of the causal text tower
    sentence: torch.Tensor  # (B, E) the end-token feature
    mask: torch.Tensor  # (B, L) bool


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # (B, S, E), S = T + 1 + N + M + L (+ extra slots)
    video_sep: torch.Tensor  # (B, E) output at the video-SEP slot
    text: torch.Tensor  # (B, L, E) outputs at the text positions
    sentence: torch.Tensor  # (B, E) output at the text end-token position


def end_positions(text_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) index of the last real token (the end token)."""
    if text_mask.dtype != torch.bool:  # a 0/1 mask (as other tokenizers give) breaks the attention masks
        raise ValueError(f"text_mask must be bool, True at real tokens, got {text_mask.dtype}")
    return (text_mask.sum(dim=1) - 1).clamp(min=0)


def fusion_length(config: ModelConfig, extra_slots: int = 0) -> int:
    """Positions of a fused sequence: frames, video-SEP, trajectories, actions, text and `extra_slots`
    (video QA's answer slot)."""
    return (config.frames + 1 + config.trajectories * config.objects + config.action_queries * config.actions
            + config.text_len + extra_slots)


def check_config(config: ModelConfig) -> None:
    """A ValueError naming every model setting that the model cannot be built or run with."""
    problems = []
    for name in ("vision_width", "text_width", "embed_dim", "vision_heads", "text_heads", "vision_layers",
                 "text_layers", "fusion_layers"):
        if getattr(config, name) < 1:
            problems.append(f"model.{name} must be at least 1, got {getattr(config, name)}")
    # no zero-block ablation: the trajectory and action encoders output their first (CLS) position, which
    # without a block sees nothing else (every trajectory the same constant, every action query the same
    # feature), and without fusion blocks the text never attends to the video
    for switch, name in (("objects", "object_layers"), ("actions", "action_layers")):
        if getattr(config, switch) and getattr(config, name) < 1:
            problems.append(f"model.{name} must be at least 1 with model.{switch}=true (model.{switch}=false "
                            f"leaves the encoder out), got {getattr(config, name)}")
    # the video tower and the trajectory and action encoders attend in vision_width; the text tower
    # and the fusion encoder in text_width
    for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
        width_value, heads_value = getattr(config, width), getattr(config, heads)
        if width_value >= 1 and heads_value >= 1 and width_value % heads_value:
            problems.append(f"model.{width} {width_value} is not divisible by model.{heads} {heads_value}")
    if config.vocab_size < TOKENIZER_VOCAB_SIZE:
        problems.append(f"model.vocab_size must be at least the tokenizer's {TOKENIZER_VOCAB_SIZE} token ids "
                        f"(the CLIP BPE vocabulary), got {config.vocab_size}")
    if not 0 <= config.head_dropout < 1:
        problems.append(f"model.head_dropout must be in [0, 1), got {config.head_dropout}")
    if config.embed_dim != config.text_width:
        problems.append(
            f"model.embed_dim ({config.embed_dim}) must equal model.text_width ({config.text_width}): "
            "the fusion encoder and the tied LM head work in the text tower's width"
        )
    if config.patch_size >= 1 and config.image_size % config.patch_size:
        problems.append(f"model.image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    if config.vision_layers >= 1 and not 0 <= config.joint_blocks <= config.vision_layers:
        problems.append(f"model.joint_blocks must be in 0..{config.vision_layers}, got {config.joint_blocks}")
    for name in ("action_tap_layer", "object_tap_layer"):
        if config.vision_layers >= 1 and not 1 <= getattr(config, name) <= config.vision_layers:
            problems.append(f"model.{name} must be in 1..{config.vision_layers}, got {getattr(config, name)}")
    if config.objects and min(config.trajectories, config.boxes_per_frame, config.num_object_classes) < 1:
        problems.append("model.objects needs trajectories, boxes_per_frame and num_object_classes of at least 1")
    if config.trajectory_length < 0:
        problems.append(f"model.trajectory_length must be >= 0 (0 = T*K), got {config.trajectory_length}")
    if config.actions and config.action_queries < 1:
        problems.append("model.actions needs action_queries of at least 1")
    if config.text_len > config.context_length:
        problems.append(f"model.text_len {config.text_len} exceeds model.context_length {config.context_length}")
    if fusion_length(config) > config.fusion_positions:
        problems.append(f"the fusion sequence takes {fusion_length(config)} positions (frames + 1 + trajectories + "
                        f"action_queries + text_len), more than model.fusion_positions={config.fusion_positions}")
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems))


class STOAVLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        self.config = config
        width = config.text_width
        self.visual = VideoTower(config)
        self.text = TextTower(config)
        # shape (1,), not CLIP's 0-d: FSDP cannot shard 0-d parameters (checkpoint loading reshapes CLIP's)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.object_tokens = ObjectTokens(config) if config.objects else None
        self.trajectory_encoder = TrajectoryEncoder(config) if config.objects else None
        self.action_encoder = ActionEncoder(config) if config.actions else None
        self.fusion = FusionEncoder(config)
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(width))
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.match_head = nn.Linear(2 * width, 2)
        self.lm_transform = nn.Linear(width, width, bias=False)
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        with torch.no_grad():
            self.lm_transform.weight.copy_(torch.eye(width))
        self.initialise_from_towers()

    def tower_starts(self) -> dict[str, str]:
        """Each new module or parameter that starts as a copy of a tower's -> that tower module or parameter:
        the fusion's blocks and ln_final from the first text blocks and ln_final (as the paper); the
        trajectory and action encoders' blocks from the last visual blocks, lined up at the end (an encoder
        deeper than the ViT starts its last blocks from all of the ViT's), and their ln and proj from the
        ViT's ln_post and proj (as the reference code)."""
        fusion_depth = min(len(self.fusion.transformer.resblocks), len(self.text.transformer.resblocks))
        starts = {f"fusion.transformer.resblocks.{i}": f"text.transformer.resblocks.{i}" for i in range(fusion_depth)}
        starts["fusion.ln_final"] = "text.ln_final"
        visual_depth = len(self.visual.transformer.resblocks)
        for name in ("trajectory_encoder", "action_encoder"):
            encoder = getattr(self, name)
            if encoder is None:
                continue
            depth = len(encoder.transformer.resblocks)
            for index in range(max(depth - visual_depth, 0), depth):
                source = visual_depth - depth + index
                starts[f"{name}.transformer.resblocks.{index}"] = f"visual.transformer.resblocks.{source}"
            starts[f"{name}.ln"] = "visual.ln_post"
            starts[f"{name}.proj"] = "visual.proj"
        return starts

    @torch.no_grad()
    def initialise_from_towers(self) -> set[str]:
        """Copy the tower weights named by `tower_starts` into the new modules, and CLIP's text positions into
        the fusion's first position rows. Returns the keys copied whole."""
        state = self.state_dict()  # tensors sharing the parameters' storage
        copied = set()
        for target, source in self.tower_starts().items():
            for key in state:
                if key == source or key.startswith(source + "."):
                    copied_key = target + key.removeprefix(source)
                    state[copied_key].copy_(state[key])
                    copied.add(copied_key)
        self.fusion.initialise_positions(self.text.positional_embedding)
        return copied

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_video(
        self,
        frames: torch.Tensor,
        boxes: torch.Tensor,
        box_labels: torch.Tensor,
        box_mask: torch.Tensor,
        traj_labels: torch.Tensor,
        traj_mask: torch.Tensor,
    ) -> VideoFeatures:
        """frames (B, T, 3, H, W) uint8 RGB or CLIP-normalised floats; boxes (B, T, K, 4); box labels/mask
        (B, T, K); traj labels/mask (B, N)."""
        tower = self.visual(frames)
        batch = frames.shape[0]
        empty = tower.frames.new_zeros(batch, 0, self.embed_dim)
        object_tokens = object_mask = None
        if self.object_tokens is not None:
            object_tokens = self.object_tokens(tower.object_tap, boxes, box_labels, box_mask)  # (B, T, K, W)
            object_mask = box_mask
            trajectories = self.trajectory_encoder(object_tokens, box_labels, box_mask, traj_labels, traj_mask)
        else:
            trajectories = empty
            traj_mask = torch.zeros(batch, 0, dtype=torch.bool, device=frames.device)
        if self.action_encoder is not None:
            actions = self.action_encoder(tower.action_tap, object_tokens, object_mask)
        else:
            actions = empty
        return VideoFeatures(
            frames=tower.frames,
            video=tower.frames.mean(dim=1),
            trajectories=trajectories,
            traj_mask=traj_mask,
            actions=actions,
        )

    def encode_text(self, tokens: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """tokens (B, L) CLIP BPE ids with start/end tokens; text_mask (B, L) bool."""
        features = self.text(tokens)  # (B, L, E)
        sentence = features[torch.arange(features.shape[0], device=features.device), end_positions(text_mask)]
        return TextFeatures(tokens=features, sentence=sentence, mask=text_mask)

    def fuse(
        self,
        video: VideoFeatures,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        mode: str | torch.Tensor,
        extra_slots: torch.Tensor | None = None,
    ) -> FusionOutput:
        """mode: "bidirectional", "prefix", or a (B,) bool tensor, True at the rows fused in prefix mode."""
        text_ends = end_positions(text_mask)  # (B,), checking the mask before it enters the attention masks
        batch, frames = video.frames.shape[:2]
        parts = [video.frames, video.video[:, None, :], video.trajectories, video.actions]
        visual_length = sum(part.shape[1] for part in parts)
        parts.append(text_tokens)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=text_mask.device)
        valid = [ones.expand(-1, frames + 1), video.traj_mask, ones.expand(-1, video.actions.shape[1]), text_mask]
        if extra_slots is not None:
            parts.append(extra_slots)
            valid.append(ones.expand(-1, extra_slots.shape[1]))
        dtype = torch.promote_types(video.frames.dtype, text_tokens.dtype)  # torch.result_type breaks a compiled graph
        sequence = torch.cat([part.to(dtype) for part in parts], dim=1)  # (B, S, E)
        hidden = self.fusion(sequence, torch.cat(valid, dim=1), visual_length, mode)
        text = hidden[:, visual_length : visual_length + text_tokens.shape[1]]
        sentence = text[torch.arange(batch, device=text.device), text_ends]
        return FusionOutput(hidden=hidden, video_sep=hidden[:, frames], text=text, sentence=sentence)

    def match_logits(self, fused: FusionOutput) -> torch.Tensor:
        """(B, 2): [not matched, matched]."""
        return self.match_head(self.head_dropout(torch.cat([fused.video_sep, fused.sentence], dim=-1)))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., V): dropout(h) @ W @ token_embedding^T + b."""
        transformed = self.lm_transform(self.head_dropout(hidden))
        return F.linear(transformed, self.text.token_embedding.weight.to(transformed.dtype), self.lm_bias)

    def forward(self, batch: Batch) -> tuple[VideoFeatures, TextFeatures]:
        video = self.encode_video(
            batch.frames, batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask
        )
        return video, self.encode_text(batch.tokens, batch.text_mask)

    def is_tower_parameter(self, name: str) -> bool:
        return name.startswith(TOWER_PREFIXES) and name not in NEW_TOWER_PARAMETERS

    def param_groups(self, lr: float, tower_lr_scale: float, weight_decay: float) -> list[dict]:
        """Four groups: (tower | new) x (decay | no decay); no decay on 1-D params, embeddings, logit_scale."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            no_decay = parameter.ndim < 2 or "embedding" in name or name == "logit_scale"
            groups.setdefault((self.is_tower_parameter(name), no_decay), []).append(parameter)
        result = []
        for (tower, no_decay), parameters in sorted(groups.items()):
            result.append(
                {
                    "name": f"{'tower' if tower else 'new'}_{'no_decay' if no_decay else 'decay'}",
                    "params": parameters,
                    "lr": lr * tower_lr_scale if tower else lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
        return result

