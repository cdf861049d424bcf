"""`stoa-vlp finetune`: fine-tune on a downstream task, select on validation, test once at the end."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.common import add_config_arguments, add_run_arguments

HELP = "fine-tune on retrieval, captioning, video QA or multiple-choice (best checkpoint chosen on validation)"
EXAMPLES = """examples:
  stoa-vlp finetune --task retrieval --config base --init runs/pretrain \\
      --set data.train=msrvtt/MSRVTT_train.9k.csv --set data.val=msrvtt/MSRVTT_JSFUSION_test.csv \\
      --set data.video_root=msrvtt/videos --output runs/msrvtt-ret
  stoa-vlp finetune --task captioning --config tiny --set data.train=world/MSRVTT_data.json \\
      --set data.val=world/MSRVTT_data.json --set data.test=world/MSRVTT_data.json --test --output runs/cap
  stoa-vlp finetune --task qa --config tiny --set data.train=world/qa_train.jsonl --set data.val=world/qa_val.jsonl \\
      --set data.video_root=world/videos --output runs/qa
The test split (data.test) is evaluated once, with the best-on-validation checkpoint, only with --test.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=["retrieval", "captioning", "qa", "mc"])
    add_config_arguments(parser, default_config="base")
    add_run_arguments(parser)
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="start from a pre-trained STOA-VLP checkpoint (checkpoint, run or save_pretrained folder)")
    parser.add_argument("--test", action="store_true",
                        help="after training, evaluate the best-on-validation checkpoint on data.test once")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from stoa_vlp.commands.common import config_from_args, prepare_run
    from stoa_vlp.commands.task_common import (
        load_model_weights_from,
        load_task_weights,
        metric_rows,
        preprocessing_settings,
    )
    from stoa_vlp.model import build_model
    from stoa_vlp.tasks.pipeline import TaskRunner, task_config
    from stoa_vlp.train import Trainer, init_distributed, shutdown_distributed
    from stoa_vlp.train.checkpointing import best_checkpoint, list_checkpoints
    from stoa_vlp.train.logging import format_table

    config = task_config(config_from_args(args), args.task)
    if args.test and not config.data.test:
        raise SystemExit("--test needs data.test (the test split's file)")
    if not config.data.val:
        print("warning: data.val is not set: no validation, the last checkpoint counts as the best")
    env = init_distributed(config.train.device)
    try:
        run_dir = prepare_run(config, env, args)
        runner = TaskRunner(config, env.device, run_dir)
        saved_vocab = config.data.label_vocab and Path(config.data.label_vocab).exists()
        if runner.label_vocab is not None and not saved_vocab and env.is_main:
            vocab_path = Path(config.data.label_vocab or run_dir / "label_vocab.json")  # evaluation needs these ids
            vocab_path.parent.mkdir(parents=True, exist_ok=True)
            runner.label_vocab.save(vocab_path)
            config.data.label_vocab = str(vocab_path)
        model = build_model(config.model)
        if args.init:
            print(f"initialised from {load_model_weights_from(model, args.init)}")
        module = runner.module(model)
        dataset, collate = runner.train_data()
        evaluate = runner.evaluator("val") if config.data.val else None
        result = Trainer(config, module, dataset, collate, run_dir, env, evaluate).fit(resume=args.resume)
        if not env.is_main:
            return 0
        selected = best_checkpoint(run_dir) or list_checkpoints(run_dir)[-1]
        preprocessing = preprocessing_settings(config)  # training = evaluation here
        report = {"task": args.task, "selection_metric": config.train.best_metric, "checkpoint": str(selected),
                  "preprocessing": preprocessing, "results": []}
        results = []
        if result.best:
            val = {k[len("val/"):]: v for k, v in result.best.items() if k.startswith("val/")}
            report["results"].append({"split": "val", "step": result.best["step"], "metrics": val})
            results.append((f"val (step {result.best['step']}, selection)", val))
        if args.test:
            load_task_weights(module, selected)
            test = runner.evaluate(module.to(env.device), "test")
            report["results"].append({"split": "test", "checkpoint": str(selected), "metrics": test})
            results.append((f"test ({selected.name})", test))
        with open(run_dir / "report.json", "w") as handle:
            json.dump(report, handle, indent=2)
        if results:
            print("training and evaluation preprocessing: " + ", ".join(f"{k}={v}" for k, v in preprocessing.items()))
            print(format_table(*metric_rows(results)))
        print(f"selected checkpoint: {selected}\nreport: {run_dir / 'report.json'}")
    finally:
        shutdown_distributed()
    return 0
