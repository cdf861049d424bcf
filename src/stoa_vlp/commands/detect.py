"""`stoa-vlp detect`: object detections for a video collection, as detections JSONL."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import fraction, positive_float, positive_int

HELP = "detect objects in videos (torchvision Faster R-CNN, local weights) and write detections JSONL"
EXAMPLES = """examples:
  stoa-vlp detect videos/ --weights fasterrcnn_resnet50_fpn_v2_coco.pth --out detections.jsonl
  stoa-vlp detect a.mp4 b.mp4 --weights frcnn.pth --out dets.jsonl --fps 2 --batch-size 16 --device cuda

The weights file is a state dict of torchvision's fasterrcnn_resnet50_fpn_v2 (COCO, 91 classes),
e.g. the file torchvision itself downloads for FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="video files, frame folders, or folders (searched recursively)")
    parser.add_argument("--weights", required=True, help="detector state dict (.pth/.pt/.safetensors)")
    parser.add_argument("--out", required=True, help="detections JSONL to write")
    parser.add_argument("--fps", type=positive_float, default=1.0, help="frames per second to detect (default 1)")
    parser.add_argument("--frame-rate", type=positive_float, default=1.0,
                        help="frames per second at which frame folders were extracted (default 1; data.frame_rate)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="frames per detector call")
    parser.add_argument("--score-threshold", type=fraction, default=0.3, help="lowest confidence kept")
    parser.add_argument("--max-boxes", type=positive_int, default=50, help="boxes per frame, at most")
    parser.add_argument("--min-size", type=positive_int, default=800, help="detector input short side")
    parser.add_argument("--max-size", type=positive_int, default=1333, help="detector input long side, at most")
    parser.add_argument("--proposals", type=positive_int, default=1000, help="region proposals per frame (fewer: faster)")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1 ...")


def some_videos(detected, out: str, count: int):
    """The detected videos; a ValueError at the end when there were none, so that the atomic write
    of `out` is abandoned and an earlier file stays as it was."""
    written = 0
    for video in detected:
        written += 1
        yield video
    if written == 0:
        raise ValueError(f"none of the {count} videos could be read: {out} was not written (see the warnings above)")


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from stoa_vlp.data.detect import (
        DetectReport,
        DetectSettings,
        build_detector,
        detect_videos,
        pick_device,
    )
    from stoa_vlp.data.detections import write_detections
    from stoa_vlp.data.video_files import find_videos

    log = logging.getLogger("stoa_vlp.detect")
    settings = DetectSettings(
        fps=args.fps,
        batch_size=args.batch_size,
        score_threshold=args.score_threshold,
        max_boxes=args.max_boxes,
        min_size=args.min_size,
        max_size=args.max_size,
        proposals=args.proposals,
        frame_rate=args.frame_rate,
    )
    device = pick_device(args.device)
    videos = find_videos(args.inputs)
    if not videos:
        log.error("no videos found in %s", " ".join(args.inputs))
        return 1
    model = build_detector(args.weights, settings, device)
    report = DetectReport()
    progress = tqdm(detect_videos(videos, model, settings, device, report), total=len(videos), unit="video")
    write_detections(args.out, some_videos(progress, args.out, len(videos)))
    log.info(
        "%d videos, %d frames, %d boxes written to %s on %s; %d unreadable videos skipped",
        report.videos, report.frames, report.boxes, args.out, device, len(report.failed),
    )
    for failure in report.failed:
        log.warning("skipped %s", failure)
    return 0
