"""`stoa-vlp tag`: noun/verb tags per BPE token for every caption of an annotation file."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import non_negative_int, positive_int

HELP = "tag the nouns and verbs of every caption (spaCy), cached per caption for training"
EXAMPLES = """examples:
  stoa-vlp tag data/world/MSRVTT_data.json --out data/world/tags.json
  stoa-vlp tag captions.txt --out tags.json --config tiny
  stoa-vlp tag webvid/results_2M_train.csv --out tags.json --processes 8
  stoa-vlp tag msrvtt/MSRVTT_data.json --out tags.json --split train --set data.spacy_model=en_core_web_sm
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="annotation file (any supported format) or a .txt file of captions")
    parser.add_argument("--out", required=True, help="tag cache (JSON); captions already in it are kept")
    parser.add_argument("--format", default="auto", help="annotation format (default: from the file name; 'text')")
    parser.add_argument("--split", action="append", choices=["train", "val", "test"],
                        help="split(s) to read (default: all the file has)")
    parser.add_argument("--config", default="base", help="preset or YAML: data.spacy_model and model.text_len")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--processes", type=positive_int, default=1, metavar="N",
                        help="spaCy worker processes (default: 1, tagging in this process)")
    parser.add_argument("--save-every", type=non_negative_int, default=None, metavar="N",
                        help="save the cache after each N newly tagged captions, so that an interrupted run "
                             "keeps them and a rerun tags the rest (default: 100000; 0: only at the end)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.config import load_config
    from stoa_vlp.data.tags import SAVE_EVERY, tag_file

    config = load_config(args.config, args.set)
    cache = tag_file(
        args.annotations,
        args.out,
        length=config.model.text_len,
        spacy_model=config.data.spacy_model,
        format=args.format,
        splits=args.split,
        progress=not args.no_progress,
        processes=args.processes,
        save_every=SAVE_EVERY if args.save_every is None else args.save_every,
    )
    print(f"{len(cache)} captions tagged in {args.out}")
    return 0
