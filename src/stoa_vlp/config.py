"""Typed configuration: dataclasses, YAML presets and dotted overrides.

A `Config` has five sections (model, loss, data, train, task). It is built from a preset
(`tiny`, `base`) or a YAML file, then changed with dotted overrides such as
`model.frames=8`. Unknown keys, keys given twice, values of the wrong type and values out of range
are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration key is unknown or given twice, or its value has the wrong type or is out of range."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys (<<) and unhashable keys are the safe loader's to handle
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """The YAML value of `text`; a ConfigError saying where its syntax (or a duplicate key) is wrong."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        raise ConfigError(f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {error}") from None


@dataclass
class ModelConfig:
    # CLIP video tower (ViT)
    image_size: int = 224  # frame side in pixels after resize and centre crop
    patch_size: int = 16  # ViT patch side in pixels
    vision_width: int = 768  # ViT token width
    vision_layers: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    quick_gelu: bool = True  # QuickGELU MLPs as in OpenAI CLIP; false = GELU (open_clip's non-OpenAI weights)
    frames: int = 12  # T, frames per clip
    joint_blocks: int = 2  # last blocks of the ViT attend over all frames' tokens together
    temporal_embedding: bool = True  # learnable frame positions before joint blocks and in the action encoder
    action_tap_layer: int = 10  # 1-indexed ViT block whose output feeds the action encoder (stop-gradient)
    object_tap_layer: int = 11  # 1-indexed ViT block whose patch map feeds RoIAlign
    # CLIP text tower
    text_width: int = 512  # text transformer width, also the fusion encoder's
    text_layers: int = 12  # text transformer blocks
    text_heads: int = 8  # text attention heads, also the fusion encoder's
    vocab_size: int = 49408  # CLIP BPE vocabulary, start and end tokens included
    context_length: int = 77  # rows of the CLIP text position table
    text_len: int = 32  # caption tokens, start and end included
    embed_dim: int = 512  # joint video-text space
    # object trajectories
    objects: bool = True  # the object trajectory encoder (false: no trajectories, DOTA has nothing to align)
    boxes_per_frame: int = 10  # K
    trajectories: int = 20  # N categories per clip
    num_object_classes: int = 1600  # size of the class-label embedding table (0 is padding)
    object_layers: int = 2  # transformer blocks of the trajectory encoder (vision width and heads)
    trajectory_length: int = 0  # boxes per trajectory sequence; 0 = T*K (exact); fewer subsample evenly
    # spatial-temporal actions
    actions: bool = True  # the spatial-temporal action encoder (false: no action queries, STASP has none)
    action_queries: int = 4  # M
    action_layers: int = 2  # transformer blocks of the action encoder (vision width and heads)
    # fusion
    fusion_layers: int = 6  # blocks of the modality-agnostic fusion encoder
    fusion_positions: int = 256  # rows of the fusion position table
    head_dropout: float = 0.1  # dropout before the matching (VTM) and language-model heads
    # execution
    grad_checkpointing: bool = False  # recompute transformer blocks in the backward pass: less memory, more time
    # under autocast, keep the video tower's residual stream in bf16/fp16 (open_clip) instead of
    # float32 (timm); the same function without autocast
    low_precision_residual: bool = False
    init_checkpoint: str = ""  # CLIP weights for the towers: OpenAI .pt, open_clip, or STOA-VLP/CLIP4Clip's clip.*


@dataclass
class LossConfig:
    # loss weights; 0 turns an objective off
    vtc: float = 1.0  # video-text contrastive
    vtm: float = 1.0  # video-text matching
    mlm: float = 1.0  # masked language modelling
    plm: float = 1.0  # prefix language modelling
    dota: float = 1.0  # dynamic object-text alignment
    stasp: float = 1.0  # spatial-temporal action set prediction
    vtc_video_feature: str = "mean"  # "mean" of normalised frames (meanP) or "sep" (fusion video-SEP input)
    local_loss: bool = False  # open_clip's local_loss: each rank scores its own rows against all
    mlm_probability: float = 0.15  # chance that MLM masks a caption token
    match_similarity: str = "dot"  # "dot" or "cosine" cost for the Hungarian matching
    fusion_stop_gradient: bool = False  # detach frame/text-token features fed to VTM, MLM, PLM (reference)


