"""`stoa-vlp evaluate`: evaluate a fine-tuned checkpoint on one split of its task, or a pre-training
checkpoint zero-shot on one split of a task other than QA."""

from __future__ import annotations

import argparse
import logging

HELP = ("evaluate a fine-tuned checkpoint (retrieval, captioning, QA, multiple-choice) on a split, "
        "or a pre-training one zero-shot (any task but QA; default retrieval)")
EXAMPLES = """examples:
  stoa-vlp evaluate runs/msrvtt-ret --split test
  stoa-vlp evaluate runs/msrvtt-ret --split test --set task.dual_softmax=true --set task.rerank_k=0
  stoa-vlp evaluate runs/cap --split test --set task.beam_size=5 --set data.test=msrvtt/MSRVTT_data.json
  stoa-vlp evaluate runs/pretrain --task retrieval --split test --set data.test=msrvtt/MSRVTT_JSFUSION_test.csv
--task other than the checkpoint's own: a pre-training checkpoint does any task but QA zero-shot, a
fine-tuned one its own task only (retrieval and mc share theirs).
The checkpoint's training config is used (same frames and preprocessing) unless --set overrides it;
the output shows both and warns where they differ, including videos prepared with other `prepare`
settings than the training videos. A run folder means its best-on-validation checkpoint.
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, or run folder (its best checkpoint)")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="split to evaluate (default val)")
    parser.add_argument("--task", choices=["retrieval", "captioning", "qa", "mc"],
                        help="task (default: the one the checkpoint was fine-tuned for; retrieval for a pre-training "
                             "checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override on top of the checkpoint's config (repeatable)")
    parser.add_argument("--report", metavar="JSON",
                        help="also write the results (and, for captioning, the generated captions) to this JSON file")


def require_split_file_for(task: str, trained, config, split: str) -> None:
    """ValueError when data.<split> is still the file of the checkpoint's config, written for its own
    task, and `task` reads another kind of file (an mc evaluation of a retrieval run would fail on
    its first annotation line)."""
    from stoa_vlp.commands.task_common import trained_for
    from stoa_vlp.tasks.pipeline import EVALUATION_FILES

    path, own = getattr(config.data, split), trained.task.name
    if not path or path != getattr(trained.data, split) or EVALUATION_FILES[own] == EVALUATION_FILES[task]:
        return
    raise ValueError(f"data.{split} {path} comes from the checkpoint's config, where it is the {trained_for(trained)} "
                     f"{EVALUATION_FILES[own]}; {task} reads a {EVALUATION_FILES[task]}: give one with "
                     f"--set data.{split}=FILE")


def run(args: argparse.Namespace) -> int:
    import json

    from stoa_vlp.commands.common import validation_overlap
    from stoa_vlp.commands.task_common import device_of, metric_rows, preprocessing_rows, require_trained_for, trained_for
    from stoa_vlp.tasks.runs import checkpoint_config, load_task_weights, resolve_checkpoint, run_dir_of
    from stoa_vlp.model.checkpoint import build_model_for_weights
    from stoa_vlp.tasks.pipeline import TaskRunner, task_config
    from stoa_vlp.train.logging import format_table

    checkpoint = resolve_checkpoint(args.checkpoint)
    trained, config = checkpoint_config(checkpoint, args.overrides)
    fine_tuned_for = trained_for(trained)
    task = args.task or (config.task.name if fine_tuned_for != "pre-training" else "retrieval")
    require_trained_for(checkpoint, fine_tuned_for, task)
    config = task_config(config, task)
    require_split_file_for(task, trained, config, args.split)
    device = device_of(config)
    runner = TaskRunner(config, device, run_dir_of(checkpoint))
    model = build_model_for_weights(config.model)
    module = runner.module(model)
    if fine_tuned_for == "pre-training":  # evaluated zero-shot: the model's weights only
        load_task_weights(model, checkpoint)
    else:
        load_task_weights(module, checkpoint)
    same_split = args.split == "val" and config.data.val == trained.data.val
    overlap = None if same_split else validation_overlap(trained, config, args.split)  # the run's selection videos
    metrics = runner.evaluate(module.to(device), args.split)
    print(f"checkpoint: {checkpoint} (trained for {fine_tuned_for}); task: {task}; split: {args.split} "
          f"(file {getattr(config.data, args.split)})")
    preprocessing = preprocessing_rows(trained, config)
    print(format_table(["setting", "training", "evaluation"], preprocessing))
    differing = [f"{name} ({training} in training, {evaluation} here)" for name, training, evaluation in preprocessing
                 if training != evaluation]
    if differing:
        log.warning("evaluated with other inputs than the model was trained on: %s", "; ".join(differing))
    print(format_table(*metric_rows([(args.split, metrics)])))
    if args.report:
        with open(args.report, "w") as handle:
            json.dump({"checkpoint": str(checkpoint), "task": task, "split": args.split, "metrics": metrics,
                       **({"videos_in_validation": overlap} if overlap is not None else {}),
                       "preprocessing": {row[0]: {"training": row[1], "evaluation": row[2]} for row in preprocessing},
                       **({"captions": runner.captions} if runner.captions else {})}, handle, indent=2)
    return 0
