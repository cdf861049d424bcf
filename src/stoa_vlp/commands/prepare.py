"""`stoa-vlp prepare`: re-encode a video collection for fast decoding, with a manifest."""

from __future__ import annotations

import argparse
import logging
import os

from stoa_vlp.commands.arguments import crf, positive_float, positive_int

HELP = "re-encode videos (fps, short side, short keyframe interval) for fast training-time decoding"
EXAMPLES = """examples:
  stoa-vlp prepare raw_videos/ data/prepared
  stoa-vlp prepare clip.mp4 data/prepared
  stoa-vlp prepare msrvtt/MSRVTT_data.json data/msrvtt --split train --video-root msrvtt/videos
  stoa-vlp prepare raw_videos/ data/prepared --fps 4 --short-side 224 --keyframe-interval 1 --crf 23 --workers 8

Writes OUT/videos/<video_id>.mp4 and OUT/manifest.jsonl; a rerun skips finished videos.
Train on the result with data.video_root=OUT/videos.
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a video file, a folder of videos or frame folders (searched recursively), "
                                      "or an annotation file")
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--fps", type=positive_float, default=2.0, help="output frame rate (default 2)")
    parser.add_argument("--short-side", type=positive_int, default=256, help="output short side in pixels (default 256)")
    parser.add_argument("--keyframe-interval", type=positive_float, default=0.5,
                        help="seconds between keyframes (default 0.5: at 2 fps every frame is a keyframe)")
    parser.add_argument("--crf", type=crf, default=28, help="libx264 quality, lower is better (default 28)")
    parser.add_argument("--preset", default="veryfast", help="libx264 speed preset (default veryfast)")
    parser.add_argument("--tune", default="fastdecode", help="libx264 tune (default fastdecode; '' for none)")
    parser.add_argument("--frame-rate", type=positive_float, default=1.0,
                        help="rate at which input frame folders were extracted (default 1; data.frame_rate)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="encoding processes")
    parser.add_argument("--format", default="auto", help="annotation format when INPUT is a file (default auto)")
    parser.add_argument("--split", default=None, help="annotation split (train, val, test) where the format needs one")
    parser.add_argument("--video-root", default=None, help="where the annotation file's videos are")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.data.annotations import read_annotations
    from stoa_vlp.data.prepare import PrepareOptions, prepare_videos
    from stoa_vlp.data.video_files import find_videos, is_video_file

    if os.path.isdir(args.input) or is_video_file(args.input):
        videos = find_videos([args.input])
    else:
        records = read_annotations(args.input, args.format, args.split, args.video_root)
        unique = {record.video_id: record.path for record in records}
        shard_paths = [path for path in unique.values() if "::" in path]
        if shard_paths:
            log.error("%s: WebDataset shards are streamed as they are; prepare works on video files", args.input)
            return 2
        videos = sorted(unique.items())
    if not videos:
        log.error("%s: no videos found", args.input)
        return 2
    options = PrepareOptions(args.fps, args.short_side, args.keyframe_interval, args.crf, args.preset, args.tune,
                             args.frame_rate)
    entries = prepare_videos(videos, args.out_dir, options, args.workers, progress=not args.no_progress)
    failed = sum(entry.status != "ok" for entry in entries)
    log.info("prepared %d videos into %s (%d failed)", len(entries) - failed, args.out_dir, failed)
    return 1 if failed == len(entries) else 0
