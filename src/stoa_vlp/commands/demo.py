"""`stoa-vlp demo`: the main job, end to end on the synthetic world (see stoa_vlp.demo)."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import non_negative_int, positive_int

CLIPS = {"train": 300, "val": 20, "test": 100}  # clips the demo renders by default, per split

HELP = ("render a synthetic world, pre-train the tiny model on the CPU, evaluate zero-shot retrieval and object "
        "alignment, and fine-tune and score captioning and video QA")
EXAMPLES = """examples:
  stoa-vlp demo
  stoa-vlp demo --output runs/my-demo --overwrite
  stoa-vlp demo --train-clips 600 --set train.steps=600      (longer, better)
  stoa-vlp demo --train-clips 40 --test-clips 20 --set train.steps=20   (a smoke test)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="folder for everything the demo writes (default runs/demo-<time>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a folder that holds a previous demo, finished or failed")
    parser.add_argument("--train-clips", type=positive_int, help=f"training clips (default {CLIPS['train']})")
    parser.add_argument("--val-clips", type=non_negative_int,
                        help=f"validation clips, 0 for none (default {CLIPS['val']})")
    parser.add_argument("--test-clips", type=positive_int, help=f"test clips for retrieval (default {CLIPS['test']})")
    parser.add_argument("--world", metavar="DIR", default="",
                        help="reuse a world rendered earlier (a demo's world/ or `stoa-vlp synth` output) instead of "
                             "rendering; its own clips are used, so the clip counts cannot be given with it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the training run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override on top of the demo's (tiny preset), e.g. --set train.steps=600")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from stoa_vlp.demo import DemoSettings, run_demo

    folder = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    counts = {split: getattr(args, f"{split}_clips") for split in CLIPS}
    if args.world and any(count is not None for count in counts.values()):
        raise ValueError(f"--world {args.world} brings its own clips: --train-clips, --val-clips and --test-clips "
                         "apply to a world the demo renders")
    counts = {split: CLIPS[split] if count is None else count for split, count in counts.items()}
    settings = DemoSettings(
        train_clips=counts["train"], val_clips=counts["val"], test_clips=counts["test"], seed=args.seed,
        overrides=args.overrides, world=args.world,
    )
    demo = run_demo(settings, folder, overwrite=args.overwrite)
    written = ", ".join(sorted(path.name + "/" * path.is_dir() for path in folder.iterdir()))
    print(f"\ndemo finished in {demo.seconds['total']:.0f} s; everything is in {folder}/ ({written})")
    return 0
