"""`stoa-vlp pretrain`: pre-train STOA-VLP with the six objectives (one process, or torchrun)."""

from __future__ import annotations

import argparse

from stoa_vlp.commands.common import add_config_arguments, add_run_arguments, warn_if_random_towers

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


def warn_if_objectives_lack_data(config) -> None:
    """DOTA needs trajectories (data.detections) and DOTA and STASP need noun/verb tags (data.tags);
    without them they run, but align only to the sentence feature or to nothing."""
    import logging

    log = logging.getLogger("stoa_vlp.pretrain")
    if config.model.objects and config.loss.dota > 0 and not config.data.detections:
        log.warning("data.detections is not set: no object trajectories, so DOTA has nothing to align "
                    "(stoa-vlp detect writes them; model.objects=false pre-trains without objects)")
    if (config.loss.dota > 0 or config.loss.stasp > 0) and not config.data.tags:
        log.warning("data.tags is not set: captions carry no noun/verb tags, so DOTA and STASP align to the "
                    "sentence feature only (stoa-vlp tag writes them)")


def run(args: argparse.Namespace) -> int:
    from stoa_vlp.commands.common import (
        check_resume,
        check_run_files,
        config_from_args,
        prepare_run,
        set_deterministic,
        validation_overlap,
    )
    from stoa_vlp.config import TaskConfig
    from stoa_vlp.data.dataset import collate
    from stoa_vlp.model.checkpoint import build_model, build_model_for_weights
    from stoa_vlp.objectives import OBJECTIVES, Pretrainer
    from stoa_vlp.tasks.runs import adopt_label_vocab, keep_label_vocab
    from stoa_vlp.train import Trainer, init_distributed, shutdown_distributed
    from stoa_vlp.train.evaluation import pretraining_data
    from stoa_vlp.train.run_length import set_run_length
    from stoa_vlp.train.settings import check_settings

    config = config_from_args(args)
    if config.task.name != TaskConfig().name:  # pre-training's checkpoints are told apart by its default
        raise ValueError(f"task.name={config.task.name}: pretrain trains the pre-training objectives and validates "
                         f"zero-shot retrieval whatever the task; leave task.name at {TaskConfig().name} (the "
                         "tasks are `stoa-vlp finetune --task`)")
    check_settings(config, pretraining=True)
    check_run_files(config, resume=bool(args.resume))
    check_resume(args, config)  # before prepare_run writes the run folder
    if any(getattr(config.loss, name) == 0 for name in OBJECTIVES):
        config.train.find_unused_parameters = True  # a disabled objective leaves parameters without gradient
    env = init_distributed(config.train.device, config.train.dist_timeout_minutes)
    try:
        if env.is_main:
            warn_if_objectives_lack_data(config)
            validation_overlap(config, config, "test")
            if not args.resume:  # a resumed run's towers come from its checkpoint
                warn_if_random_towers(config)
        run_dir = prepare_run(config, env, args)
        set_deterministic(config.train)
        adopt_label_vocab(config, run_dir)  # a resumed run keeps its class ids
        # a resumed run loads its checkpoint's weights over the whole model: the CLIP file is not read
        model = build_model_for_weights(config.model) if args.resume else build_model(config.model)
        module = Pretrainer(model, config.loss)
        train_set, evaluate = pretraining_data(config, env, validate=bool(config.data.val))
        set_run_length(config, train_set, env.world_size)
        trainer = Trainer(config, module, train_set, collate, run_dir, env, evaluate)
        keep_label_vocab(config, train_set.label_vocab, run_dir, env)  # last: a run that cannot start writes nothing
        trainer.fit(resume=args.resume)
        if env.is_main:
            print(f"run folder: {run_dir}")
    finally:
        shutdown_distributed()
    return 0
