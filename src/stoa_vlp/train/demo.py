"""`stoa-vlp demo`, the main job: the whole system on the synthetic world, on a CPU, in minutes.

The demo is a list of stages, `DEMO_STAGES`, run in order over one `DemoRun`:
  world      render the synthetic moving-objects world (videos, captions, detections)
  tags       noun/verb tags of every caption (spaCy), for DOTA and STASP
  pretrain   pre-train the tiny model with the six objectives (the Trainer, checkpoints, metrics)
  retrieval  zero-shot text-to-video and video-to-text retrieval on the test clips, against chance
  alignment  how often DOTA's matching pairs a test clip's trajectory with a noun naming its class,
             against chance; visual.png draws the first test clip (stoa-vlp visualise)
  captioning, qa  short downstream fine-tuning from the pre-trained model, scored on the test clips
             (stoa_vlp.commands.task_demo)
Each stage records its metrics in `run.metrics[name]`, adds a Markdown section to `run.report`
and may print a table. The downstream stages come from `stoa_vlp.commands.task_demo.DOWNSTREAM_STAGES`,
listed in `DEMO_STAGES` after the alignment stage; a stage is a `(name, function)` pair whose function
reads the trained model as `run.model`, the config as `run.config` and the world as `run.world`.
The config (the pre-training's and each downstream stage's) is checked before anything is written,
so a demo that cannot start leaves no folder behind; demo_metrics.json is written first and after
every stage, so a folder that a failed demo left is recognised as one (--overwrite replaces it).
At the end the folder holds report.md, demo_metrics.json, the world, the tag cache, the run's
checkpoints, metrics.jsonl and TensorBoard events.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stoa_vlp.commands.common import check_settings
from stoa_vlp.commands.task_demo import DOWNSTREAM_STAGES, check_stage_configs
from stoa_vlp.config import Config, load_config, path_override
from stoa_vlp.data.jsonl import write_json_atomic
from stoa_vlp.train.checkpointing import CheckpointError
from stoa_vlp.train.logging import format_table

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
METRICS_FILE = "demo_metrics.json"
VISUAL_FILE = "visual.png"

DEMO_WORKERS = 1  # one process decodes while the main process trains
# The tiny preset with what the demo needs to learn within its time budget on 2 CPU cores.
DEMO_OVERRIDES = [
    "train.steps=300",
    "train.warmup_steps=20",
    "train.lr=1.0e-3",
    "train.eval_every=150",
    "train.save_every=150",
    "train.log_every=10",
    "train.device=cpu",
    "data.batch_size=16",
    f"data.num_workers={DEMO_WORKERS}",
]


@dataclass
class DemoSettings:
    train_clips: int = 300
    val_clips: int = 20
    test_clips: int = 100
    seed: int = 0
    render_workers: int = max(1, min(4, os.cpu_count() or 1))
    world: str = ""  # reuse this rendered world folder (and its tags.json) instead of rendering one
    overrides: list[str] = field(default_factory=list)  # dotted config overrides after DEMO_OVERRIDES


@dataclass
class DemoRun:
    settings: DemoSettings
    folder: Path
    config: Config | None = None
    world: Any = None  # stoa_vlp.data.synth.WorldPaths (before the world stage: where it renders, no video ids)
    model: Any = None  # the trained stoa_vlp.model.STOAVLP (CPU, eval mode)
    checkpoint: Path | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


DemoStage = Callable[[DemoRun], None]


def world_files(settings: DemoSettings, folder: Path):
    """The world's files: the reused world's (read now, so that a wrong --world fails before anything
    is written), or those the world stage renders into folder/world."""
    from stoa_vlp.data.synth import world_paths

    return world_paths(settings.world) if settings.world else world_paths(folder / "world", video_ids={})


def demo_config(run: DemoRun) -> Config:
    world = run.world
    data = [
        path_override("data.train", world.annotations),
        path_override("data.val", world.annotations),
        path_override("data.test", world.annotations),
        "data.format=msrvtt",
        path_override("data.video_root", world.videos),
        path_override("data.detections", world.detections),
        path_override("data.tags", world.root / 'tags.json'),
        path_override("train.output_dir", run.folder / 'pretrain'),
        f"train.seed={run.settings.seed}",
    ]
    return load_config("tiny", DEMO_OVERRIDES + data + list(run.settings.overrides))


def render_stage(run: DemoRun) -> None:
    from stoa_vlp.data.synth import render_world

    s = run.settings
    if s.world:
        counts = {split: len(ids) for split, ids in run.world.video_ids.items()}
        s.train_clips, s.val_clips, s.test_clips = counts["train"], counts["val"], counts["test"]
        where = f"`{s.world}` (rendered earlier)"
    else:
        run.world = render_world(
            run.folder / "world", train=s.train_clips, val=s.val_clips, test=s.test_clips, seed=s.seed,
            workers=s.render_workers,
        )
        where = "`world/`"
    run.metrics["world"] = {"train_clips": s.train_clips, "val_clips": s.val_clips, "test_clips": s.test_clips}
    run.report.append(
        "## Synthetic world\n\n"
        f"{s.train_clips} training, {s.val_clips} validation and {s.test_clips} test clips in {where}: "
        "H.264 videos, MSR-VTT-format captions, noisy detections.\n"
    )


def tag_stage(run: DemoRun) -> None:
    from stoa_vlp.data.tags import TagCache, read_captions, tag_file

    path = run.world.root / "tags.json"
    captions = set(read_captions(run.world.annotations, format="msrvtt"))
    if path.exists() and captions <= TagCache(path).tags.keys():
        cache, done = TagCache(path), "were already tagged"  # a reused world: no spaCy, no write
    else:
        cache = tag_file(run.world.annotations, path, run.config.model.text_len, run.config.data.spacy_model,
                         format="msrvtt")
        done = "tagged (spaCy)"
    run.metrics["tags"] = {"captions": float(len(cache))}
    run.report.append(f"## Tags\n\n{len(cache)} distinct captions {done}, in `{path}`.\n")


def pretrain_stage(run: DemoRun) -> None:
    from stoa_vlp.commands.common import keep_label_vocab
    from stoa_vlp.commands.pretrain import pretraining_data
    from stoa_vlp.data.dataset import collate
    from stoa_vlp.model import build_model
    from stoa_vlp.objectives import Pretrainer
    from stoa_vlp.train.data_position import seed_everything
    from stoa_vlp.train.distributed import DistEnv
    from stoa_vlp.train.loop import Trainer

    config = run.config
    seed_everything(config.train.seed)
    module = Pretrainer(build_model(config.model), config.loss)
    env = DistEnv.current(config.train.device)
    train_set, evaluate = pretraining_data(config, env, validate=run.settings.val_clips > 0)
    # in the run's own folder, as `pretrain` keeps it: validation, test and the task stages use it
    keep_label_vocab(config, train_set.label_vocab, config.train.output_dir, env)
    trainer = Trainer(config, module, train_set, collate, config.train.output_dir, env, evaluate)
    result = trainer.fit()
    run.model = module.model.eval()
    run.checkpoint = result.last_checkpoint
    first, last = result.history[0], result.history[-1]
    run.metrics["pretrain"] = {
        "steps": float(result.step), "seconds": result.seconds, "clips_per_s": result.clips_per_s,
        "first_loss": first["loss"], "final_loss": last["loss"], "skipped_batches": float(result.skipped_batches),
    }
    losses = [name for name in ("vtc", "vtm", "mlm", "plm", "dota", "stasp") if name in last]
    table = format_table(["loss", "step 1", f"step {result.step}"],
                         [[name, first[name], last[name]] for name in ["loss", *losses]])
    run.report.append(
        "## Pre-training\n\n"
        f"{result.step} steps of {config.data.batch_size} clips in {result.seconds:.0f} s "
        f"({result.clips_per_s:.1f} clips/s) on {env.device}; checkpoints in `pretrain/checkpoints/`.\n\n"
        f"{table}\n"
    )


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


DEMO_STAGES: list[tuple[str, DemoStage]] = [
    ("world", render_stage),
    ("tags", tag_stage),
    ("pretrain", pretrain_stage),
    ("retrieval", retrieval_stage),
    ("alignment", alignment_stage),
    *DOWNSTREAM_STAGES,
]


def prepare_folder(folder: Path, overwrite: bool, world: str = "") -> None:
    """Refuse a folder that is not empty unless `overwrite`, and then delete it only when a demo wrote it,
    finished or not (it holds demo_metrics.json), and does not hold the reused `world`."""
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{folder} is not empty; pass --overwrite to replace it or choose another --output")
    if not (folder / METRICS_FILE).is_file():
        raise CheckpointError(f"--overwrite: {folder} does not hold a stoa-vlp demo; refusing to delete it")
    if world and Path(world).resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"--overwrite would delete {folder} with the --world {world} it reuses: copy the "
                              "world out of it first, or choose another --output")
    shutil.rmtree(folder)


def write_metrics(run: DemoRun) -> None:
    """demo_metrics.json with the stages done so far: written first, it marks a folder that a failed demo
    left as a demo's for --overwrite."""
    write_json_atomic(run.folder / METRICS_FILE, {"metrics": run.metrics, "seconds": run.seconds}, indent=2)


