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
import random
from pathlib import Path

import numpy as np
import torch

from stoa_vlp.config import Config, load_config


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run(config: Config, env, args: argparse.Namespace) -> Path:
    """The run folder (train.output_dir), prepared by the main rank (--overwrite, --resume) while the
    other ranks wait; then every rank seeds its generators with train.seed."""
    from stoa_vlp.train.checkpointing import prepare_run_dir
    from stoa_vlp.train.distributed import barrier

    run_dir = Path(config.train.output_dir)
    if env.is_main:
        prepare_run_dir(run_dir, overwrite=args.overwrite, resume=bool(args.resume))
    barrier(env)
    seed_everything(config.train.seed)
    return run_dir
