"""The demo's zero-shot stages on the test clips, each against chance: text-to-video and video-to-text
retrieval, and how often DOTA's matching pairs a clip's trajectory with a noun naming its class (with
visual.png, the first test clip drawn)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from stoa_vlp.train.logging import format_table

if TYPE_CHECKING:
    from stoa_vlp.demo.run import DemoRun

VISUAL_FILE = "visual.png"


def chance_rank_cdf(candidates: int, positives: int, k: int) -> float:
    """P(rank <= k) under random scores for a query with `positives` among `candidates`: the rank
    (1 + negatives above the best positive) exceeds k only when the first k candidates are negatives."""
    negatives = candidates - positives
    if k > negatives:
        return 1.0
    return 1.0 - math.comb(negatives, k) / math.comb(candidates, k)


def chance_metrics(text_to_video: torch.Tensor, num_videos: int) -> dict[str, float]:
    """R@1/5/10, MdR and MnR of random scores, in closed form (same keys as retrieval_metrics).
    t2v: one positive video among num_videos; v2t: a video's captions among all captions;
    v2t_grouped (several captions for some video): one video among num_videos.
    MdR is the median of the rank distribution pooled over queries, the midpoint of k and k + 1 where
    half the mass lies at or below k (as numpy's median of an even count): uniform ranks on 1..100 give
    50.5, the expected median of random scores, where the lower median said 50."""
    captions_per_video = torch.bincount(torch.as_tensor(text_to_video), minlength=num_videos).tolist()
    num_texts = len(text_to_video)
    queries = {"t2v": [(num_videos, 1)] * num_texts, "v2t": [(num_texts, p) for p in captions_per_video]}
    if max(captions_per_video) > 1:  # as retrieval_metrics reports it: one video among the videos
        queries["v2t_grouped"] = [(num_videos, 1)] * num_videos
    metrics: dict[str, float] = {}
    for direction, cases in queries.items():
        def pooled_cdf(k: int) -> float:
            return sum(chance_rank_cdf(n, p, k) for n, p in cases) / len(cases)

        for k in (1, 5, 10):
            metrics[f"{direction}_r{k}"] = 100.0 * pooled_cdf(k)
        median = next(k for k in range(1, max(n for n, _ in cases) + 1) if pooled_cdf(k) >= 0.5)
        metrics[f"{direction}_mdr"] = median + 0.5 if math.isclose(pooled_cdf(median), 0.5) else float(median)
        metrics[f"{direction}_mnr"] = sum(1 + (n - p) / (p + 1) for n, p in cases) / len(cases)
    return metrics


def retrieval_stage(run: DemoRun) -> None:
    from stoa_vlp.tasks.retrieval import records_text_to_video
    from stoa_vlp.train.evaluation import RetrievalEvaluator

    # as validation scores it: each test clip decoded and encoded once, its captions encoded from the records
    device = next(run.model.parameters()).device
    evaluator = RetrievalEvaluator(run.config, "test", device)
    metrics = evaluator(run.model)
    num_texts, num_videos = int(metrics.pop("num_texts")), int(metrics.pop("num_videos"))
    chance = chance_metrics(records_text_to_video(evaluator.records), num_videos)
    run.metrics["retrieval"] = {**metrics, **{f"chance_{k}": v for k, v in chance.items()}}
    rows = []
    for direction in ("t2v", "v2t"):
        rows.append([direction] + [metrics[f"{direction}_{k}"] for k in ("r1", "r5", "r10", "mdr")])
        rows.append([f"{direction} chance"] + [chance[f"{direction}_{k}"] for k in ("r1", "r5", "r10", "mdr")])
    table = format_table(["zero-shot retrieval", "R@1", "R@5", "R@10", "MdR"], rows)
    print(f"\nZero-shot retrieval on {num_videos} test clips ({num_texts} captions):\n{table}")
    run.report.append(
        "## Zero-shot retrieval (test clips)\n\n"
        f"{num_videos} test clips, {num_texts} captions, scored with the final pre-trained "
        "weights; recalls in percent, tie-robust ranks, chance = the expected value under random scores (for "
        "MdR the median of the rank distribution).\n\n"
        f"{table}\n"
    )


def class_noun_agreement(matches, nouns: list[str]) -> tuple[int, float]:
    """(trajectories matched to a noun naming their class, the expected count if each had been matched to a
    random candidate) for one caption: `matches` are `tasks.visualise.Match`es of trajectories, whose names
    are the world's classes ("red circle": the noun "circle" names it), `nouns` the caption's noun words;
    the candidates are the nouns and the sentence feature."""
    hits = sum(match.word in match.name.split() for match in matches)
    chance = sum(sum(noun in match.name.split() for noun in nouns) / (len(nouns) + 1) for match in matches)
    return hits, chance


def alignment_stage(run: DemoRun) -> None:
    import numpy as np
    from torch.utils.data import DataLoader, Subset

    from stoa_vlp.batch import TAG_NOUN
    from stoa_vlp.data.dataset import build_dataset, collate
    from stoa_vlp.data.detections import LabelVocab
    from stoa_vlp.tasks.visualise import SENTENCE, explain_clip, render, token_words
    from stoa_vlp.tokenizer import Tokenizer

    config = run.config
    device = next(run.model.parameters()).device
    vocab = LabelVocab.load(config.data.label_vocab)
    tokenizer = Tokenizer(config.model.text_len)
    test = build_dataset(config, "test")  # with the tags, which video_loader's items lack
    clips = Subset(test, np.flatnonzero(test.items[:, 1] == 0).tolist())  # each clip once, with its first caption
    loader = DataLoader(clips, batch_size=config.data.batch_size, num_workers=config.data.num_workers, collate_fn=collate)
    explained, matched, hits, chance, to_sentence = 0, 0, 0, 0.0, 0
    for batch in loader:
        for row in range(len(batch)):
            one = batch.select([row]).to(device)
            explanation = explain_clip(run.model, one, tokenizer.decode(one.tokens[0]), tokenizer, vocab, one.pos_tags,
                                       config.loss.match_similarity, config.loss.vtc_video_feature)
            if explained == 0:
                render(explanation, run.folder / VISUAL_FILE)
            explained += 1
            words = token_words(one.tokens[0].tolist(), tokenizer)
            nouns = [word for word, tag in zip(words, one.pos_tags[0].tolist()) if tag == TAG_NOUN]
            clip_hits, clip_chance = class_noun_agreement(explanation.objects, nouns)
            matched += len(explanation.objects)
            hits, chance = hits + clip_hits, chance + clip_chance
            to_sentence += sum(match.word == SENTENCE for match in explanation.objects)
    share, chance_share = 100.0 * hits / max(matched, 1), 100.0 * chance / max(matched, 1)
    run.metrics["alignment"] = {"matched_trajectories": float(matched), "class_noun_percent": share,
                                "chance_percent": chance_share, "to_sentence": float(to_sentence)}
    print(f"\nObject-noun alignment on {len(clips)} test clips: {share:.1f}% of {matched} matched trajectories "
          f"take a noun naming their class (chance {chance_share:.1f}%); picture of the first clip: "
          f"{run.folder / VISUAL_FILE}")
    run.report.append(
        "## Object-noun alignment (test clips)\n\n"
        f"DOTA's Hungarian matching (as in pre-training) of each test clip's trajectories to the nouns of its first "
        f"caption: {share:.1f}% of {matched} matched trajectories take a noun naming their own class "
        f"(\"red circle\" -> \"circle\"), against {chance_share:.1f}% for a random candidate; {to_sentence} take the "
        f"sentence feature. `{VISUAL_FILE}` draws the first test clip (`stoa-vlp visualise`).\n"
    )
