"""The demo's downstream stages (`DOWNSTREAM_STAGES`, listed last in `stoa_vlp.demo.run.DEMO_STAGES`):
captioning and video QA fine-tuned from the pre-trained demo model on the synthetic world, each
evaluated once on the test clips with the final weights (no model selection), next to a trivial
baseline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# fine-tuning steps of each stage as a share of the pre-training steps (at least 1): QA trains its
# answer classifier from scratch, and 100 steps (one pass over the questions) left it at the
# majority answer; 400 steps beat it (README, "The demo")
STEPS_SHARE = {"captioning": 1 / 3, "qa": 4 / 3}
EXAMPLES_SHOWN = 3


def stage_config(run, task: str, overrides: list[str]):
    from stoa_vlp.config import apply_overrides, from_dict, path_override
    from stoa_vlp.tasks.pipeline import task_config

    steps = max(1, round(run.config.train.steps * STEPS_SHARE[task]))
    config = apply_overrides(from_dict(run.config.to_dict()), [  # a copy of the demo's config, changed
        f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", f"train.save_every={steps}",
        f"train.eval_every={steps}", path_override("train.output_dir", run.folder / task), *overrides,
    ])
    return task_config(config, task)


def check_stage_configs(run) -> None:
    """Build each stage's config once before the demo writes anything: a setting only a task checks
    (task.beam_size, QA's answer slot within model.fusion_positions) fails before the world is rendered."""
    for task in STEPS_SHARE:
        stage_config(run, task, [])


def fine_tune(run, config, runner):
    """Train the task module from the pre-trained demo weights; returns (module, TrainResult)."""
    from stoa_vlp.model.checkpoint import build_model_for_weights
    from stoa_vlp.tasks.runs import keep_label_vocab
    from stoa_vlp.train.data_position import seed_everything
    from stoa_vlp.train.distributed import DistEnv
    from stoa_vlp.train.loop import Trainer

    seed_everything(config.train.seed)
    model = build_model_for_weights(config.model)
    model.load_state_dict(run.model.state_dict())
    module = runner.module(model)
    dataset, collate = runner.train_data()
    env = DistEnv.current(config.train.device)
    keep_label_vocab(config, runner.label_vocab, config.train.output_dir, env)  # a copied run keeps its ids
    runner.save_answers()  # QA: the answers its head is trained on, for `stoa-vlp evaluate` of the run
    result = Trainer(config, module, dataset, collate, config.train.output_dir, env, None).fit()
    return module.eval(), result


def captioning_stage(run) -> None:
    import torch

    from stoa_vlp.data.annotations import read_annotations
    from stoa_vlp.metrics.captioning import CaptionScorer, JavaMissingError
    from stoa_vlp.tasks.captioning import generate_captions
    from stoa_vlp.tasks.data import video_loader
    from stoa_vlp.tasks.pipeline import TaskRunner
    from stoa_vlp.tasks.retrieval import encode_videos
    from stoa_vlp.train.distributed import choose_device
    from stoa_vlp.train.logging import format_table

    config = stage_config(run, "captioning", ["task.meteor=false"])
    try:
        CaptionScorer(meteor=False)
    except JavaMissingError as error:
        print(f"\nCaptioning stage skipped: {error}")
        run.report.append(f"## Captioning\n\nSkipped: {error}\n")
        return
    runner = TaskRunner(config, choose_device(config.train.device, 0))
    module, result = fine_tune(run, config, runner)
    metrics = runner.evaluate(module, "test")
    records = read_annotations(config.data.test, config.data.format, "test", config.data.video_root or None)[:EXAMPLES_SHOWN]
    with torch.no_grad():
        loader = video_loader(records, config, runner.detections, runner.label_vocab)
        _, videos = encode_videos(module.model, loader, runner.device)
    generated = generate_captions(module.model, videos, runner.tokenizer)
    run.metrics["captioning"] = {"steps": float(result.step), **metrics}
    scores = format_table(["captioning (test, greedy)", "BLEU-4", "ROUGE-L", "CIDEr"],
                          [["fine-tuned", metrics["BLEU-4"], metrics["ROUGE-L"], metrics["CIDEr"]]])
    examples = format_table(["video", "generated", "a reference"],
                            [[r.video_id, caption, r.captions[0]] for r, caption in zip(records, generated)])
    print(f"\nCaptioning after {result.step} fine-tuning steps (test clips):\n{scores}\n{examples}")
    run.report.append(
        "## Captioning (test clips)\n\n"
        f"Prefix-LM fine-tuning for {result.step} steps from the pre-trained model, greedy decoding, "
        f"pycocoevalcap scores (fractions) on {int(metrics['num_videos'])} test clips, final weights.\n\n"
        f"{scores}\n\n{examples}\n"
    )


def qa_stage(run) -> None:
    from stoa_vlp.config import path_override
    from stoa_vlp.tasks.pipeline import TaskRunner
    from stoa_vlp.tasks.qa import accuracy_by_type, read_questions
    from stoa_vlp.train.distributed import choose_device
    from stoa_vlp.train.logging import format_table

    world = run.world
    splits = [path_override(f"data.{split}", world.qa[split]) for split in ("train", "val", "test")]
    config = stage_config(run, "qa", splits)
    runner = TaskRunner(config, choose_device(config.train.device, 0), Path(config.train.output_dir), fine_tuning=True)
    module, result = fine_tune(run, config, runner)
    metrics = runner.evaluate(module, "test")
    train_questions = read_questions(config.data.train)
    majority = {kind: Counter(q.answer for q in train_questions if q.answer_type == kind).most_common(1)[0][0]
                for kind in {q.answer_type for q in train_questions}}
    test_questions = read_questions(config.data.test)
    baseline = accuracy_by_type([majority.get(q.answer_type) == q.answer for q in test_questions],
                                [q.answer_type for q in test_questions])
    run.metrics["qa"] = {"steps": float(result.step), **metrics, **{f"majority_{k}": v for k, v in baseline.items()}}
    kinds = sorted(k for k in metrics if k.startswith("accuracy"))
    table = format_table(["QA accuracy (test, %)", "fine-tuned", "majority answer per type"],
                         [[k, metrics[k], baseline.get(k, "")] for k in kinds])
    print(f"\nVideo QA after {result.step} fine-tuning steps ({int(metrics['num_questions'])} test questions):\n{table}")
    run.report.append(
        "## Video QA (test clips)\n\n"
        f"Answer-slot classifier over {len(runner.answers)} training answers, {result.step} fine-tuning steps "
        f"from the pre-trained model, final weights; baseline = the most frequent training answer of the "
        f"question's type.\n\n{table}\n"
    )


DOWNSTREAM_STAGES = [("captioning", captioning_stage), ("qa", qa_stage)]
