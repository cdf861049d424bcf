"""`stoa-vlp index`: encode every video of a folder into a search index."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "encode every video in a folder (with optional detections) into a search index"
EXAMPLES = """examples:
  stoa-vlp index my_videos --checkpoint runs/msrvtt-ret --output my_index
  stoa-vlp index my_videos --checkpoint runs/msrvtt-ret --detections my_videos/detections.jsonl --output my_index
  stoa-vlp index my_videos --checkpoint runs/msrvtt-ret --output my_index --overwrite   (build it again)
Then: stoa-vlp search my_index "a dog catches a frisbee"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stoa_vlp.commands.task_common import add_inference_arguments

    parser.add_argument("folder", help="folder of video files or frame folders (searched recursively; id = file name stem or folder name)")
    parser.add_argument("--output", required=True, help="index folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace the index that --output holds")
    add_inference_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def require_index_output(output: Path, overwrite: bool) -> None:
    """ValueError, before any video is encoded, unless `output` is a new or empty folder, or an index
    to replace with --overwrite (never a folder of other files, such as a run folder)."""
    from stoa_vlp.tasks.search import INDEX_FILE

    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not an index folder")
    if not output.exists() or not any(output.iterdir()):
        return
    if not (output / INDEX_FILE).is_file():
        raise ValueError(f"--output {output} is not empty and holds no {INDEX_FILE}: it is not an index to replace; "
                         "choose a new folder")
    if not overwrite:
        raise ValueError(f"--output {output} holds an index; pass --overwrite to replace it, or choose another folder")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.commands.task_common import file_records, inference_detections, inference_model
    from stoa_vlp.tasks.runs import checkpoint_config
    from stoa_vlp.data.video_files import find_videos
    from stoa_vlp.tasks.search import SearchIndex, encode_readable_videos, save_index, weights_stamp

    require_index_output(Path(args.output), args.overwrite)
    found = find_videos([args.folder])
    if not found:
        raise ValueError(f"{args.folder}: no video files or frame folders")
    checkpoint, config, model, device = inference_model(args, "retrieval")
    records = file_records([path for _, path in found], "video")
    detections, label_vocab = inference_detections(config, records)
    ids, videos, unreadable = encode_readable_videos(model, records, config, detections, label_vocab, device,
                                                     args.folder, progress=not args.no_progress)
    paths = {record.video_id: str(Path(record.path).resolve()) for record in records}
    trained, _ = checkpoint_config(checkpoint, [])
    info = {"checkpoint": str(checkpoint.resolve()), "weights": weights_stamp(checkpoint), "config": config.to_dict(),
            "trained_model": trained.to_dict()["model"]}
    save_index(args.output, SearchIndex(ids, [paths[i] for i in ids], videos, info))
    print(f"indexed {len(ids)} videos from {args.folder} into {args.output} "
          f"({config.model.frames} frames at {config.model.image_size} px, checkpoint {checkpoint})"
          + (f"; {unreadable} unreadable videos skipped (see the warnings above)" if unreadable else ""))
    return 0
