"""Checkpoints: CLIP weights into the towers, and our own safetensors + JSON checkpoints.

CLIP files (from a local path, never downloaded):
- OpenAI CLIP `.pt` files are TorchScript archives; their `state_dict()` is read (the scalar entries
  `input_resolution`, `context_length`, `vocab_size` are dropped), as open_clip's `load_openai_model` does.
- open_clip checkpoints: a state dict, or a training checkpoint `{"state_dict": ...}` (a `module.`
  prefix is removed), saved by `torch.save` or as `.safetensors`.
- an open_clip model folder (the Hugging Face Hub layout, `open_clip_config.json` beside
  `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), given as the folder or its weights
  file: the config's `model_cfg` is checked against the model config (QuickGELU, widths, depths,
  heads, sizes) before loading, since the weights alone cannot show QuickGELU or the head count.
- an official STOA-VLP or CLIP4Clip checkpoint (OpenAI's CLIP module under `clip.`): its towers are
  loaded as an OpenAI file's are, the rest left out with a warning.
CLIP's text keys (`token_embedding.*`, `transformer.*`, ...) map to `text.*`; `visual.*` and
`logit_scale` keep their names. Loading is strict: every missing, unexpected or mis-shaped key is named
in the error, except the new STOA modules, which are expected to be missing from CLIP weights (weights
holding them are a stoa-vlp checkpoint, refused).

Our checkpoints are a directory with `model.safetensors` (weights) and `config.json` (`{"model": ...}`).
Loaded into a model built with another `model.frames`, the frame-indexed tables (FRAME_TABLES) are
resampled along time by linear interpolation (first and last rows kept), and so are the frame rows of
the fusion position table, the rows after them kept in order behind them; every other mismatch is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stoa_vlp.config import ConfigError, ModelConfig, from_dict
from stoa_vlp.data.jsonl import write_json_atomic
from stoa_vlp.model.stoa import STOAVLP

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
OPENAI_HEAD_WIDTH = 64
OPEN_CLIP_CONFIG = "open_clip_config.json"
# weights files of an open_clip model folder, in open_clip's order of preference
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
MAX_NAMED_KEYS = 40
# what an OpenAI ViT CLIP state dict holds: keys, or module paths above keys
OPENAI_CLIP_ENTRIES = ("visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre",
                       "visual.transformer.resblocks", "visual.ln_post", "visual.proj", "transformer.resblocks",
                       "token_embedding", "positional_embedding", "ln_final", "text_projection", "logit_scale")
# the official STOA-VLP and CLIP4Clip checkpoints hold OpenAI's CLIP module under this prefix
CLIP4CLIP_PREFIX = "clip."
CLIP4CLIP_TOWER_ENTRIES = tuple(CLIP4CLIP_PREFIX + entry for entry in OPENAI_CLIP_ENTRIES)
# STOAVLP parameters with one row per frame (first dimension `model.frames`)
FRAME_TABLES = ("visual.temporal_embedding", "object_tokens.frame_embedding", "action_encoder.temporal_embedding")
# the STOAVLP parameter with one row per fusion position, the first `model.frames` rows those of the frames
FUSION_POSITIONS = "fusion.position_embedding"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint or run folder is missing, cannot be read, is incomplete or does not match the model
    (`stoa_vlp.train.checkpointing` raises this class too)."""


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_NAMED_KEYS} more)" if len(keys) > MAX_NAMED_KEYS else "")


def _is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive; False for a file that is not a readable zip archive, which
    the reader then reports."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI CLIP TorchScript file or an open_clip checkpoint, with CLIP's key names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        elif _is_torchscript(path):
            with warnings.catch_warnings():  # OpenAI's format is TorchScript, which torch marks deprecated
                warnings.simplefilter("ignore", FutureWarning)
                state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the readers raise many error types for a damaged or foreign file
        reason = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"{path}: cannot read it as a CLIP checkpoint ({reason})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return {key: value for key, value in state.items() if key not in OPENAI_SCALARS}


