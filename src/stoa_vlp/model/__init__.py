"""The STOA-VLP model: CLIP towers, object trajectory and action encoders, fusion encoder and heads."""

from stoa_vlp.model.checkpoint import (
    CheckpointError,
    build_model,
    load_clip_weights,
    load_model_weights,
    load_pretrained,
    read_clip_state_dict,
    save_pretrained,
)
from stoa_vlp.model.stoa import STOAVLP, FusionOutput, TextFeatures, VideoFeatures

__all__ = [
    "STOAVLP",
    "CheckpointError",
    "FusionOutput",
    "TextFeatures",
    "VideoFeatures",
    "build_model",
    "load_clip_weights",
    "load_model_weights",
    "load_pretrained",
    "read_clip_state_dict",
    "save_pretrained",
]