@dataclass
class DataConfig:
    train: str = ""  # annotation file (format inferred or given by `format`)
    val: str = ""  # validation annotation file: selects the best checkpoint ("" = none)
    test: str = ""  # test annotation file (evaluation only)
    format: str = "auto"  # auto, msrvtt, msvd, didemo, lsmdc, webvid, webdataset, jsonl
    video_root: str = ""  # folder of the videos ("" = a videos folder beside the annotation file)
    detections: str = ""  # detections JSONL (README: Detections format), or a store folder of `stoa-vlp pack`
    tags: str = ""  # noun/verb tag cache
    label_vocab: str = ""  # object class vocabulary file
    decoder: str = "pyav"  # pyav, decord, torchcodec
    frame_rate: float = 1.0  # frames per second at which frame folders (videos given as images) were extracted
    train_sampling: str = "rand"  # rand (random within segment) or uniform
    eval_sampling: str = "uniform"  # frame sampling of validation and evaluation
    batch_size: int = 8  # clips per micro-batch on each rank
    num_workers: int = 2  # data-loading processes per rank (0: load in the training process)
    spacy_model: str = "en_core_web_sm"  # spaCy pipeline that tags nouns and verbs (stoa-vlp tag, demo)
    max_bad_samples: float = 0.01  # share of skipped (unreadable) samples tolerated before training stops
    keep_freed_memory: bool = True  # processes that load samples keep freed memory (glibc) instead of re-faulting it


@dataclass
class TrainConfig:
    output_dir: str = "runs/stoa"  # run folder (the commands' --output)
    seed: int = 0  # seeds weights, data order, frame sampling and masking
    steps: int = 1000  # optimiser steps of the run
    epochs: float = 0.0  # > 0: the run's length in epochs of the training items, which sets steps (train.run_length)
    lr: float = 1e-4  # peak learning rate of the new modules (AdamW)
    tower_lr_scale: float = 0.01  # CLIP towers train at lr * tower_lr_scale
    weight_decay: float = 0.2  # AdamW's, on weight matrices (not 1-D parameters, embeddings, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's
    eps: float = 1e-6  # AdamW's
    warmup_steps: int = 100  # linear warmup to lr, then cosine decay
    warmup_share: float = 0.0  # > 0: warmup_steps is this share of steps (0.1: the paper's 10%)
    grad_accum: int = 1  # micro-batches per optimiser step
    clip_grad: float = 1.0  # gradient norm clipping (0: none)
    precision: str = "fp32"  # fp32, amp_bf16, amp_fp16
    compile: bool = False  # torch.compile the training step's model
    distributed: str = "ddp"  # ddp or fsdp
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard records
    eval_every: int = 500  # steps between validations (and the last step)
    save_every: int = 500  # steps between checkpoints (and the last step, and each new best)
    keep_last: int = 2  # newest checkpoints kept, besides the best
    nonfinite: str = "stop"  # stop or skip
    min_lr_scale: float = 0.0  # cosine decays to lr * min_lr_scale
    device: str = "auto"  # auto (the rank's GPU when there is one, else CPU), cpu or cuda
    best_metric: str = "val/t2v_r1"  # validation metric (higher is better) that selects the best checkpoint
    val_max_clips: int = 0  # validate on at most this many val clips (0 = all)
    tensorboard: bool = True  # TensorBoard events in the run folder
    progress: bool = True  # tqdm progress bar on rank 0
    # DDP: parameters may get no gradient; turned on by pretrain when a loss weight is 0, by every
    # fine-tuning task (each leaves part of the model unused)
    find_unused_parameters: bool = False
    # how long a rank waits in a collective for the others, e.g. for rank 0's validation (torch's default:
    # 10 minutes with NCCL, 30 with gloo)
    dist_timeout_minutes: int = 120
    deterministic: bool = False  # deterministic GPU kernels (torch.use_deterministic_algorithms): slower


@dataclass
class TaskConfig:
    # downstream fine-tuning and evaluation (stoa_vlp.tasks); data.train/val/test name the task's files
    name: str = "retrieval"  # retrieval, captioning, qa, mc
    rerank_k: int = 32  # retrieval: fusion (VTM) re-ranking of each query's contrastive top-k; 0 = off
    dual_softmax: bool = False  # retrieval: also report dual-softmax numbers, next to the plain ones
    qb_norm: bool = False  # retrieval: also report QB-Norm t2v numbers (query bank: data.train's captions)
    qb_norm_beta: float = 20.0  # retrieval: QB-Norm's inverted-softmax temperature on cosine similarities
    beam_size: int = 1  # captioning: 1 = greedy
    length_penalty: float = 1.0  # captioning: beam score = sum log p / length ** length_penalty
    max_caption_tokens: int = 0  # captioning: generated tokens, end included; 0 = model.text_len - 1
    meteor: bool = True  # captioning: METEOR (needs Java; ~8 s to start)
    answers: int = 1500  # QA: answer vocabulary = the most frequent training answers
    answer_vocab: str = ""  # QA: {answer: label} JSON to use instead (ALPRO's train_ans2label.json)
    mc_scoring: str = "vtm"  # multiple-choice: option score from the matching head (vtm) or cosine (vtc)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{key}: expected a list of {len(item_types)} values, got {value!r}")
        return tuple(_check_value(key, v, t) for v, t in zip(value, item_types))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            value = _yaml_float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _yaml_float(text: str) -> float | str:
    """'3e-4' -> 0.0003; any other string is returned unchanged."""
    try:
        return float(text)
    except ValueError:
        return text