def clip_to_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP key names -> STOAVLP key names (text tower keys gain the `text.` prefix)."""
    renamed = {(f"text.{key}" if key.startswith(CLIP_TEXT_KEYS) else key): value for key, value in state.items()}
    return with_vector_logit_scale(renamed)


def with_vector_logit_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with a 0-d `logit_scale` (CLIP's files, checkpoints before it became 1-D) as shape (1,)."""
    scale = state.get("logit_scale")
    if scale is None or scale.ndim != 0:
        return state
    return {**state, "logit_scale": scale.reshape(1)}


def load_state_checked(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, expected_missing: set[str] = frozenset()
) -> None:
    """Load `state` into `model`; any unexpected, mis-shaped or (not expected) missing key is an error."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(expected_missing))
    mismatched = sorted(
        f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(own[key].shape)})"
        for key in set(state) & set(own)
        if state[key].shape != own[key].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_named(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_named(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_named(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def resample_along_time(table: torch.Tensor, frames: int) -> torch.Tensor:
    """(T, W) -> (frames, W) by linear interpolation between rows, the first and last rows kept."""
    rows = table.detach().float().t()[None]  # (1, W, T)
    resampled = F.interpolate(rows, size=frames, mode="linear", align_corners=True)  # (1, W, frames)
    return resampled[0].t().contiguous().to(table.dtype)


def stoa_models(module: nn.Module) -> list[tuple[str, STOAVLP]]:
    """(state-dict key prefix, model) of every STOAVLP inside `module` (itself included, prefix "")."""
    return [(f"{name}." if name else "", sub) for name, sub in module.named_modules() if isinstance(sub, STOAVLP)]


def frame_table_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the frame-indexed tables of every STOAVLP inside `module` (itself included)."""
    own = module.state_dict(keep_vars=True)
    return [prefix + name for prefix, _ in stoa_models(module) for name in FRAME_TABLES if prefix + name in own]


def resample_frame_tables(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, saved_frames: int | None = None
) -> dict[str, torch.Tensor]:
    """`state` with its frame tables resampled to the frame count `module` was built with, and the
    fusion position table of each model realigned to it (`realigned_fusion_positions`). `saved_frames`:
    the frame count the weights were saved with (`saved_frame_count`); without it, the resampled
    tables tell it, and a model without frame tables keeps its fusion positions as saved.

    Only a table whose width matches and whose row count differs is resampled, so any other shape
    mismatch is left for the strict load to report.
    """
    own = module.state_dict(keep_vars=True)
    resampled = {}
    for key in frame_table_keys(module):
        saved, wanted = state.get(key), own[key].shape
        if saved is not None and saved.ndim == 2 and saved.shape[1] == wanted[1] and saved.shape[0] != wanted[0]:
            resampled[key] = resample_along_time(saved, wanted[0])
    if resampled:
        old = sorted({state[key].shape[0] for key in resampled})
        new = sorted({own[key].shape[0] for key in resampled})
        log.info(
            "%s: frame tables %s resampled along time from %s to %s frames (linear interpolation)",
            source, ", ".join(sorted(resampled)), "/".join(map(str, old)), "/".join(map(str, new)),
        )
    realigned = realigned_fusion_positions(module, state, resampled, source, saved_frames)
    return {**state, **resampled, **realigned}


