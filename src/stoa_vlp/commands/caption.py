"""`stoa-vlp caption`: print a caption for each video file with a caption-fine-tuned checkpoint (or,
zero-shot, a pre-training checkpoint's prefix-LM head)."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import positive_int

HELP = "caption videos (files or frame folders) with a captioning checkpoint, or a pre-training one (zero-shot)"
EXAMPLES = """examples:
  stoa-vlp caption --checkpoint runs/cap clip1.mp4 clip2.mp4
  stoa-vlp caption --checkpoint runs/cap --beam 5 --detections dets.jsonl videos/*.mp4
  stoa-vlp caption --checkpoint runs/pretrain clip1.mp4      (zero-shot, with the pre-trained prefix-LM head)
Frames and preprocessing are the checkpoint's training settings (override with --set). A checkpoint
fine-tuned for another task (retrieval, qa, mc) is refused: its captioning head was not trained with it.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stoa_vlp.commands.task_common import add_inference_arguments

    parser.add_argument("videos", nargs="+", help="video files or frame folders")
    add_inference_arguments(parser)
    parser.add_argument("--beam", type=positive_int, help="beam size (default task.beam_size of the checkpoint; 1 = greedy)")
    parser.add_argument("--length-penalty", type=float, help="beam length penalty (default task.length_penalty)")
    parser.add_argument("--max-tokens", type=positive_int,
                        help="most generated tokens (default task.max_caption_tokens of the checkpoint; "
                             "model.text_len - 1 when that is 0)")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.commands.task_common import file_records, inference_detections, inference_model
    from stoa_vlp.tasks.captioning import generate_captions
    from stoa_vlp.tasks.data import video_loader
    from stoa_vlp.tasks.retrieval import encode_videos
    from stoa_vlp.tokenizer import Tokenizer

    _, config, model, device = inference_model(args, "captioning")
    records = file_records(args.videos, "video")
    detections, label_vocab = inference_detections(config, records)
    loader = video_loader(records, config, detections, label_vocab)
    ids, videos = encode_videos(model, loader, device, progress=config.train.progress)
    beam = args.beam or config.task.beam_size
    penalty = config.task.length_penalty if args.length_penalty is None else args.length_penalty
    captions = generate_captions(model, videos, Tokenizer(config.model.text_len), beam, penalty,
                                 args.max_tokens or config.task.max_caption_tokens or None)
    by_id = dict(zip(ids, captions))
    for record in records:
        print(f"{record.path}\t{by_id[record.video_id]}")
    return 0
