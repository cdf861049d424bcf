"""`stoa-vlp answer`: answer a question about a video with a QA-fine-tuned checkpoint."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import positive_int

HELP = "answer a question about a video with a fine-tuned video-QA checkpoint"
EXAMPLES = """examples:
  stoa-vlp answer --checkpoint runs/qa clip.mp4 "what colour is the shape that is moving left?"
  stoa-vlp answer --checkpoint runs/msrvtt-qa --top 5 video7010.mp4 "what is the man doing?"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stoa_vlp.commands.task_common import add_inference_arguments

    parser.add_argument("video", help="video file or frame folder")
    parser.add_argument("question", help="the question, in quotes")
    add_inference_arguments(parser)
    parser.add_argument("--top", type=positive_int, default=3, help="answers to print, most probable first (default 3)")


def run(args: argparse.Namespace) -> int:
    import torch

    from stoa_vlp.commands.task_common import device_of, file_records, inference_config, inference_detections
    from stoa_vlp.tasks.data import video_loader
    from stoa_vlp.tasks.runs import load_checkpoint_model
    from stoa_vlp.tokenizer import Tokenizer, require_text

    checkpoint, config = inference_config(args, "qa")
    require_text(args.question, "question", Tokenizer(config.model.text_len))
    run = load_checkpoint_model(checkpoint, config, device_of(config))
    records = file_records([args.video], args.question)
    detections, label_vocab = inference_detections(config, records)
    batch = next(iter(video_loader(records, config, detections, label_vocab))).to(run.device)
    with torch.no_grad():
        probabilities = torch.softmax(run.qa_model.logits(batch).float(), dim=-1)[0]
    top = probabilities.topk(min(args.top, len(probabilities)))
    print(f"Q: {args.question}")
    for probability, label in zip(top.values.tolist(), top.indices.tolist()):
        print(f"A: {run.answers.answers[label]}\t{probability:.3f}")
    return 0
