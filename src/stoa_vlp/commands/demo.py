"""`stoa-vlp demo`: the main job, end to end on the synthetic world (see stoa_vlp.train.demo)."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import non_negative_int, positive_int

HELP = "render a synthetic world, pre-train the tiny model on the CPU and evaluate zero-shot retrieval"
EXAMPLES = """examples:
  stoa-vlp demo
  stoa-vlp demo --output runs/my-demo --overwrite
  stoa-vlp demo --train-clips 600 --set train.steps=600      (longer, better)
  stoa-vlp demo --train-clips 40 --test-clips 20 --set train.steps=20   (a smoke test)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="folder for everything the demo writes (default runs/demo-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that holds a previous demo")
    parser.add_argument("--train-clips", type=positive_int, default=300, help="training clips (default 300)")
    parser.add_argument("--val-clips", type=non_negative_int, default=20, help="validation clips, 0 for none (default 20)")
    parser.add_argument("--test-clips", type=positive_int, default=100, help="test clips for retrieval (default 100)")
    parser.add_argument("--world", metavar="DIR", default="",
                        help="reuse a world rendered earlier (a demo's world/ or `stoa-vlp synth` output) instead of rendering")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the training run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override on top of the demo's (tiny preset), e.g. --set train.steps=600")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from stoa_vlp.train.checkpointing import RUN_MARKER, CheckpointError
    from stoa_vlp.train.demo import METRICS_FILE, REPORT_FILE, DemoSettings, run_demo

    folder = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if folder.exists() and any(folder.iterdir()):
        previous = (folder / REPORT_FILE).exists() or (folder / "pretrain" / RUN_MARKER).exists()
        if not args.overwrite:
            raise CheckpointError(f"{folder} is not empty; pass --overwrite to replace it or choose another --output")
        if not previous:
            raise CheckpointError(f"--overwrite: {folder} does not hold a stoa-vlp demo; refusing to delete it")
        import shutil

        shutil.rmtree(folder)
    settings = DemoSettings(
        train_clips=args.train_clips, val_clips=args.val_clips, test_clips=args.test_clips, seed=args.seed,
        overrides=args.overrides, world=args.world,
    )
    demo = run_demo(settings, folder)
    print(f"\ndemo finished in {demo.seconds['total']:.0f} s; everything is in {folder}/ "
          f"({REPORT_FILE}, {METRICS_FILE}, world/, pretrain/)")
    return 0