def realigned_fusion_positions(
    module: nn.Module, state: dict[str, torch.Tensor], resampled: dict[str, torch.Tensor], source: str,
    saved_frames: int | None = None,
) -> dict[str, torch.Tensor]:
    """The fusion position table of every STOAVLP in `module` built with another frame count than
    `saved_frames` (without it: whose frame tables were `resampled` from one frame count), at its own
    frame count (`realigned_positions`), where the saved table has the model's shape (any other is
    left for the strict load to report)."""
    own = module.state_dict(keep_vars=True)
    realigned = {}
    for prefix, model in stoa_models(module):
        key = prefix + FUSION_POSITIONS
        told = {state[prefix + name].shape[0] for name in FRAME_TABLES if prefix + name in resampled}
        frames = saved_frames if saved_frames is not None else (told.pop() if len(told) == 1 else model.config.frames)
        if frames != model.config.frames and key in state and state[key].shape == own[key].shape:
            realigned[key] = realigned_positions(state[key], frames, model.config.frames)
    if realigned:
        log.info("%s: %s: the frame rows resampled along time like the frame tables, the rows after them "
                 "(video-SEP, trajectories, actions, text) kept in order behind them", source, ", ".join(realigned))
    return realigned


def realigned_positions(table: torch.Tensor, saved_frames: int, frames: int) -> torch.Tensor:
    """The fusion position table (R, W) of a model with `frames` frames from that of one with
    `saved_frames`: the fusion sequence starts with one position per frame, so those rows are resampled
    along time and the rows after them follow unchanged, each position after the frames reading the
    row it read when saved."""
    moved = torch.cat([resample_along_time(table[:saved_frames], frames), table[saved_frames:]])
    # more frames push rows off the end, which no sequence that fits the table reaches; fewer frames
    # leave the end short, filled with the saved table's last rows: the new sequence is that much
    # shorter than the saved one, which fitted the table, so none reaches them
    return torch.cat([moved, table[len(moved) :]])[: len(table)]


def clip_weights_file(path: str | Path) -> Path:
    """The weights file of `path`: itself, or for an open_clip model folder its preferred weights file."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in OPEN_CLIP_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: a folder without open_clip weights (expected one of {', '.join(OPEN_CLIP_WEIGHTS)})")


def open_clip_model_config(weights: Path) -> dict | None:
    """The `model_cfg` of the open_clip_config.json beside `weights`, or None when there is none."""
    config_path = weights.parent / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        return None
    try:
        model_cfg = json.loads(config_path.read_text())["model_cfg"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{config_path}: not an open_clip config with a model_cfg ({error!r})") from error
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{config_path}: model_cfg is not an object")
    return model_cfg


# open_clip tower options that change what the towers compute; STOA-VLP builds CLIP's defaults only
VISION_OPTIONS = ("mlp_ratio", "ls_init_value", "attentional_pool", "no_ln_pre", "pos_embed_type", "final_ln_after_pool",
                  "pool_type", "act_kwargs", "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
                  "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name")
TEXT_OPTIONS = ("mlp_ratio", "ls_init_value", "embed_cls", "no_causal_mask", "final_ln_after_pool", "pool_type",
                "proj_bias", "proj_type", "act_kwargs", "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
                "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "hf_model_name", "hf_tokenizer_name")


def _other_options(section: str, parsed, default) -> list[str]:
    return [
        f"{section}.{name}={getattr(parsed, name)!r}"
        for name in (VISION_OPTIONS if section == "vision_cfg" else TEXT_OPTIONS)
        if hasattr(default, name) and getattr(parsed, name) != getattr(default, name)
    ]


def check_open_clip_config(config: ModelConfig, weights: Path) -> None:
    """Refuse weights whose open_clip config (beside them) describes other towers than `config`: another
    size or QuickGELU setting (every differing model key named), or an option STOA-VLP does not build."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model_cfg = open_clip_model_config(weights)
    if model_cfg is None:
        return
    source = weights.parent / OPEN_CLIP_CONFIG
    try:  # open_clip's own config classes, so that its defaults fill what the file leaves out
        vision = CLIPVisionCfg(**model_cfg.get("vision_cfg", {}))
        text = CLIPTextCfg(**model_cfg.get("text_cfg", {}))
    except TypeError as error:
        raise CheckpointError(f"{source}: model_cfg does not fit open_clip's config classes ({error})") from error
    unsupported = _other_options("vision_cfg", vision, CLIPVisionCfg()) + _other_options("text_cfg", text, CLIPTextCfg())
    if not isinstance(vision.layers, int) or model_cfg.get("custom_text") or unsupported:
        raise CheckpointError(f"{source}: towers STOA-VLP does not build (it builds CLIP's ViT and text transformer): "
                              + (", ".join(unsupported) or f"vision_cfg.layers={vision.layers!r}, custom_text"))
    implied = {
        "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
        "embed_dim": model_cfg.get("embed_dim", config.embed_dim),
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision_width": vision.width,
        "vision_layers": vision.layers,
        "vision_heads": vision.width // vision.head_width,
        "text_width": text.width,
        "text_layers": text.layers,
        "text_heads": text.heads,
        "vocab_size": text.vocab_size,
        "context_length": text.context_length,
    }
    differing = [
        f"model.{key}={json.dumps(value)} (the model has {json.dumps(getattr(config, key))})"
        for key, value in implied.items()
        if value != getattr(config, key)
    ]
    if differing:
        raise CheckpointError(f"{source} describes other towers than the model config: set " + ", ".join(differing))


