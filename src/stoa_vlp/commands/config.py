"""`stoa-vlp config`: print a config, every key with its value and what it means."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.common import add_config_arguments

HELP = "print a config (a preset or YAML file with --set overrides): every key, its value and what it means"
EXAMPLES = """examples:
  stoa-vlp config                                    (the base preset: CLIP ViT-B/16, the paper's sizes)
  stoa-vlp config --config tiny --set model.frames=8
  stoa-vlp config --set train.lr=3.0e-4 > my.yaml    (then: stoa-vlp pretrain --config my.yaml)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.config import load_config
    from stoa_vlp.config_comments import commented_yaml

    print(commented_yaml(load_config(args.config, args.overrides)), end="")
    return 0
