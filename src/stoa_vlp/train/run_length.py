"""A run's length given in epochs of its training items, and its warmup as a share of the run.

`train.epochs` > 0 sets `train.steps` from the training set, as fine-tuning recipes give it (the
reference's 5 epochs; 10 for MSVD captioning): steps = ceil(epochs x batches per epoch / grad_accum),
a batch per epoch being the global batch (data.batch_size x ranks) the Trainer's sampler takes, the
last partial one dropped. `train.warmup_share` > 0 sets `train.warmup_steps` to that share of the
steps (the paper's 10%). Both are resolved when the training set is built, before the Trainer, so
the run's config.yaml records the steps they gave. A resumed run resolves them again: the same
numbers on the same data and global batch; otherwise the changed steps are warned about as any
changed schedule setting is.
"""

from __future__ import annotations

import logging
import math

from torch.utils.data import IterableDataset

from stoa_vlp.config import Config, TrainConfig

log = logging.getLogger(__name__)


def set_run_length(config: Config, train_dataset, world_size: int) -> None:
    """Resolve train.epochs and train.warmup_share into train.steps and train.warmup_steps (in place),
    then, when either was set, warn when the warmup lasts the whole run (given steps are warned about
    by `train.settings.check_settings`)."""
    train = config.train
    if train.epochs > 0:
        if isinstance(train_dataset, IterableDataset):  # `check_settings` refuses shards before a run starts
            raise ValueError("train.epochs needs a training set of known length; WebDataset shards are streamed: "
                             "give the run's length as train.steps")
        global_batch = config.data.batch_size * world_size
        batches_per_epoch = len(train_dataset) // global_batch
        if batches_per_epoch == 0:
            raise ValueError(f"train.epochs: the training set's {len(train_dataset)} items fill no global batch "
                             f"of {global_batch} (data.batch_size x {world_size} ranks)")
        given, train.steps = train.steps, math.ceil(train.epochs * batches_per_epoch / train.grad_accum)
        log.info("train.epochs=%g: %d items, %d global batches of %d per epoch (train.grad_accum=%d): "
                 "train.steps=%d (in place of %d)", train.epochs, len(train_dataset), batches_per_epoch,
                 global_batch, train.grad_accum, train.steps, given)
    if train.warmup_share > 0:
        given, train.warmup_steps = train.warmup_steps, round(train.warmup_share * train.steps)
        log.info("train.warmup_share=%g of %d steps: train.warmup_steps=%d (in place of %d)", train.warmup_share,
                 train.steps, train.warmup_steps, given)
    if train.epochs > 0 or train.warmup_share > 0:  # else `check_settings` has said it, before the run started
        warn_if_warmup_outlasts_run(train)


def warn_if_warmup_outlasts_run(train: TrainConfig) -> None:
    if train.warmup_steps >= train.steps:
        log.warning("train.warmup_steps=%d is not below train.steps=%d: the learning rate rises for the whole "
                    "run and never decays; set train.steps for your data and train.warmup_steps to about a tenth "
                    "of it (the paper warms up over 10%%; or train.epochs and train.warmup_share)",
                    train.warmup_steps, train.steps)
