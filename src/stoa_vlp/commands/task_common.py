"""Shared by the downstream commands (finetune, evaluate, caption, answer, index, search):
finding a checkpoint, rebuilding its config with overrides, loading weights into a task module,
and printing which split and which preprocessing every number comes from."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from stoa_vlp.config import Config, apply_overrides, from_dict, path_override
from stoa_vlp.data.jsonl import read_json_object

PREPROCESSING = ("model.frames", "model.image_size", "model.text_len", "data.eval_sampling", "data.decoder")
VIDEOS = "videos (data.video_root)"

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its best-on-validation checkpoint, else its newest)."""
    from stoa_vlp.train.checkpointing import best_checkpoint, is_complete, list_checkpoints

    path = Path(path)
    if is_complete(path):
        return path
    best = best_checkpoint(path)
    if best is not None:
        return best
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint folder (with state.json) nor a run folder with checkpoints")
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """RUN for RUN/checkpoints/step_N."""
    return checkpoint.parent.parent


def checkpoint_config(checkpoint: Path, overrides: list[str]) -> tuple[Config, Config]:
    """(the config the checkpoint was trained with, the same with `overrides` applied); data.label_vocab
    falls back on the run folder's vocabulary when the recorded file is gone (a moved run)."""
    from stoa_vlp.commands.common import adopt_label_vocab

    state_file = checkpoint / "state.json"
    trained = from_dict(read_json_object(state_file, {"config": dict})["config"], str(state_file))
    applied = apply_overrides(copy.deepcopy(trained), overrides)
    for config in (trained, applied):
        adopt_label_vocab(config, run_dir_of(checkpoint))
    return trained, applied


def trained_for(config: Config) -> str:
    """What a checkpoint's config trained: "pre-training" or the fine-tuning task. Pre-training keeps
    the default task.name and objectives that retrieval fine-tuning (task_config) switches off."""
    pretraining_losses = (config.loss.mlm, config.loss.plm, config.loss.dota, config.loss.stasp)
    if config.task.name in ("retrieval", "mc") and any(weight > 0 for weight in pretraining_losses):
        return "pre-training"
    return config.task.name


def require_trained_for(checkpoint: Path, fine_tuned_for: str, task: str) -> None:
    """ValueError unless a checkpoint trained for `fine_tuned_for` (`trained_for`) can do `task`: the task
    it was fine-tuned for (retrieval and mc train one module), or zero-shot from pre-training any task but
    QA, whose answer head only QA fine-tuning trains. Another task's fine-tuning moved the weights under
    this task's head without training it (a QA run captions gibberish)."""
    module_of = {"mc": "retrieval"}
    if module_of.get(task, task) == module_of.get(fine_tuned_for, fine_tuned_for):
        return
    if fine_tuned_for == "pre-training" and task != "qa":
        log.info("%s is a pre-training checkpoint: %s zero-shot, with the heads pre-training trained", checkpoint, task)
        return
    name = "QA" if task == "qa" else task
    problem = ("its answer head would be untrained" if task == "qa"
               else f"the {fine_tuned_for} fine-tuning moved the weights under its {task} head without training it")
    raise ValueError(f"{checkpoint} was trained for {fine_tuned_for}, not {name}: {problem} (fine-tune it with "
                     f"`stoa-vlp finetune --task {task} --init` first)")


def load_task_weights(module: nn.Module, checkpoint: Path) -> None:
    """Strictly load a checkpoint's model.safetensors into the task module that wrote it
    (frame tables resampled when the module was built with another `model.frames`)."""
    from stoa_vlp.model.checkpoint import model_part, resample_frame_tables
    from stoa_vlp.train.checkpointing import load_module_state, load_weights
    from stoa_vlp.train.loop import weights_prefix

    prefix = weights_prefix(module)
    weights = model_part(module, load_weights(checkpoint / "model.safetensors"))
    require_matching_answers(module, weights, checkpoint)
    state = resample_frame_tables(module, {prefix + name: value for name, value in weights.items()}, str(checkpoint))
    load_module_state(module, state, str(checkpoint))