def _update(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{key}'")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            _update(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _check_value(key, value, hints[name]))


# the smallest value that works, for settings whose type allows less
AT_LEAST = {
    "model.frames": 1,
    "model.image_size": 1,
    "model.patch_size": 1,
    "model.text_len": 2,  # the start and end tokens
    "data.batch_size": 1,
    "data.num_workers": 0,
    "data.max_bad_samples": 0,
    "train.lr": 0,
    "train.warmup_steps": 0,
    "train.epochs": 0,
    "train.warmup_share": 0,
}

# the bound a setting must stay below, and why
BELOW = {
    "train.warmup_share": 1,  # a warmup as long as the run never decays the learning rate
}


def check_ranges(config: Config) -> None:
    """A ConfigError naming every setting of AT_LEAST below its least value, or of BELOW not below its
    bound (NaN is neither), and every number that is not finite (NaN or infinite: no setting means
    "unbounded" by inf, and a NaN compares false with every bound that a later check makes)."""
    problems, named = [], set()
    for key, least in AT_LEAST.items():
        value = _setting(config, key)
        if not value >= least:
            problems.append(f"{key} must be at least {least}, got {value}")
            named.add(key)
    for key, bound in BELOW.items():
        value = _setting(config, key)
        if not value < bound and key not in named:
            problems.append(f"{key} must be below {bound}, got {value}")
            named.add(key)
    for key, value in _numbers(config):
        if not all(math.isfinite(v) for v in value) and key not in named:
            shown = value[0] if len(value) == 1 else list(value)
            problems.append(f"{key} must be a finite number, got {shown}")
    if problems:
        raise ConfigError("; ".join(problems))


def _numbers(config: Config) -> list[tuple[str, tuple[float, ...]]]:
    """(key, its values) of every float setting and tuple of floats (train.betas)."""
    numbers = []
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values))
        for name in (f.name for f in dataclasses.fields(values)):
            value = getattr(values, name)
            if hints[name] is float:
                numbers.append((f"{section.name}.{name}", (value,)))
            elif typing.get_origin(hints[name]) is tuple and float in typing.get_args(hints[name]):
                numbers.append((f"{section.name}.{name}", tuple(value)))
    return numbers


def _setting(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def from_dict(values: dict[str, Any], source: str = "") -> Config:
    """A Config from nested values; with `source` (the file they were read from), errors name it."""
    config = Config()
    try:
        _update(config, values)
        check_ranges(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None
    return config


def yaml_line(value: Any, **style: Any) -> str:
    """`value` as one line of YAML, with PyYAML's `safe_dump` `style` options (PyYAML ends a lone scalar
    with the document end "...", left out here)."""
    return yaml.safe_dump(value, width=math.inf, **style).strip().removesuffix("...").strip()


def path_override(key: str, path: str | Path) -> str:
    """`key=path` as an override that reads back as exactly `path`: written plainly, a " #" in a
    path starts a YAML comment and a ": " makes it a mapping. YAML quotes it (JSON's quoting split
    characters beyond U+FFFF into surrogates that YAML reads back apart)."""
    quoted = yaml_line(str(path), default_style='"')
    return f"{key}={quoted}"


def parse_override(text: str) -> dict[str, Any]:
    """'model.frames=8' -> {'model': {'frames': 8}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError("not of the form section.key=value")  # the caller names the override
    dotted, raw = text.split("=", 1)
    value = read_yaml(raw) if raw.strip() else ""
    nested: dict[str, Any] = {}
    cursor = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(preset_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Build a config from a preset name or a YAML file, then apply dotted overrides."""
    path = Path(preset_or_path)
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    if preset_or_path in presets or not (path.suffix or path.is_file()):  # a preset name before a file
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset '{preset_or_path}' (known: {', '.join(presets)})")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    config = Config()
    try:
        values = read_yaml(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ConfigError("expected a mapping at the top level")
        _update(config, values)
        check_ranges(config)
    except (ConfigError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: {error}") from None
    return apply_overrides(config, overrides or [])


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """`config` changed by dotted overrides, each range-checked (an error names the override)."""
    for override in overrides:
        try:
            _update(config, parse_override(override))
            check_ranges(config)
        except ConfigError as error:
            raise ConfigError(f"override '{override}': {error}") from None
    return config


def save_config(config: Config, path: str | Path) -> None:
    values = config.to_dict()
    values["train"]["betas"] = list(values["train"]["betas"])
    with open(path, "w") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
