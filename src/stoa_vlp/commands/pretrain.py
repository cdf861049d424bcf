"""`stoa-vlp pretrain`: pre-train STOA-VLP with the six objectives (one process, or torchrun)."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.common import add_config_arguments, add_run_arguments

HELP = "pre-train STOA-VLP on video-caption data (VTC, VTM, MLM, PLM, DOTA, STASP)"
EXAMPLES = """examples:
  stoa-vlp pretrain --config tiny --set data.train=world/MSRVTT_data.json --set data.val=world/MSRVTT_data.json \\
      --set data.video_root=world/videos --set data.detections=world/detections.jsonl --output runs/tiny
  stoa-vlp pretrain --config base --set data.train=webvid/train.csv --set data.video_root=webvid/videos \\
      --set model.init_checkpoint=weights/ViT-B-16.pt --set train.steps=100000 --output runs/webvid
  stoa-vlp pretrain --config runs/webvid/config.yaml --resume latest --output runs/webvid
  torchrun --nproc_per_node 8 --no-python stoa-vlp pretrain --config base --set data.batch_size=32 --output runs/webvid
  (multi-node: torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29500 --nproc_per_node 8 --no-python stoa-vlp ...)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_config="base")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.commands.common import config_from_args, prepare_run
    from stoa_vlp.data.dataset import build_dataset, collate
    from stoa_vlp.model import build_model
    from stoa_vlp.objectives import OBJECTIVES, Pretrainer
    from stoa_vlp.train import Trainer, init_distributed, shutdown_distributed
    from stoa_vlp.train.evaluation import RetrievalEvaluator

    config = config_from_args(args)
    if any(getattr(config.loss, name) == 0 for name in OBJECTIVES):
        config.train.find_unused_parameters = True  # a disabled objective leaves parameters without gradient
    env = init_distributed(config.train.device)
    try:
        run_dir = prepare_run(config, env, args)
        module = Pretrainer(build_model(config.model), config.loss)
        train_set = build_dataset(config, "train", env.rank, env.world_size)
        evaluate = None
        if config.data.val:
            evaluate = RetrievalEvaluator(config, "val", env.device, config.train.val_max_clips)
        trainer = Trainer(config, module, train_set, collate, run_dir, env, evaluate)
        trainer.fit(resume=args.resume)
        if env.is_main:
            print(f"run folder: {run_dir}")
    finally:
        shutdown_distributed()
    return 0
