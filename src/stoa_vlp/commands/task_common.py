"""Shared by the downstream commands (finetune, evaluate, caption, answer, index, search): the
checkpoint and config of --checkpoint and --set (loaded with the library's `stoa_vlp.tasks.runs`),
whether it was trained for the task, the videos given, and printing which split and which
preprocessing every number comes from."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from stoa_vlp.config import Config, path_override
from stoa_vlp.tasks.runs import checkpoint_config, load_checkpoint_model, resolve_checkpoint

if TYPE_CHECKING:  # torch is imported where it is used, so that the commands' --help stays quick
    import torch
    from torch import nn

PREPROCESSING = ("model.frames", "model.image_size", "model.text_len", "data.eval_sampling", "data.decoder")
VIDEOS = "videos (data.video_root)"

log = logging.getLogger(__name__)

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


def init_folder(path: str | Path) -> Path:
    """The folder holding model.safetensors: `path` itself (a checkpoint or save_pretrained folder) or
    the checkpoint a run folder selects (`resolve_checkpoint`)."""
    path = Path(path)
    return path if (path / "model.safetensors").is_file() else resolve_checkpoint(path)


def load_model_weights_from(model: nn.Module, path: str | Path) -> Path:
    """Initialise a STOAVLP from a pre-training checkpoint (folder or run folder) or a save_pretrained folder
    (frame tables resampled when `model` was built with another `model.frames`)."""
    from stoa_vlp.model.checkpoint import load_saved_weights, model_part
    from stoa_vlp.train.checkpointing import load_weights

    folder = init_folder(path)
    load_saved_weights(model, folder, model_part(model, load_weights(folder / "model.safetensors")))
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


def inference_config(args, task: str) -> tuple[Path, Config]:
    """(checkpoint folder, its config with --set and --detections applied); a ValueError unless the
    checkpoint was trained for `task` (`require_trained_for`)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    # the training videos' detections are not the user's videos': none unless --detections or --set give them
    overrides = [path_override("data.detections", args.detections or ""), *args.overrides]
    trained, config = checkpoint_config(checkpoint, overrides)
    require_trained_for(checkpoint, trained_for(trained), task)
    return checkpoint, config


def inference_detections(config: Config, records: list) -> tuple:
    """(detections, label vocabulary) of `load_detections` for the videos of `records`, with the videos
    that have no line in the file reported as training reports them (their clips get no objects)."""
    from stoa_vlp.data.side_data import load_detections, report_detection_coverage

    detections, label_vocab = load_detections(config)
    if detections is not None:
        video_ids = (record.video_id for record in records)
        report_detection_coverage(config.data.detections, detections, video_ids, "the given videos")
    return detections, label_vocab


def inference_model(args, task: str):
    """(checkpoint folder, config, model on its device, device) of `inference_config(args, task)`: the
    checkpoint's STOAVLP weights."""
    checkpoint, config = inference_config(args, task)
    run = load_checkpoint_model(checkpoint, config, device_of(config))
    return checkpoint, config, run.model, run.device


def file_records(paths: list[str], text: str):
    """One VideoRecord per video file or frame folder (id = file name stem / folder name), each with
    `text` as its caption."""
    from stoa_vlp.data.annotations import VideoRecord

    records, seen = [], {}
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such video file or frame folder")
        require_not_a_video_folder(Path(path))
        video_id = Path(path).name if Path(path).is_dir() else Path(path).stem
        if video_id in seen:
            raise ValueError(f"{seen[video_id]} and {path} share the video id '{video_id}' (the file name stem)")
        seen[video_id] = path
        records.append(VideoRecord(video_id, str(path), None, None, [text]))
    return records


def require_not_a_video_folder(path: Path) -> None:
    """ValueError when `path` is a folder of video files given as one video (a frame folder holds images)."""
    from stoa_vlp.data.video_files import holds_frames, is_video_file

    if not path.is_dir() or holds_frames(name.name for name in path.iterdir()):
        return
    videos = sorted(name for name in path.iterdir() if is_video_file(name.name))
    if videos:
        raise ValueError(f"{path} is a folder of {len(videos)} video files, not a frame folder: give the videos "
                         f"themselves (e.g. {path / ('*' + videos[0].suffix)})")
