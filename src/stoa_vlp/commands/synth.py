"""`stoa-vlp synth`: render the synthetic moving-objects world."""

from __future__ import annotations

import argparse
import os

from stoa_vlp.commands.arguments import fraction, non_negative_float, non_negative_int, positive_float, positive_int

HELP = "render the synthetic moving-objects world (videos, captions, detections, QA, multiple-choice)"
EXAMPLES = """examples:
  stoa-vlp synth data/world
  stoa-vlp synth data/world --train 1000 --val 100 --test 100 --seed 1 --size 96
  stoa-vlp synth data/world --no-noise --detection-classes shape
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder to write into (created)")
    parser.add_argument("--train", type=positive_int, default=200, help="training clips (default 200)")
    parser.add_argument("--val", type=non_negative_int, default=50, help="validation clips (default 50)")
    parser.add_argument("--test", type=non_negative_int, default=50, help="test clips (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="the world is a function of the seed")
    parser.add_argument("--size", type=positive_int, default=64, help="frame width and height in pixels (even)")
    parser.add_argument("--seconds", type=positive_float, default=3.0, help="clip length")
    parser.add_argument("--fps", type=positive_float, default=8.0, help="frames per second")
    parser.add_argument("--max-objects", type=int, default=3, choices=[1, 2, 3], help="objects per clip, at most")
    parser.add_argument("--captions", type=positive_int, default=5, help="captions per clip")
    parser.add_argument("--questions", type=non_negative_int, default=4, help="QA pairs per clip")
    parser.add_argument("--keyframe-interval", type=positive_int, default=8, help="H.264 GOP length in frames")
    parser.add_argument("--detection-classes", choices=["object", "shape"], default="object",
                        help="detection class names: 'red circle' (object) or 'circle' (shape)")
    parser.add_argument("--jitter", type=non_negative_float, default=0.05, help="box edge noise, fraction of box size")
    parser.add_argument("--miss-rate", type=fraction, default=0.1, help="chance a true box is missing")
    parser.add_argument("--false-positives", type=non_negative_float, default=0.2, help="spurious boxes per frame (mean)")
    parser.add_argument("--no-noise", action="store_true", help="exact boxes with confidence 1")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="render processes")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.data.synth import DetectionNoise, render_world

    if args.no_noise:
        noise = DetectionNoise.none()
    else:
        noise = DetectionNoise(jitter=args.jitter, miss_rate=args.miss_rate, false_positives=args.false_positives)
    paths = render_world(
        args.out_dir,
        train=args.train,
        val=args.val,
        test=args.test,
        seed=args.seed,
        size=args.size,
        seconds=args.seconds,
        fps=args.fps,
        max_objects=args.max_objects,
        captions_per_clip=args.captions,
        questions_per_clip=args.questions,
        keyframe_interval=args.keyframe_interval,
        noise=noise,
        detection_classes=args.detection_classes,
        workers=args.workers,
    )
    print(f"videos:      {paths.videos}")
    print(f"annotations: {paths.annotations}")
    print(f"detections:  {paths.detections}")
    print(f"QA:          {', '.join(str(p) for p in paths.qa.values())}")
    print(f"choices:     {', '.join(str(p) for p in paths.mc.values())}")
    return 0
