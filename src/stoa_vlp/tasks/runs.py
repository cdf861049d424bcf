"""Trained runs, from Python and for the inference commands: a run folder (its best checkpoint) or a
checkpoint folder to the model it holds, with the config it was trained with.

    run = load_run("runs/msrvtt-ret")      # eval mode, on the GPU when there is one
    run.model, run.config, run.device      # a QA run also has run.qa_model and run.answers

A run keeps the object-class vocabulary its weights use as RUN/label_vocab.json (`keep_label_vocab`,
when training), which a later run started from it adopts (`adopt_label_vocab`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stoa_vlp.config import Config, apply_overrides, from_dict
from stoa_vlp.data.jsonl import read_json_object

if TYPE_CHECKING:  # torch is imported where it is used, so that the commands' --help stays quick
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.json"  # RUN/answers.json: what each output of a QA run's answer head stands for
LABEL_VOCAB_FILE = "label_vocab.json"  # RUN/label_vocab.json: the object-class ids the run's weights use


@dataclass
class TrainedRun:
    checkpoint: Path  # the checkpoint folder loaded (RUN/checkpoints/step_N)
    config: Config  # what it was trained with (and the overrides); data.label_vocab: the run's class ids
    model: nn.Module  # the STOAVLP, in eval mode on `device`
    device: torch.device
    qa_model: nn.Module | None = None  # a QA run's QAModel: `model` with its answer head
    answers: object | None = None  # a QA run's AnswerVocab: `answers.answers[i]` is the head's output i


def load_run(path: str | Path, device: str | torch.device | None = None, overrides: list[str] = ()) -> TrainedRun:
    """The model of a run folder (its best-on-validation checkpoint, else its newest) or checkpoint
    folder, in eval mode on `device` (default: the GPU when there is one, else the CPU), with the
    config it was trained with: the model, data and task settings, and data.label_vocab pointing at
    the run's label_vocab.json, so that `load_detections(run.config)` gives the class ids the model
    learned. `overrides` are dotted settings as `--set` takes them ("data.detections=my.jsonl",
    "model.frames=8"). A QA run also gives its answer head (`qa_model`) and answers."""
    import torch

    checkpoint = resolve_checkpoint(path)
    _, config = checkpoint_config(checkpoint, list(overrides))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_checkpoint_model(checkpoint, config, torch.device(device))


def load_checkpoint_model(checkpoint: Path, config: Config, device: torch.device) -> TrainedRun:
    """`load_run` of a checkpoint folder with its config (`checkpoint_config`) already read."""
    from stoa_vlp.model.checkpoint import build_model_for_weights
    from stoa_vlp.tasks.qa import QAModel

    model = build_model_for_weights(config.model)
    if config.task.name != "qa":
        load_task_weights(model, checkpoint)
        return TrainedRun(checkpoint, config, model.to(device).eval(), device)
    from stoa_vlp.tasks.pipeline import check_qa_fusion

    check_qa_fusion(config.model)  # an override may have lengthened the sequence
    answers = read_answers(run_dir_of(checkpoint))
    qa_model = QAModel(model, len(answers))
    load_task_weights(qa_model, checkpoint)
    qa_model.to(device).eval()
    return TrainedRun(checkpoint, config, model, device, qa_model, answers)


def read_answers(run_dir: Path):
    """The AnswerVocab of a QA run (RUN/answers.json), which its answer head's outputs stand for."""
    from stoa_vlp.tasks.qa import AnswerVocab

    saved = Path(run_dir) / ANSWERS_FILE
    if not saved.exists():
        raise FileNotFoundError(f"{saved} does not exist: it holds the answers the QA head was fine-tuned on "
                                "(written by `stoa-vlp finetune --task qa`); give the checkpoint inside its run")
    return AnswerVocab.load(saved)


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
    state_file = checkpoint / "state.json"
    trained = from_dict(read_json_object(state_file, {"config": dict})["config"], str(state_file))
    applied = apply_overrides(copy.deepcopy(trained), overrides)
    for config in (trained, applied):
        adopt_label_vocab(config, run_dir_of(checkpoint))
    return trained, applied


def adopt_label_vocab(config: Config, *run_dirs: Path) -> None:
    """When data.label_vocab names no file, point it at the label_vocab.json of the first of `run_dirs`
    that has one: the class ids that the weights in that run were trained with."""
    if config.data.label_vocab and Path(config.data.label_vocab).exists():
        return
    for run_dir in run_dirs:
        saved = Path(run_dir) / LABEL_VOCAB_FILE
        if saved.exists():
            if config.data.label_vocab:
                log.warning("%s does not exist: using %s", config.data.label_vocab, saved)
            config.data.label_vocab = str(saved.resolve())
            return


def keep_label_vocab(config: Config, label_vocab, run_dir: Path, env) -> None:
    """Save the vocabulary the model trains with (None: no detections) as RUN/label_vocab.json and point
    data.label_vocab at it, so that checkpoints, evaluation and later fine-tuning use the same ids."""
    from stoa_vlp.train.distributed import barrier

    if label_vocab is None:
        return
    path = (Path(run_dir) / LABEL_VOCAB_FILE).resolve()
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        label_vocab.save(path)
    barrier(env)
    config.data.label_vocab = str(path)


def load_task_weights(module: nn.Module, checkpoint: Path) -> None:
    """Strictly load a checkpoint's model.safetensors into the task module that wrote it
    (frame tables resampled when the module was built with another `model.frames`)."""
    from stoa_vlp.model.checkpoint import load_saved_weights, model_part, weights_prefix
    from stoa_vlp.train.checkpointing import load_weights

    prefix = weights_prefix(module)
    weights = model_part(module, load_weights(checkpoint / "model.safetensors"))
    require_matching_answers(module, weights, checkpoint)
    load_saved_weights(module, checkpoint, {prefix + name: value for name, value in weights.items()})


def require_matching_answers(module: nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """QA: a ValueError unless the run's answers.json, which the module's answer head was built from,
    holds one answer per output of the checkpoint's answer head."""
    from stoa_vlp.tasks.qa import ANSWER_OUTPUTS, QAModel

    if not isinstance(module, QAModel) or ANSWER_OUTPUTS not in weights:
        return
    answers, outputs = len(module.state_dict()[ANSWER_OUTPUTS]), len(weights[ANSWER_OUTPUTS])
    if answers != outputs:
        raise ValueError(f"{run_dir_of(checkpoint) / ANSWERS_FILE}: {answers} answers, but the answer head of "
                         f"{checkpoint} has {outputs} outputs: {ANSWERS_FILE} does not match the checkpoint's "
                         "answer head")
