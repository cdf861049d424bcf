"""`stoa-vlp finetune`: fine-tune on a downstream task, select on validation, test once at the end."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.common import add_config_arguments, add_run_arguments, warn_if_random_towers

HELP = "fine-tune on retrieval, captioning, video QA or multiple-choice (best checkpoint chosen on validation)"
EXAMPLES = """examples:
  stoa-vlp finetune --task retrieval --config base --init runs/pretrain \\
      --set data.train=msrvtt/MSRVTT_train.8.5k.csv --set data.val=msrvtt/MSRVTT_val.500.csv \\
      --set data.test=msrvtt/MSRVTT_JSFUSION_test.csv --set data.video_root=msrvtt/videos --test --output runs/msrvtt-ret
  stoa-vlp finetune --task captioning --config tiny --set data.train=world/MSRVTT_data.json \\
      --set data.val=world/MSRVTT_data.json --set data.test=world/MSRVTT_data.json --test --output runs/cap
  stoa-vlp finetune --task qa --config tiny --set data.train=world/qa_train.jsonl --set data.val=world/qa_val.jsonl \\
      --set data.video_root=world/videos --output runs/qa
  stoa-vlp finetune --config runs/qa/config.yaml --output runs/qa --resume latest    (the run's task, qa)
The test split (data.test) is evaluated once, with the best-on-validation checkpoint, only with --test.
Validation must not hold test videos (a warning says when it does): MSR-VTT 1k-A has no validation
split, so hold out part of the training list (MSRVTT_train.8.5k.csv / MSRVTT_val.500.csv above: the
MSRVTT_ prefix tells data.format=auto the format; see the README).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=["retrieval", "captioning", "qa", "mc"],
                        help="the task to fine-tune for (with --resume, default: the resumed run's)")
    add_config_arguments(parser, default_config="base")
    add_run_arguments(parser)
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="start from a pre-trained STOA-VLP checkpoint (checkpoint, run or save_pretrained folder)")
    parser.add_argument("--test", action="store_true",
                        help="after training, evaluate the best-on-validation checkpoint on data.test once")


def task_to_train(args: argparse.Namespace, run_dir: str) -> str:
    """--task, or with --resume the task its checkpoint was fine-tuned for: another task is refused, as
    its module would not hold the checkpoint's weights and the run's data files are the other task's.
    A --set task.name that differs from it is refused too (the task is --task's)."""
    from stoa_vlp.config import parse_override

    task = resumed_task(args, run_dir) if args.resume else args.task
    if not task:
        raise ValueError("--task is required (retrieval, captioning, qa or mc) unless --resume continues a run")
    for override in args.overrides:
        named = parse_override(override).get("task", {})
        if isinstance(named, dict) and named.get("name", task) != task:
            raise ValueError(f"--set {override}: finetune trains the task of --task"
                             f"{' (or of the --resume checkpoint)' if args.resume else ''}, {task}; "
                             "leave task.name out")
    return task


def resumed_task(args: argparse.Namespace, run_dir: str) -> str:
    """The task --resume's checkpoint was fine-tuned for; a different --task is refused."""
    from stoa_vlp.commands.task_common import trained_for
    from stoa_vlp.tasks.runs import checkpoint_config
    from stoa_vlp.train.checkpointing import resolve_resume

    checkpoint = resolve_resume(args.resume, run_dir)
    fine_tuned_for = trained_for(checkpoint_config(checkpoint, [])[0])
    if fine_tuned_for == "pre-training":
        raise ValueError(f"--resume: {checkpoint} is a pre-training checkpoint: continue it with `stoa-vlp pretrain "
                         "--resume`, or fine-tune from it with `stoa-vlp finetune --init`")
    if args.task and args.task != fine_tuned_for:
        raise ValueError(f"--task {args.task}: {checkpoint} was fine-tuned for {fine_tuned_for}, so --resume "
                         f"continues {fine_tuned_for} (leave --task out, or fine-tune for {args.task} into another "
                         "--output with --init)")
    return fine_tuned_for


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.commands.common import (
        check_run_files,
        config_from_args,
        prepare_run,
        set_deterministic,
        validation_overlap,
    )
    from stoa_vlp.tasks.pipeline import task_config
    from stoa_vlp.tasks.runs import adopt_label_vocab, keep_label_vocab
    from stoa_vlp.train import init_distributed, shutdown_distributed
    from stoa_vlp.train.provenance import checkpoint_record
    from stoa_vlp.train.settings import check_settings

    config = config_from_args(args)
    task = task_to_train(args, config.train.output_dir)
    config = task_config(config, task)
    check_settings(config)
    if args.test and not config.data.test:
        raise ValueError("--test needs data.test (the test split's file)")
    init, init_runs = init_checkpoint(args)
    check_run_files(config, resume=bool(args.resume), fallback_runs=init_runs)
    if not config.data.val:
        print("warning: data.val is not set: no validation, the last checkpoint counts as the best")
    env = init_distributed(config.train.device, config.train.dist_timeout_minutes)
    try:
        run_dir = prepare_run(config, env, args)
        set_deterministic(config.train)
        adopt_label_vocab(config, run_dir, *init_runs)  # the class ids the weights were trained with
        runner = task_runner(config, env, run_dir, args)
        overlap = validation_overlap(config, config, "test") if env.is_main else None  # test videos in data.val
        if init is None and not args.resume and env.is_main:  # a resumed run's towers come from its checkpoint
            warn_if_random_towers(config)
        module = runner.module(initial_model(config, init, resume=bool(args.resume)))
        trainer = task_trainer(config, runner, module, run_dir, env)
        keep_label_vocab(config, runner.label_vocab, run_dir, env)  # last: a run that cannot start writes nothing
        if env.is_main:
            runner.save_answers()
        started_from = checkpoint_record(init) if init is not None and not args.resume and env.is_main else None
        result = trainer.fit(resume=args.resume, init=started_from)
        if env.is_main:
            report_run(config, task, run_dir, result.best, overlap, runner, module, env.device, test=args.test)
    finally:
        shutdown_distributed()
    return 0


