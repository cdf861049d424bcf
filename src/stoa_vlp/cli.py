"""The `stoa-vlp` command line: one subcommand per module in `stoa_vlp.commands`.

Each command module defines `HELP` (one line), `EXAMPLES` (shown by --help),
`add_arguments(parser)` and `run(args) -> int`. Modules import heavy libraries inside `run`,
so `stoa-vlp --help` stays fast.

`main` raises what a command raises (for callers and tests); the `stoa-vlp` executable runs
`console_main`, which prints a bad input's message (a missing file, a malformed annotation, a
config error...) as one line and exits with 2, or with -v shows the traceback.
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
    "pack",
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
    "config",
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


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The errors that report bad input with a message naming it, rather than a fault of the program
    (a CheckpointError is a ValueError)."""
    from stoa_vlp.data.decode import VideoError
    from stoa_vlp.data.skips import TooManyBadSamples
    from stoa_vlp.metrics.captioning import JavaMissingError
    from stoa_vlp.train.loop import NonFiniteLossError

    return (OSError, ValueError, VideoError, JavaMissingError, NonFiniteLossError, TooManyBadSamples)


def console_main(argv: list[str] | None = None) -> int:
    """The `stoa-vlp` executable: `main`, with bad input reported in one line (exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except bad_input_errors() as error:
        if "-v" in argv or "--verbose" in argv:
            raise
        command = next((word for word in argv if word in COMMANDS), "")
        print(f"stoa-vlp {command}: error: {error} (stoa-vlp -v {command} ... shows the traceback)".replace("  ", " "), file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(console_main())
