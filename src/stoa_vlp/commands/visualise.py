"""`stoa-vlp visualise`: one clip and caption as the model sees them, with what its objects and actions match."""

from __future__ import annotations

import argparse
import logging

HELP = "draw a clip's input frames and boxes, and the caption words its trajectories and actions match"
EXAMPLES = """examples:
  stoa-vlp visualise --checkpoint runs/pretrain clip.mp4 "a dog chases a ball" --detections dets.jsonl --out dog.png
  stoa-vlp visualise --checkpoint runs/msrvtt-ret frames/video7010 "a man is cooking" --out cook.png --json cook.json
Writes a PNG: the sampled frames (with each box coloured by its trajectory), the caption, the
contrastive cosine, the matching head's probability, and the Hungarian matches of trajectories to
the caption's nouns and of action queries to its verbs (spaCy tags, data.spacy_model; every word
is a candidate with --no-tags or without spaCy's pipeline). Object boxes need --detections.
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stoa_vlp.commands.task_common import add_inference_arguments

    parser.add_argument("video", help="video file or frame folder")
    parser.add_argument("caption", help="the caption to align")
    add_inference_arguments(parser)
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--json", metavar="FILE", help="also write the scores, boxes and matches as JSON")
    parser.add_argument("--no-tags", action="store_true", help="every word is a candidate (no spaCy noun/verb tags)")


def caption_tags(caption: str, tokenizer, spacy_model: str):
    """(1, L) noun/verb tags of the caption from spaCy, or None when its pipeline is not installed."""
    import torch

    from stoa_vlp.data.tags import load_spacy, tag_tokens

    try:
        nlp = load_spacy(spacy_model)
    except (ImportError, OSError) as error:
        log.warning("no noun/verb tags (%s): every word is a candidate of objects and actions", error)
        return None
    return torch.from_numpy(tag_tokens([caption], tokenizer, nlp)[0])[None]


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from stoa_vlp.commands.task_common import file_records, inference_detections, inference_model
    from stoa_vlp.tasks.data import video_loader
    from stoa_vlp.tasks.visualise import explain_clip, render
    from stoa_vlp.tokenizer import Tokenizer, require_text
    from stoa_vlp.train.logging import format_table

    for path in filter(None, (args.out, args.json)):  # checked before drawing: a failed run leaves no file
        if not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{path}: its folder does not exist")
        if Path(path).is_dir():
            raise ValueError(f"{path} is a folder, not a file to write")
    _, config, model, device = inference_model(args, "retrieval")  # its contrastive and matching heads
    tokenizer = Tokenizer(config.model.text_len)
    require_text(args.caption, "caption", tokenizer)
    records = file_records([args.video], args.caption)
    detections, label_vocab = inference_detections(config, records)
    batch = next(iter(video_loader(records, config, detections, label_vocab))).to(device)
    tags = None if args.no_tags else caption_tags(args.caption, tokenizer, config.data.spacy_model)
    explanation = explain_clip(model, batch, args.caption, tokenizer, label_vocab, tags,
                               config.loss.match_similarity, config.loss.vtc_video_feature)
    render(explanation, args.out)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(explanation.to_json(), handle, indent=2)
    print(f"{args.video}: contrastive cosine {explanation.similarity:.3f}, "
          f"match probability {explanation.match_probability:.3f}, {len(explanation.boxes)} boxes")
    rows = [[kind, match.name, match.word, f"{match.cosine:.3f}"]
            for kind, matches in (("object", explanation.objects), ("action", explanation.actions)) for match in matches]
    if rows:
        print(format_table(["kind", "trajectory / query", "caption word", "cosine"], rows))
    print(f"image: {args.out}")
    return 0
