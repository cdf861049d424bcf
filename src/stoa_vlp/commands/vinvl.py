"""`stoa-vlp vinvl`: VinVL / scene_graph_benchmark predictions of video frames as detections JSONL."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import non_negative_int, positive_float

HELP = "convert VinVL predictions of extracted frames (predictions.tsv) into detections JSONL"
EXAMPLES = """examples:
  stoa-vlp vinvl output/predictions.tsv --fps 1 --hw frames.hw.tsv --out detections.jsonl

Image keys name the video and the frame: <folder>/<file> is frame n of video <folder> (all before
the last '/'), n the last digits of the file name (video17/frame_0003.jpg: video17, frame 3); a key
without '/' is <video_id>_<n> (video17_0003). Frame n is at (n - --start-number) / --fps seconds, as
the frame-folder reader puts a folder's first image at 0 s; a lower n is an error, and no frame
numbered --start-number in any video a warning. Boxes stay in pixels of the frames VinVL saw, so
those frames must have the video's size. scene_graph_benchmark's predictions.tsv holds no image
sizes: give the dataset's .hw.tsv (<key>\\t[{"height": H, "width": W}]) with --hw.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", help="VinVL prediction TSV: <image key>\\t{\"objects\": [...]} per line")
    parser.add_argument("--fps", type=positive_float, required=True, help="rate at which the frames were extracted")
    parser.add_argument("--start-number", type=non_negative_int, default=1, metavar="N",
                        help="number of the frame at 0 s (default 1: ffmpeg numbers the images it extracts from 1, "
                             "%%04d.jpg from 0001, unless given -start_number; 0 for frames numbered from 0)")
    parser.add_argument("--hw", metavar="TSV", help="image sizes, when the predictions lack image_w/image_h")
    parser.add_argument("--out", required=True, help="detections JSONL to write")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.data.detections import read_hw_tsv, read_vinvl_tsv, write_detections

    sizes = read_hw_tsv(args.hw) if args.hw else None
    videos = read_vinvl_tsv(args.predictions, args.fps, sizes, args.start_number)
    count = write_detections(args.out, videos)
    frames = sum(len(video.frames) for video in videos)
    boxes = sum(len(frame.classes) for video in videos for frame in video.frames)
    print(f"{count} videos, {frames} frames, {boxes} boxes written to {args.out}")
    return 0