def init_checkpoint(args: argparse.Namespace):
    """The --init folder (None without --init) and, as a tuple of at most one, the run it is a checkpoint
    of, whose label vocabulary stands in for a data.label_vocab that does not exist (a moved run's)."""
    from stoa_vlp.commands.task_common import init_folder
    from stoa_vlp.tasks.runs import run_dir_of

    init = init_folder(args.init) if args.init else None
    init_runs = (run_dir_of(init),) if init is not None and init.parent.name == "checkpoints" else ()
    return init, init_runs


def task_runner(config, env, run_dir, args: argparse.Namespace):
    """The TaskRunner of the run, with the splits it evaluates checked."""
    from stoa_vlp.tasks.pipeline import TaskRunner

    runner = TaskRunner(config, env.device, run_dir, fine_tuning=True, resume=bool(args.resume))
    if config.data.val:
        runner.check_split("val", config.train.val_max_clips)  # validation reads only those
    if args.test:
        runner.check_split("test")
    return runner


def initial_model(config, init, resume: bool):
    """The STOA-VLP model to fine-tune, with the --init weights when given. --init and --resume load
    trained weights over the whole model: the CLIP file is not read."""
    from stoa_vlp.commands.task_common import load_model_weights_from
    from stoa_vlp.model.checkpoint import build_model, build_model_for_weights

    model = build_model_for_weights(config.model) if init or resume else build_model(config.model)
    if init:
        load_model_weights_from(model, init)
        print(f"initialised from {init}")
    return model


def task_trainer(config, runner, module, run_dir, env):
    """The Trainer of `module` on this rank's part of the training set, validating on data.val when set."""
    from stoa_vlp.train import Trainer
    from stoa_vlp.train.run_length import set_run_length

    dataset, collate = runner.train_data(env.rank, env.world_size)  # shards are split over the ranks
    set_run_length(config, dataset, env.world_size)
    evaluate = runner.evaluator("val") if config.data.val else None
    return Trainer(config, module, dataset, collate, run_dir, env, evaluate)


def report_run(config, task: str, run_dir, best, overlap, runner, module, device, test: bool) -> None:
    """Main rank, after training: write RUN/report.json with the selection's validation metrics (`best`)
    and, with `test`, the test metrics of the selected checkpoint, and print them."""
    from stoa_vlp.data.jsonl import write_json_atomic
    from stoa_vlp.train.checkpointing import best_checkpoint, list_checkpoints

    selected = best_checkpoint(run_dir) or list_checkpoints(run_dir)[-1]
    header = report_header(config, task, run_dir, selected)
    results = []  # (report entry, table column label, metrics)
    if best:
        results.append(selection_result(best))
    if test:
        results.append(test_result(runner, module, device, selected))
    report = {**header, "results": [entry for entry, _, _ in results]}
    if overlap is not None:
        report["videos_in_validation"] = overlap
    write_json_atomic(run_dir / "report.json", report, indent=2)
    print_results(header["preprocessing"], [(label, metrics) for _, label, metrics in results])
    print(f"selected checkpoint: {selected}\nreport: {run_dir / 'report.json'}")


def report_header(config, task: str, run_dir, selected) -> dict:
    """What the report's results come from: the task, the --init checkpoint, the selection and the
    preprocessing (training's, which evaluation uses here)."""
    from stoa_vlp.commands.task_common import preprocessing_settings
    from stoa_vlp.train.provenance import read_run_record

    preprocessing = preprocessing_settings(config)
    return {"task": task, "init": read_run_record(run_dir).get("init"),
            "selection_metric": config.train.best_metric, "checkpoint": str(selected),
            "preprocessing": preprocessing}


def selection_result(best: dict) -> tuple[dict, str, dict]:
    """The best validation's (report entry, table column label, metrics without the val/ prefix)."""
    val = {k[len("val/"):]: v for k, v in best.items() if k.startswith("val/")}
    return {"split": "val", "step": best["step"], "metrics": val}, f"val (step {best['step']}, selection)", val


def test_result(runner, module, device, selected) -> tuple[dict, str, dict]:
    """The `selected` checkpoint's test (report entry, table column label, metrics)."""
    from stoa_vlp.tasks.runs import load_task_weights

    load_task_weights(module, selected)
    test = runner.evaluate(module.to(device), "test")
    return {"split": "test", "checkpoint": str(selected), "metrics": test}, f"test ({selected.name})", test


def print_results(preprocessing: dict, results: list[tuple[str, dict]]) -> None:
    """The preprocessing and a table of the (column label, metrics) `results`, when there are any."""
    from stoa_vlp.commands.task_common import metric_rows
    from stoa_vlp.train.logging import format_table

    if results:
        print("training and evaluation preprocessing: " + ", ".join(f"{k}={v}" for k, v in preprocessing.items()))
        print(format_table(*metric_rows(results)))