def check_openai_settings(
    config: ModelConfig, weights: Path, source: str = "an OpenAI CLIP file, whose models"
) -> None:
    """Refuse OpenAI CLIP weights for a model config their models never had: OpenAI's CLIPs all use
    QuickGELU and 64-wide attention heads (open_clip's `build_model_from_openai_state_dict`). `source`
    says what `weights` is."""
    implied = {
        "quick_gelu": True,
        "vision_heads": config.vision_width // OPENAI_HEAD_WIDTH,
        "text_heads": config.text_width // OPENAI_HEAD_WIDTH,
    }
    differing = [f"model.{key}={json.dumps(value)}" for key, value in implied.items() if getattr(config, key) != value]
    if differing:
        raise CheckpointError(f"{weights} is {source} use QuickGELU MLPs and "
                              f"{OPENAI_HEAD_WIDTH}-wide heads: set " + ", ".join(differing))


def _under(key: str, path: str) -> bool:
    return key == path or key.startswith(path + ".")


def is_clip4clip_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` is an official STOA-VLP or CLIP4Clip checkpoint (`clip.visual.*`, ...)."""
    return any(key.startswith(CLIP4CLIP_PREFIX + "visual.") for key in state)


def left_out_group(key: str) -> str:
    """The outermost module (or parameter) of a CLIP4Clip-layout `key` that holds no OpenAI CLIP entry:
    `clip.object_fusion`, `clip.visual.transformer.object_encoder`, `obj_ln`, ..."""
    parts = key.split(".")
    paths = (".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return next((path for path in paths if not any(_under(entry, path) for entry in CLIP4CLIP_TOWER_ENTRIES)), key)


def clip4clip_towers(state: dict[str, torch.Tensor], weights: Path) -> dict[str, torch.Tensor]:
    """The OpenAI CLIP weights of a CLIP4Clip-layout `state`, with CLIP's key names. The rest (STOA-VLP's
    object, action and fusion modules, CLIP4Clip's heads) is left out with a warning: stoa-vlp builds
    those modules differently (docs/decisions.md) and starts its own from the loaded CLIP blocks."""
    is_tower = {key: any(_under(key, entry) for entry in CLIP4CLIP_TOWER_ENTRIES) for key in state}
    towers = {key.removeprefix(CLIP4CLIP_PREFIX): value for key, value in state.items() if is_tower[key]}
    left_out = [key for key in state if not is_tower[key]]
    if left_out:
        log.warning(
            "%s (STOA-VLP / CLIP4Clip layout): its OpenAI CLIP towers are loaded; %d weights of %s are not "
            "imported: stoa-vlp builds those modules differently (docs/decisions.md), so its new modules start "
            "from the loaded CLIP blocks",
            weights, len(left_out), _named(sorted({left_out_group(key) for key in left_out})),
        )
    return towers


def clip_state(config: ModelConfig, weights: Path) -> dict[str, torch.Tensor]:
    """The CLIP weights of `weights`, with CLIP's key names, after the checks its source allows: OpenAI's
    files and the towers of a CLIP4Clip-layout checkpoint (`check_openai_settings`), an open_clip_config.json
    beside the weights (`check_open_clip_config`)."""
    if _is_torchscript(weights):
        check_openai_settings(config, weights)
    check_open_clip_config(config, weights)
    state = read_clip_state_dict(weights)
    if not is_clip4clip_layout(state):
        return state
    check_openai_settings(config, weights, "a STOA-VLP / CLIP4Clip checkpoint, whose OpenAI CLIP towers")
    return clip4clip_towers(state, weights)


def refuse_stoa_vlp_weights(model: STOAVLP, state: dict[str, torch.Tensor], weights: Path, new_keys: set[str]) -> None:
    """Refuse weights that hold the model's new modules (a stoa-vlp checkpoint): loaded as CLIP weights,
    only their towers would be kept and the new modules restarted from CLIP blocks."""
    held = sorted(set(model_part(model, state)) & new_keys)
    if held:
        raise CheckpointError(f"{weights} is a stoa-vlp checkpoint (it holds {len(held)} weights of the new modules, "
                              f"e.g. {held[0]}), not CLIP weights: start from it with `stoa-vlp finetune --init` "
                              "or `stoa_vlp.model.load_pretrained`")


def load_clip_weights(model: STOAVLP, path: str | Path) -> list[str]:
    """Load CLIP weights into the towers, then re-initialise the new transformers from the loaded blocks.

    `path` is a weights file or an open_clip model folder; an official STOA-VLP or CLIP4Clip checkpoint
    gives its CLIP towers only (`clip4clip_towers`). Returns the model keys left (wholly or in part) at their
    random initialisation: the new STOA modules' weights that `initialise_from_towers` does not copy whole
    from the loaded towers. The weights cannot show QuickGELU or the head count, so they are checked
    where the source tells them (`clip_state`). A stoa-vlp checkpoint is refused.
    """
    weights = clip_weights_file(path)
    state = clip_to_model_keys(clip_state(model.config, weights))
    new_keys = {key for key in model.state_dict() if not model.is_tower_parameter(key)}
    refuse_stoa_vlp_weights(model, state, weights, new_keys)
    load_state_checked(model, state, f"CLIP checkpoint {weights}", expected_missing=new_keys)
    started = model.initialise_from_towers()
    return sorted(new_keys - started)


def build_model(config: ModelConfig) -> STOAVLP:
    """A randomly initialised model, with the CLIP towers loaded from `config.init_checkpoint` when set."""
    model = STOAVLP(config)
    if config.init_checkpoint:
        load_clip_weights(model, config.init_checkpoint)
    return model


def build_model_for_weights(config: ModelConfig) -> STOAVLP:
    """A model for trained weights to be loaded into: `build_model` without reading
    `config.init_checkpoint`, the CLIP file training started from, which those weights replace."""
    return STOAVLP(config)


def save_pretrained(model: STOAVLP, directory: str | Path) -> None:
    """Write `model.safetensors` and `config.json` into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, {"model": dataclasses.asdict(model.config)}, indent=2)


def load_pretrained(directory: str | Path, **model_overrides) -> STOAVLP:
    """The model saved by `save_pretrained` in `directory` (in train mode, as built).

    `model_overrides` change its model config before the weights load, e.g. `frames=8`: the frame
    tables are then resampled along time (`load_model_weights`). They are checked as a config file's
    values are: a key ModelConfig lacks, a value of the wrong type or out of range is a ConfigError.
    A setting config.json lacks takes its default, with a warning naming it.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CheckpointError(f"{needed}: missing (a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    settings = read_model_settings(config_path)
    warn_of_defaults(config_path, settings, model_overrides)
    config = from_dict({"model": {**settings, **model_overrides}}).model
    model = build_saved_model(config, config_path, model_overrides)
    load_model_weights(model, weights_path, saved_frame_count(directory))
    return model


def read_model_settings(config_path: Path) -> dict:
    """The model settings of a config.json (`{"model": {...}}`), checked as a config file's are."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            settings = json.load(handle)["model"]
        from_dict({"model": settings})
    except OSError as error:
        raise CheckpointError(f"{config_path}: cannot be read ({error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{config_path}: not a valid model config ({error})") from error
    return settings


def warn_of_defaults(config_path: Path, settings: dict, overrides: dict) -> None:
    """One warning naming each ModelConfig setting that neither `settings` (read from `config_path`)
    nor `overrides` give, with the default it takes: `save_pretrained` writes every setting, so the
    saved model may have been built with another value."""
    defaults = ModelConfig()
    absent = [f"model.{field.name}={json.dumps(getattr(defaults, field.name))}"
              for field in dataclasses.fields(ModelConfig) if field.name not in settings and field.name not in overrides]
    if absent:
        log.warning("%s lacks model settings, which take their defaults: %s (the saved model may have been built "
                    "with other values)", config_path, ", ".join(absent))


def build_saved_model(config: ModelConfig, config_path: Path, overrides: dict) -> STOAVLP:
    """STOAVLP(config), whose settings come from `config_path` and `overrides`: a model they cannot
    build is a CheckpointError naming them."""
    try:
        return STOAVLP(config)
    except ValueError as error:  # check_config: settings the model cannot be built with
        given = ", ".join(f"{name}={value!r}" for name, value in overrides.items())
        raise CheckpointError(f"{config_path}{f' with {given}' if given else ''}: {error}") from error


def weights_prefix(module: nn.Module) -> str:
    """"model." when `module` wraps a `model` that holds all its parameters and buffers (the Pretrainer),
    so that checkpoints hold the model's own state dict; else ""."""
    inner = getattr(module, "model", None)
    if not isinstance(inner, nn.Module):
        return ""
    outer_state, inner_state = module.state_dict(), inner.state_dict()
    if len(outer_state) != len(inner_state) or any(f"model.{name}" not in outer_state for name in inner_state):
        return ""
    return "model."


def model_part(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` for `module`; for a bare STOAVLP from a task module with a head of its own (QA saves
    "model.*" and "head.*"), the model's weights without their prefix, the head left out."""
    if not isinstance(module, STOAVLP) or any(name in weights for name in module.state_dict()):
        return weights
    return {name.removeprefix("model."): value for name, value in weights.items() if name.startswith("model.")}


def saved_frame_count(folder: Path) -> int | None:
    """model.frames of the model whose weights `folder` holds, from its config.json; None without one."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return None
    return read_model_settings(config_path).get("frames", ModelConfig.frames)


def load_saved_weights(module: nn.Module, folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """Strictly load `weights` (with `module`'s key names) from the checkpoint `folder` into `module`, the
    frame tables resampled from the frame count of the folder's config.json (`resample_frame_tables`)."""
    state = resample_frame_tables(module, weights, str(folder), saved_frame_count(folder))
    load_state_checked(module, state, str(folder))


def load_model_weights(model: STOAVLP, path: str | Path, saved_frames: int | None = None) -> None:
    """Strictly load a STOAVLP safetensors file into `model` (frame tables resampled to its frames from
    `saved_frames`, `resample_frame_tables`); a task checkpoint with a head of its own (QA) gives its
    model part."""
    try:
        state = load_file(path)
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: cannot read safetensors weights ({error})") from error
    state = model_part(model, state)
    source = f"checkpoint {path}"
    state = resample_frame_tables(model, with_vector_logit_scale(state), source, saved_frames)
    load_state_checked(model, state, source)