def require_matching_answers(module: nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """QA: a ValueError unless the run's answers.json, which the module's answer head was built from,
    holds one answer per output of the checkpoint's answer head."""
    from stoa_vlp.tasks.pipeline import ANSWERS_FILE
    from stoa_vlp.tasks.qa import ANSWER_OUTPUTS, QAModel

    if not isinstance(module, QAModel) or ANSWER_OUTPUTS not in weights:
        return
    answers, outputs = len(module.state_dict()[ANSWER_OUTPUTS]), len(weights[ANSWER_OUTPUTS])
    if answers != outputs:
        raise ValueError(f"{run_dir_of(checkpoint) / ANSWERS_FILE}: {answers} answers, but the answer head of "
                         f"{checkpoint} has {outputs} outputs: {ANSWERS_FILE} does not match the checkpoint's "
                         "answer head")


def init_folder(path: str | Path) -> Path:
    """The folder holding model.safetensors: `path` itself (a checkpoint or save_pretrained folder) or
    the checkpoint a run folder selects (`resolve_checkpoint`)."""
    path = Path(path)
    return path if (path / "model.safetensors").is_file() else resolve_checkpoint(path)


def load_model_weights_from(model: nn.Module, path: str | Path) -> Path:
    """Initialise a STOAVLP from a pre-training checkpoint (folder or run folder) or a save_pretrained folder
    (frame tables resampled when `model` was built with another `model.frames`)."""
    from stoa_vlp.model.checkpoint import model_part, resample_frame_tables
    from stoa_vlp.train.checkpointing import load_module_state, load_weights

    folder = init_folder(path)
    state = resample_frame_tables(model, model_part(model, load_weights(folder / "model.safetensors")), str(folder))
    load_module_state(model, state, str(folder))
    return folder


def device_of(config: Config) -> torch.device:
    from stoa_vlp.train.distributed import choose_device

    return choose_device(config.train.device, 0)


def setting(config: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def preprocessing_settings(config: Config) -> dict[str, object]:
    """The settings that shape the inputs, and how the videos of data.video_root were made (the
    `prepare` settings when they come from `stoa-vlp prepare`)."""
    from stoa_vlp.data.prepare import describe_preparation

    settings = {name: setting(config, name) for name in PREPROCESSING}
    settings[VIDEOS] = describe_preparation(config.data.video_root)
    return settings


def preprocessing_rows(trained: Config, evaluated: Config) -> list[list[object]]:
    """[setting, training value, evaluation value] of each of `preprocessing_settings`."""
    training, evaluation = preprocessing_settings(trained), preprocessing_settings(evaluated)
    return [[name, training[name], evaluation[name]] for name in training]


def metric_rows(results: list[tuple[str, dict[str, float]]]) -> tuple[list[str], list[list[object]]]:
    """(header, rows) of a metrics table with one column per (split label, metrics)."""
    names = []
    for _, metrics in results:
        names += [name for name in metrics if name not in names]
    header = ["metric"] + [label for label, _ in results]
    rows = [[name] + [metrics.get(name, "") for _, metrics in results] for name in names]
    return header, rows


def add_inference_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder, or run folder (its best)")
    parser.add_argument("--detections", metavar="JSONL|STORE",
                        help="object detections of the videos (README: Detections format), or a store of stoa-vlp pack")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override on top of the checkpoint's config (repeatable)")


def inference_config(args, task: str | None = None) -> tuple[Path, Config]:
    """(checkpoint folder, its config with --set and --detections applied); with `task`, a ValueError
    unless the checkpoint was trained for it (`require_trained_for`)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    # the training videos' detections are not the user's videos': none unless --detections or --set give them
    overrides = [path_override("data.detections", args.detections or ""), *args.overrides]
    trained, config = checkpoint_config(checkpoint, overrides)
    if task is not None:
        require_trained_for(checkpoint, trained_for(trained), task)
    return checkpoint, config


def require_text(text: str, what: str) -> None:
    """ValueError when `text` has no word for the tokenizer (blank, or only characters it drops, such as
    a byte-order mark or control characters): it would run as an empty query, question or caption."""
    from stoa_vlp.tokenizer import Tokenizer

    if not Tokenizer().encode_words(text):
        raise ValueError(f"the {what} is empty (no word the tokenizer keeps)")


def inference_detections(config: Config, records: list) -> tuple:
    """(detections, label vocabulary) of `load_detections` for the videos of `records`, with the videos
    that have no line in the file reported as training reports them (their clips get no objects)."""
    from stoa_vlp.data.side_data import load_detections, report_detection_coverage

    detections, label_vocab = load_detections(config)
    if detections is not None:
        video_ids = (record.video_id for record in records)
        report_detection_coverage(config.data.detections, detections, video_ids, "the given videos")
    return detections, label_vocab


def inference_model(args, task: str | None = None):
    """(checkpoint folder, config, model on its device, device) of `inference_config(args, task)`: the
    checkpoint's STOAVLP weights, whatever task it was fine-tuned for unless `task` is given."""
    from stoa_vlp.model import build_model

    checkpoint, config = inference_config(args, task)
    device = device_of(config)
    model = build_model(config.model)
    load_task_weights(model, checkpoint)
    return checkpoint, config, model.to(device), device


def file_records(paths: list[str], text: str):
    """One VideoRecord per video file or frame folder (id = file name stem / folder name), each with
    `text` as its caption."""
    from stoa_vlp.data.annotations import VideoRecord

    records, seen = [], {}
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such video file or frame folder")
        video_id = Path(path).name if Path(path).is_dir() else Path(path).stem
        if video_id in seen:
            raise ValueError(f"{seen[video_id]} and {path} share the video id '{video_id}' (the file name stem)")
        seen[video_id] = path
        records.append(VideoRecord(video_id, str(path), None, None, [text]))
    return records
