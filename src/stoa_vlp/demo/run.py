"""Running the demo: its settings (`DemoSettings`), the state its stages share (`DemoRun`), the stages
in order (`DEMO_STAGES`) and `run_demo`, which checks the config, prepares the folder and runs the stages
into it."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stoa_vlp.config import Config, load_config, path_override
from stoa_vlp.data.jsonl import write_json_atomic
from stoa_vlp.demo.downstream import DOWNSTREAM_STAGES, check_stage_configs
from stoa_vlp.demo.pretraining import pretrain_stage, render_stage, tag_stage
from stoa_vlp.demo.zero_shot import alignment_stage, retrieval_stage
from stoa_vlp.train.checkpointing import CheckpointError
from stoa_vlp.train.logging import format_table
from stoa_vlp.train.settings import check_settings

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
METRICS_FILE = "demo_metrics.json"

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

DEMO_STAGES: list[tuple[str, DemoStage]] = [
    ("world", render_stage),
    ("tags", tag_stage),
    ("pretrain", pretrain_stage),
    ("retrieval", retrieval_stage),
    ("alignment", alignment_stage),
    *DOWNSTREAM_STAGES,
]


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
