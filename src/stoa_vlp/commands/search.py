"""`stoa-vlp search`: the videos of an index that best match a text query."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.arguments import non_negative_int, positive_int

HELP = "search an index built by `stoa-vlp index` with a text query"
EXAMPLES = """examples:
  stoa-vlp search my_index "a red square is moving left"
  stoa-vlp search my_index "a man is cooking" --top 20 --rerank-k 50
Scores: contrastive cosine for every video, then fusion (matching head) re-ranking of the top --rerank-k:
their "fusion (log)" column is the log of softmax_k(scale * cosine) * P(match), blank for the others.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="index folder written by `stoa-vlp index`")
    parser.add_argument("query", help="the text query, in quotes")
    parser.add_argument("--top", type=positive_int, default=10, help="videos to print (default 10)")
    parser.add_argument("--rerank-k", type=non_negative_int, help="re-rank this many contrastive top videos (default task.rerank_k)")
    parser.add_argument("--checkpoint", help="where the index's checkpoint is now, if it moved "
                                             "(default: the one the index was built with)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override on the index's config, e.g. train.device=cpu (repeatable)")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from stoa_vlp.commands.task_common import device_of
    from stoa_vlp.tasks.runs import checkpoint_config, load_task_weights, resolve_checkpoint
    from stoa_vlp.config import apply_overrides, from_dict
    from stoa_vlp.model.checkpoint import build_model_for_weights
    from stoa_vlp.tasks.search import INDEX_FILE, load_index, search, weights_stamp
    from stoa_vlp.tokenizer import Tokenizer, require_text
    from stoa_vlp.train.logging import format_table

    index = load_index(args.index)
    source = str(Path(args.index) / INDEX_FILE)
    config = apply_overrides(from_dict(index.info["config"], source), args.overrides)
    tokenizer = Tokenizer(config.model.text_len)
    require_text(args.query, "query", tokenizer)  # before the model loads (seconds)
    checkpoint = resolve_checkpoint(Path(args.checkpoint or index.info["checkpoint"]))
    if checkpoint.resolve() != Path(index.info["checkpoint"]):
        # the model the index's checkpoint was trained as (before any override of the index, such as frames)
        trained = from_dict({"model": index.info.get("trained_model", index.info["config"]["model"])}, source)
        if checkpoint_config(checkpoint, [])[0].model != trained.model:
            raise ValueError(f"{checkpoint} is another model than {args.index} was built with "
                             f"({index.info['checkpoint']}): its queries cannot be compared with the index's videos")
        logging.getLogger("stoa_vlp.search").warning(
            "queries are encoded with %s, the index's videos with %s: the scores hold only if these are the same "
            "weights (a moved run); otherwise build the index again", checkpoint, index.info["checkpoint"])
    elif "weights" in index.info and index.info["weights"] != weights_stamp(checkpoint):  # older indexes: none
        logging.getLogger("stoa_vlp.search").warning(
            "the weights in %s changed since %s was built (trained again in place?): the index's videos were "
            "encoded with the old ones, so the scores hold only if the weights are the same; build the index again",
            checkpoint, args.index)
    device = device_of(config)
    model = build_model_for_weights(config.model)
    load_task_weights(model, checkpoint)
    model.to(device)
    rerank_k = config.task.rerank_k if args.rerank_k is None else args.rerank_k
    hits = search(model, index, args.query, tokenizer, device, args.top, rerank_k,
                  config.loss.vtc_video_feature)
    rows = [[rank, hit.video_id, "" if hit.match is None else round(hit.score, 4), round(hit.cosine, 4),
             "" if hit.match is None else round(hit.match, 4), hit.path] for rank, hit in enumerate(hits, 1)]
    reranked = min(rerank_k, len(index.video_ids))
    order = (f"the contrastive top {reranked} re-ranked by the matching head (fusion), the others by cosine"
             if reranked else "ranked by the contrastive cosine, none re-ranked")
    print(f"query: {args.query!r} ({len(index.video_ids)} videos; {order})")
    print(format_table(["rank", "video", "fusion (log)", "cosine", "P(match)", "path"], rows))
    return 0
