"""The `stoa-vlp` command line: one subcommand per module in `stoa_vlp.commands`.

Each command module defines `HELP` (one line), `EXAMPLES` (shown by --help),
`add_arguments(parser)` and `run(args) -> int`. Modules import heavy libraries inside `run`,
so `stoa-vlp --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = [
    "synth",
    "prepare",
    "detect",
    "vinvl",
    "tag",
    "pretrain",
    "finetune",
    "evaluate",
    "demo",
    "caption",
    "answer",
    "index",
    "search",
    "visualise",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stoa-vlp",
        description="STOA-VLP video-language pre-training, fine-tuning, evaluation and use.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"stoa_vlp.commands.{name}")
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
