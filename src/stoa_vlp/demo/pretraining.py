"""The demo's first stages: render the synthetic world (or take the reused one), tag its captions, and
pre-train the tiny model on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stoa_vlp.train.logging import format_table

if TYPE_CHECKING:
    from stoa_vlp.demo.run import DemoRun


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
    from stoa_vlp.data.dataset import collate
    from stoa_vlp.model import build_model
    from stoa_vlp.objectives import Pretrainer
    from stoa_vlp.tasks.runs import keep_label_vocab
    from stoa_vlp.train.data_position import seed_everything
    from stoa_vlp.train.distributed import DistEnv
    from stoa_vlp.train.evaluation import pretraining_data
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