def run_demo(settings: DemoSettings, folder: Path, stages: list[tuple[str, DemoStage]] | None = None,
             overwrite: bool = False) -> DemoRun:
    """Check the config, prepare `folder` (`prepare_folder`), run the stages into it (demo_metrics.json
    records those done), then write report.md there."""
    run = DemoRun(settings=settings, folder=Path(folder), world=world_files(settings, Path(folder)))
    run.config = demo_config(run)
    if run.config.train.epochs > 0 or run.config.train.warmup_share > 0:
        raise ValueError("the demo's stages take their lengths from train.steps: train.epochs and "
                         "train.warmup_share are for pretrain and finetune")
    check_settings(run.config, pretraining=True)  # as `pretrain` checks its config, and the stages theirs
    check_stage_configs(run)
    prepare_folder(run.folder, overwrite, settings.world)
    run.folder.mkdir(parents=True, exist_ok=True)
    write_metrics(run)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # leave a core to the decoding worker (data.num_workers=1): oversubscribed OpenMP threads spin
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - DEMO_WORKERS))
    try:
        for name, stage in stages if stages is not None else DEMO_STAGES:
            log.info("demo stage: %s", name)
            stage_started = time.perf_counter()
            stage(run)
            run.seconds[name] = time.perf_counter() - stage_started
            write_metrics(run)
    finally:
        torch.set_num_threads(threads)
    run.seconds["total"] = time.perf_counter() - started
    timing = format_table(["stage", "seconds"], [[name, round(value, 1)] for name, value in run.seconds.items()])
    report = ["# stoa-vlp demo\n", *run.report, f"## Time\n\n{timing}\n"]
    (run.folder / REPORT_FILE).write_text("\n".join(report))
    write_metrics(run)
    return run
