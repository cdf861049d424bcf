"""Options shared by the commands that train or evaluate: the config, dotted overrides, the run
folder and resumption.

    --config PRESET|YAML     a preset name (tiny, base) or a YAML file with model/loss/data/train sections
    --set KEY=VALUE          a dotted override, repeatable (`--set train.lr=3.0e-4 --set data.batch_size=32`)
    --output DIR             the run folder (sets train.output_dir)
    --resume PATH|latest     continue from a checkpoint folder, a run folder, or the run's newest checkpoint
    --overwrite              replace a run folder that already holds a run
Every option of the config file can be given with --set; the command line wins over the file.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from stoa_vlp.config import Config, TrainConfig, load_config
from stoa_vlp.tasks.runs import LABEL_VOCAB_FILE

log = logging.getLogger(__name__)



def add_config_arguments(parser: argparse.ArgumentParser, default_config: str = "base") -> None:
    parser.add_argument("--config", default=default_config, metavar="PRESET|YAML",
                        help=f"preset name (tiny, base) or YAML config file (default {default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, e.g. --set train.lr=3.0e-4 (repeatable)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="run folder (default: train.output_dir of the config)")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="resume from a checkpoint folder, a run folder, or 'latest' (the run folder's newest)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run folder that holds a previous run")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config named by --config with the --set overrides applied; --output sets train.output_dir."""
    config = load_config(args.config, args.overrides)
    if getattr(args, "output", None):
        config.train.output_dir = args.output
    return config


def check_run_files(config: Config, resume: bool, fallback_runs: tuple[Path, ...] = ()) -> None:
    """Before the run folder is written: a file that a fresh run reads and the user named must exist:
    data.label_vocab (unless a run of `fallback_runs`, the --init run, has the vocabulary that
    `adopt_label_vocab` then uses: a moved run's recorded path) and QA's task.answer_vocab. A resumed
    run reads its own run folder's files instead."""
    if resume:
        return
    problems = []
    label_vocab = config.data.label_vocab
    if label_vocab and not Path(label_vocab).is_file():
        if not any((Path(run) / LABEL_VOCAB_FILE).is_file() for run in fallback_runs):
            problems.append(f"data.label_vocab {label_vocab} does not exist (leave it empty to build the "
                            "vocabulary from data.detections)")
    answer_vocab = config.task.answer_vocab
    if config.task.name == "qa" and answer_vocab and not Path(answer_vocab).is_file():
        problems.append(f"task.answer_vocab {answer_vocab} does not exist (leave it empty for the task.answers "
                        "most frequent training answers)")
    if problems:
        raise ValueError("; ".join(problems))


def check_resume(args: argparse.Namespace, config: Config) -> None:
    """--resume names a complete checkpoint (resolved as the Trainer will), checked before the run
    folder is written."""
    from stoa_vlp.train.checkpointing import resolve_resume

    if getattr(args, "resume", None):
        resolve_resume(args.resume, Path(config.train.output_dir))


def warn_if_random_towers(config: Config) -> None:
    """Training from random CLIP towers is legitimate (the tiny preset, ablations) but rarely meant."""
    if not config.model.init_checkpoint:
        log.warning("model.init_checkpoint is not set: the CLIP towers start from random weights "
                    "(give an OpenAI CLIP .pt or open_clip checkpoint to start from CLIP)")


def prepare_run(config: Config, env, args: argparse.Namespace) -> Path:
    """The run folder (train.output_dir), prepared by the main rank (--overwrite, --resume) while the
    other ranks wait; then every rank seeds its generators with train.seed, so that every rank builds
    the same initial weights (the Trainer then reseeds the ranks after the first)."""
    from stoa_vlp.train.checkpointing import prepare_run_dir
    from stoa_vlp.train.data_position import seed_everything
    from stoa_vlp.train.distributed import barrier

    run_dir = Path(config.train.output_dir)
    if env.is_main:
        prepare_run_dir(run_dir, overwrite=args.overwrite, resume=bool(args.resume))
    barrier(env)
    seed_everything(config.train.seed)
    return run_dir


def validation_overlap(selected_on: Config, evaluated: Config, split: str) -> int | None:
    """How many of the videos of `evaluated`'s data.<split> the data.val of `selected_on` also names (the
    split its checkpoints are selected on), with a warning when any do: selection on test videos
    inflates the test numbers (CLIP4Clip's MSR-VTT "val" is the 1k-A test set). Each
    file is read as its split (MSRVTT_data.json holds both, apart). None when it cannot tell, which
    never stops a run: a split not set, a file that cannot be read (a warning says why), or WebDataset
    shards, whose videos are not listed up front (the same shards on both sides are warned about)."""
    from stoa_vlp.data.dataset import is_webdataset
    from stoa_vlp.tasks.pipeline import split_video_ids

    val, other = selected_on.data.val, getattr(evaluated.data, split)
    if not (val and other):
        return None
    if is_webdataset(selected_on, val) or is_webdataset(evaluated, other):
        if Path(val).resolve() == Path(other).resolve():
            log.warning("data.val and data.%s are both %s: the checkpoint is selected on the videos it is "
                        "tested on", split, val)
        return None
    try:
        videos = split_video_ids(evaluated, split)
        shared = videos & split_video_ids(selected_on, "val")
    except (ValueError, OSError) as error:  # AnnotationError is a ValueError
        log.warning("cannot tell whether data.val (%s) holds videos of data.%s: %s", val, split, error)
        return None
    if shared:
        log.warning(
            "data.val and data.%s share %d of the %d %s videos (e.g. %s; data.val: %s, data.%s: %s): the "
            "checkpoint is selected on videos it is then tested on, so the numbers on them are not held out; "
            "validate on videos held out of the training list instead",
            split, len(shared), len(videos), split, sorted(shared)[0], val, split, other,
        )
    return len(shared)


def set_deterministic(train: TrainConfig) -> None:
    """train.deterministic: deterministic GPU kernels (an operation that has none stops the run naming it),
    cuDNN without autotuning, and the cuBLAS workspace that deterministic matrix products need."""
    import torch

    if not train.deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
