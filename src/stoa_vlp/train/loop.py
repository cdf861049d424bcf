"""The training loop: `Trainer(config, module, dataset, collate, run_dir).fit(resume)`.

`module.forward(batch)` returns a dict with a scalar "loss" (with gradient) and any number of
detached scalars to log (the Pretrainer convention). A batch has `.to(device)`, `len()` and
`video_ids`. One optimiser step consumes `train.grad_accum` micro-batches of `data.batch_size`
clips on each rank; `train.steps` counts optimiser steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from stoa_vlp.config import Config, TrainConfig, save_config
from stoa_vlp.train import checkpointing as ckpt
from stoa_vlp.train.data_position import (
    ResumableSampler,
    SeededDataset,
    WorkerSeeder,
    loader_seed,
    rank_seed,
    seed_everything,
    worker_seed,
)
from stoa_vlp.host_copy import start_copy_to_host
from stoa_vlp.model.checkpoint import load_state_checked, weights_prefix
from stoa_vlp.train.distributed import DistEnv, barrier, gather_objects, mean_over_ranks, wrap_model
from stoa_vlp.train.logging import MetricsLogger, Progress, finite_or_null, format_table
from stoa_vlp.train.optim import (
    apply_settings,
    build_optimizer,
    build_scheduler,
    changed_settings,
    group_settings,
    parameter_groups,
)
from stoa_vlp.train.provenance import write_run_record

log = logging.getLogger(__name__)
HISTORY_STEPS = 1000  # TrainResult.history keeps a session's first step and its last HISTORY_STEPS
MAX_SKIPS_IN_A_ROW = 50  # skipped steps with none taken after which a run gives up (also amp_fp16 overflows)

Evaluator = Callable[[nn.Module], dict[str, float]]  # trained module (unwrapped) -> validation metrics

PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient was NaN or infinite and train.nonfinite is "stop" (or, with "skip", the
    steps kept being skipped: the model itself has diverged)."""

    def __init__(self, step: int, video_ids: list[str], values: dict[str, float], what: str = "loss",
                 advice: str = "Set train.nonfinite=skip to skip such batches."):
        self.step, self.video_ids, self.values = step, video_ids, values
        super().__init__(
            f"non-finite {what} at step {step} (values {values}); batch video ids: {', '.join(video_ids)}. {advice}"
        )


@dataclass
class QueuedStep:
    """An optimiser step queued on the device, its outcome not yet read by the host."""

    names: list[str]  # the module's outputs
    # on the host once `ready` has completed: this rank's outputs per micro-batch (grad_accum x names),
    # their mean over micro-batches and ranks (names), the gradient norm, then 1.0 where a loss (on
    # any rank) and where the gradient were not finite
    readout: torch.Tensor
    ready: torch.cuda.Event | None
    video_ids: list[list[str]]  # this rank's, per micro-batch
    lr: float  # of its update (the first parameter group's)
    queued_at: float  # time.perf_counter() when the host began to queue it

    @property
    def clips(self) -> int:
        return sum(len(ids) for ids in self.video_ids)

    def read(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.readout.tolist()


@dataclass
class TrainResult:
    step: int  # optimiser steps done in total
    # this session's first step and its last HISTORY_STEPS, rank-averaged (all of them, at a dict each, held
    # about 1 GB after a million steps: metrics.jsonl has every train.log_every-th)
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    skipped_batches: int = 0
    seconds: float = 0.0
    clips_per_s: float = 0.0
    last_checkpoint: Path | None = None
    data_skips: str | None = None  # the training data's skip summary over all ranks (a SkipCounter's)


@dataclass
class _RunRecord:
    """What `Trainer.fit` keeps while it runs: where finished steps are logged, and their counts."""

    logger: MetricsLogger
    progress: Progress
    result: TrainResult
    started: float  # time.perf_counter() at the start
    clips_done: float = 0.0


MAX_DIST_TIMEOUT_MINUTES = 7 * 24 * 60


def check_train_settings(train: TrainConfig) -> None:
    """A ValueError naming every train setting that cannot work."""
    problems = []
    if train.nonfinite not in ("stop", "skip"):
        problems.append(f"train.nonfinite must be stop or skip, got {train.nonfinite!r}")
    if train.precision not in PRECISIONS:
        problems.append(f"train.precision must be one of {sorted(PRECISIONS)}, got {train.precision!r}")
    at_the_end = " (the last step always validates and saves: train.steps means only then)"
    for name in ("steps", "grad_accum", "log_every", "eval_every", "save_every", "keep_last", "dist_timeout_minutes"):
        if getattr(train, name) < 1:
            hint = at_the_end if name in ("eval_every", "save_every") else ""
            problems.append(f"train.{name} must be at least 1, got {getattr(train, name)}{hint}")
    if not train.dist_timeout_minutes <= MAX_DIST_TIMEOUT_MINUTES:
        problems.append(f"train.dist_timeout_minutes must be at most {MAX_DIST_TIMEOUT_MINUTES} (a week: a rank "
                        f"waiting longer for the others has hung), got {train.dist_timeout_minutes}")
    if not 0 <= train.seed < 2**32:
        problems.append(f"train.seed must be in 0..2**32 - 1 (numpy's seeds), got {train.seed}")
    for name in ("tower_lr_scale", "weight_decay", "val_max_clips"):
        if not getattr(train, name) >= 0:
            hint = " (0: every validation clip)" if name == "val_max_clips" else ""
            problems.append(f"train.{name} must be at least 0{hint}, got {getattr(train, name)}")
    if not 0 <= train.min_lr_scale <= 1:
        problems.append(f"train.min_lr_scale must be in [0, 1] (the cosine decays to lr x min_lr_scale), "
                        f"got {train.min_lr_scale}")
    if not all(0 <= beta < 1 for beta in train.betas):
        problems.append(f"train.betas must each be in [0, 1) (Adam's moving-average decays), got {list(train.betas)}")
    if not train.eps > 0:
        problems.append(f"train.eps must be above 0 (it keeps Adam's update finite), got {train.eps}")
    if not train.clip_grad >= 0:
        problems.append(f"train.clip_grad must be at least 0 (0: no clipping), got {train.clip_grad}")
    if problems:
        raise ValueError("; ".join(problems))


class Trainer:
    def __init__(
        self,
        config: Config,
        module: nn.Module,
        train_dataset: Dataset,
        collate: Callable[[list[Any]], Any],
        run_dir: str | Path,
        env: DistEnv | None = None,
        evaluate: Evaluator | None = None,
    ):
        self.config, self.train = config, config.train
        check_train_settings(self.train)
        self.env = env or DistEnv.current(self.train.device)
        self.run_dir = Path(run_dir)
        self.evaluate = evaluate
        self.collate = collate
        self.module = module.to(self.env.device)  # the unwrapped module: evaluation
        self.weights_prefix = weights_prefix(module)  # the checkpoint holds module.model's weights if it has one
        # grouped before wrapping: FSDP keeps the parameter objects but flattens their shapes, and the
        # weight-decay groups are chosen by shape
        groups = parameter_groups(self.module, self.train)
        self.wrapped = wrap_model(self.module, self.train.distributed, self.env, self.train.find_unused_parameters)
        if self.env.rank > 0:
            # every rank has built the same initial weights (FSDP relies on it); from here each rank draws
            # its own MLM positions, PLM starts, VTM negatives and dropout masks (rank 0 keeps its stream,
            # so that one rank draws as it always did)
            seed_everything(rank_seed(self.train.seed, self.env.rank))
        self.fsdp = self.env.distributed and self.train.distributed == "fsdp"
        self.optimizer = build_optimizer(groups, self.train, self.env.device, self.fsdp)
        self.scheduler = build_scheduler(self.optimizer, self.train)
        self.scaler = grad_scaler(self.env.device.type, self.train.precision == "amp_fp16", self.fsdp)
        self.skipped_in_a_row = 0  # steps skipped since the last one taken (train.nonfinite=skip)
        self.copy_stream = torch.cuda.Stream(self.env.device) if self.env.device.type == "cuda" else None
        self.forward = torch.compile(self.wrapped) if self.train.compile else self.wrapped
        # a streamed dataset (WebDataset shards) orders and splits its samples itself: its position
        # is counted, and a resumed stream is seeded from it (`set_position`), not replayed exactly
        self.streamed = isinstance(train_dataset, IterableDataset)
        if not self.streamed:
            require_same_size_on_every_rank(len(train_dataset), self.env)
        self.dataset = train_dataset if self.streamed else SeededDataset(train_dataset)
        self.sampler = ResumableSampler(
            None if self.streamed else len(train_dataset), config.data.batch_size, self.env.rank,
            self.env.world_size, self.train.seed,
        )
        self.data_skips = getattr(train_dataset, "skips", None)  # the data module's SkipCounter, if any
        self.step = 0
        self.skipped_batches = 0
        self.best_value: float | None = None
        self.best: dict[str, float] | None = None  # {"step": ..., "val/...": ...} of the best validation
        self.best_checkpoint: dict[str, Any] | None = None  # best.json's record of it
        self.validations: list[dict[str, float]] = []

    # ---- data --------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        workers = self.config.data.num_workers
        epoch = self.sampler.epoch
        if self.streamed and hasattr(self.dataset, "set_position"):
            self.dataset.set_position(epoch, self.sampler.start_batch)
        return DataLoader(
            self.dataset,
            batch_size=self.config.data.batch_size,
            sampler=None if self.streamed else self.sampler,
            collate_fn=self.collate,
            num_workers=workers,
            worker_init_fn=WorkerSeeder(self.train.seed, self.env.rank, epoch) if workers else None,
            generator=torch.Generator().manual_seed(loader_seed(self.train.seed, self.env.rank, epoch)),
            drop_last=True,
            pin_memory=self.env.device.type == "cuda",
        )

    def _micro_batches(self) -> Iterator[Any]:
        """Batches forever, epoch after epoch; sampler.start_batch counts the batches handed out. An epoch
        without a single batch for this rank is an error (it would loop here while the others wait)."""
        while True:
            fresh_epoch, handed_out = self.sampler.start_batch == 0, 0  # a resumed epoch may have none left
            for batch in self._loader():
                self.sampler.start_batch += 1
                handed_out += 1
                yield batch
            if fresh_epoch and handed_out == 0:
                raise ValueError(f"rank {self.env.rank}: the training data gave no batch of {self.config.data.batch_size} "
                                 f"in epoch {self.sampler.epoch} (a stream without shards or samples for this rank?)")
            self.sampler.set_position(self.sampler.epoch + 1, 0)

    # ---- checkpoints -------------------------------------------------------------------------

    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(module weights, optimiser state) as full, CPU-side state dicts; collective under FSDP."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            # not cpu_offload=True: with it, torch 2.14 returned Adam's exp_avg and exp_avg_sq as one
            # shared tensor (found by tests/test_train_distributed.py); we copy to the CPU ourselves
            options = StateDictOptions(full_state_dict=True)
            weights, optimizer_state = get_state_dict(self.wrapped, self.optimizer, options=options)
            weights, optimizer_state = ckpt.to_cpu(weights), ckpt.to_cpu(optimizer_state)
        else:
            weights, optimizer_state = self.module.state_dict(), self.optimizer.state_dict()
        start = len(self.weights_prefix)
        return {name[start:]: value for name, value in weights.items()}, optimizer_state

    def save_checkpoint(self, metrics: dict[str, float], is_best: bool) -> Path:
        weights, optimizer_state = self._state_dicts()
        temporary = ckpt.start_checkpoint(self.run_dir, self.step) if self.env.is_main else None
        barrier(self.env)
        if temporary is None:  # other ranks: the same folder (checkpoints need a filesystem shared by all nodes)
            temporary = self.run_dir / ckpt.CHECKPOINTS / f".tmp-{ckpt.checkpoint_name(self.step)}"
            temporary.mkdir(parents=True, exist_ok=True)
        main = self.env.is_main
        data_skips = self._data_skip_counts()
        state = {
            "format": 1,
            "step": self.step,
            "epoch": self.sampler.epoch,
            "data_position": self.sampler.start_batch,  # global batches of this epoch consumed
            "global_batch": self.sampler.global_batch,  # samples in one
            "world_size": self.env.world_size,
            "ranks_draw_apart": True,  # ranks > 0 reseeded with rank_seed (before 2026-11-27 all drew alike)
            "skipped_batches": self.skipped_batches,
            "data_skips": data_skips,
            "best_value": self.best_value,
            "best": None if self.best is None else finite_or_null(self.best),
            "best_checkpoint": self.best_checkpoint,
            "worker_seeds": {
                "seed": self.train.seed,
                "epoch": self.sampler.epoch,
                "per_rank_worker": [
                    [worker_seed(self.train.seed, rank, self.sampler.epoch, w) for w in range(self.config.data.num_workers)]
                    for rank in range(self.env.world_size)
                ],
            },
            "metrics": finite_or_null(metrics),
            "config": self.config.to_dict(),
        }
        training_state = {
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        ckpt.write_checkpoint_files(
            temporary,
            self.env.rank,
            weights if main else None,
            training_state if main else None,
            dataclasses.asdict(self.config.model),
        )
        barrier(self.env)  # every rank's RNG file is written before the folder is marked complete
        final = self.run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(self.step)
        if main:
            ckpt.write_state(temporary, finite_or_null(state))
            final = ckpt.finish_checkpoint(self.run_dir, temporary, self.step, self.train.keep_last, is_best)
        barrier(self.env)
        return final

    def load_checkpoint(self, folder: Path) -> None:
        """Resume from the checkpoint `folder`: its weights and training state (with this run's optimiser
        and schedule settings), counters, best checkpoint, data position and random state."""
        loaded = ckpt.read_checkpoint(folder, self.env.rank)
        state = loaded["state"]
        self._load_training_state(folder, loaded)
        self._load_counters(state)
        if self.env.is_main:  # rank 0 alone reads best.json and rewrites it (tidying)
            self._load_best_and_skips(folder, state)
        self._share_best()
        self._set_data_position(folder, state)
        self._load_rng_state(folder, state, loaded["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, *self._position())

    def _load_training_state(self, folder: Path, loaded: dict[str, Any]) -> None:
        """The weights, optimiser, LR schedule and loss scaler of the checkpoint, with this run's optimiser
        and schedule settings over the checkpoint's (a warning names those that differ)."""
        settings = group_settings(self.optimizer)  # this run's: the loaded states bring the old run's
        training_state = loaded["training_state"]
        self._load_weights_and_optimizer(folder, loaded["weights"], training_state)
        self.scheduler.load_state_dict(training_state["scheduler"])
        apply_settings(self.optimizer, self.scheduler, settings)
        changed = changed_settings(loaded["state"]["config"]["train"], self.train)
        if changed:
            log.warning("%s: this run's optimiser and LR schedule settings replace the checkpoint's: %s", folder,
                        ", ".join(changed))
        self.scaler.load_state_dict(training_state["scaler"])

    def _load_weights_and_optimizer(self, folder: Path, weights: dict[str, torch.Tensor],
                                    training_state: dict[str, Any]) -> None:
        """The checkpoint's module `weights` (names without `weights_prefix`) and optimiser state."""
        weights = {self.weights_prefix + name: value for name, value in weights.items()}
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            set_model_state_dict(self.wrapped, weights, options=StateDictOptions(full_state_dict=True))
            # not strict: a parameter that never had a gradient (a block of a disabled objective) has
            # no optimiser state in the checkpoint, as in the run that wrote it
            set_optimizer_state_dict(self.wrapped, self.optimizer, training_state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            load_state_checked(self.module, weights, str(folder))
            self.optimizer.load_state_dict(training_state["optimizer"])

    def _load_counters(self, state: dict[str, Any]) -> None:
        """The step, the skipped batches and the best validation of the checkpoint."""
        self.step = state["step"]
        self.skipped_batches = state["skipped_batches"]
        self.best_value = state["best_value"]
        self.best = state.get("best")

    def _load_best_and_skips(self, folder: Path, state: dict[str, Any]) -> None:
        """Rank 0: the best checkpoint's record and the data skip counts of the checkpoint, then the run's
        checkpoints tidied (`_tidy_checkpoints`)."""
        if "best_checkpoint" in state:
            self.best_checkpoint = state["best_checkpoint"]
        else:  # a checkpoint older than state.json's record of it
            self.best_checkpoint = ckpt.read_best(self.run_dir)
        if self.data_skips is not None and state.get("data_skips") is not None:
            self.data_skips.add(*state["data_skips"])
        self._tidy_checkpoints(folder)

    def _share_best(self) -> None:
        """The other ranks take rank 0's best (tidying can drop a pruned best): they must agree on the best,
        since a better validation makes every rank save (collective)."""
        best = (self.best_value, self.best, self.best_checkpoint)
        self.best_value, self.best, self.best_checkpoint = gather_objects(best, self.env)[0]

    def _set_data_position(self, folder: Path, state: dict[str, Any]) -> None:
        """Set the sampler to the checkpoint's epoch and batch (a stream cannot resume exactly: warned)."""
        if self.streamed:
            self.sampler.set_position(state["epoch"], state["data_position"])
            if hasattr(self.dataset, "set_position"):
                log.warning("%s: streamed training data has no exact position: the resumed stream is seeded "
                            "from batch %d, so its samples differ from an uninterrupted run's", folder,
                            state["data_position"])
            else:
                log.warning("%s: %s has no set_position: its stream restarts on resume", folder,
                            type(self.dataset).__name__)
        else:  # the order depends on the seed and the epoch only, not on the rank count
            self.sampler.set_position(state["epoch"], self._data_position(folder, state))

    def _load_rng_state(self, folder: Path, state: dict[str, Any], rng: dict[str, Any] | None) -> None:
        """Restore this rank's random state from the checkpoint's `rng` when it was written by as many ranks
        (a checkpoint whose ranks all drew alike reseeds the ranks after the first); else warn."""
        if state["world_size"] != self.env.world_size:
            log.warning("%s was written by %d ranks, this run has %d: random states are not restored exactly",
                        folder, state["world_size"], self.env.world_size)
        elif rng is not None:
            ckpt.set_rng_state(rng)
            if self.env.rank > 0 and not state.get("ranks_draw_apart"):
                log.warning("%s was written when every rank drew the same random numbers: rank %d now draws its "
                            "own from here", folder, self.env.rank)
                seed_everything(rank_seed(self.train.seed, self.env.rank, self.step))
        else:
            log.warning("%s holds no RNG state for rank %d: its random draws will differ", folder, self.env.rank)

    def _data_position(self, folder: Path, state: dict[str, Any]) -> int:
        """The checkpoint's data position in this run's global batches: the samples consumed, rounded
        down to whole batches when the global batch changed (a few samples are seen again, none skipped)."""
        saved_batch = state.get("global_batch", self.sampler.global_batch)
        consumed = state["data_position"] * saved_batch
        position = consumed // self.sampler.global_batch
        if saved_batch != self.sampler.global_batch:
            restart = position * self.sampler.global_batch
            log.warning(
                "%s was written with global batches of %d samples, this run's are %d (data.batch_size x ranks): "
                "it resumes epoch %d at sample %d of the %d consumed, so %d samples seen again and none skipped",
                folder, saved_batch, self.sampler.global_batch, state["epoch"], restart, consumed, consumed - restart,
            )
        return position

    def _tidy_checkpoints(self, folder: Path) -> None:
        """Rank 0, on resume: set aside this run's checkpoints after the resumed step (the abandoned
        continuation of a resume from an older checkpoint, which pruning and --resume latest would take
        for the newest), then rewrite best.json from the resumed checkpoint (a kill can fall between a
        best checkpoint's rename and best.json's update)."""
        moved = ckpt.set_aside_later_checkpoints(self.run_dir, self.step)
        if moved:
            log.warning("resumed from %s: this run's later checkpoints %s are moved to %s", folder,
                        ", ".join(path.name for path in moved), moved[0].parent)
        kept = ckpt.restore_best(self.run_dir, self.best_checkpoint)
        if kept is None and self.best_checkpoint is not None:
            # pruned after a later best that this resume abandons: the next validation selects anew, so
            # that best.json, finished.json and a fine-tuning report name a checkpoint that exists
            log.warning("the best checkpoint %s named by %s is not in %s: the next validation selects the best anew",
                        self.best_checkpoint["name"], folder, self.run_dir / ckpt.CHECKPOINTS)
            self.best_value, self.best = None, None
        self.best_checkpoint = kept

    def _position(self) -> tuple[int, int]:
        return self.sampler.epoch, self.sampler.start_batch

    # ---- one optimiser step ------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.train.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def _train_step(self, batches: Iterator[Any], previous: QueuedStep | None = None,
                    finished: Callable[[dict[str, float] | None], None] = lambda metrics: None) -> QueuedStep:
        """Queue one optimiser step on the device: forward/backward over grad_accum micro-batches, then
        clip and update, the update skipped on the device when a loss or the gradient is not finite.

        Nothing is read from the device here. `previous`, the step queued before if still unread, is
        finished once this step's backward is queued (the device has computed it by then, so the host
        does not wait) and before this step's update, whose learning rate depends on whether `previous`
        was taken; `finished` gets its metrics (`_finish_step`)."""
        queued_at = time.perf_counter()
        accum = self.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        outputs_per_batch, video_ids = [], []
        for micro in range(accum):
            batch = self._to_device(next(batches))
            video_ids.append(batch.video_ids)
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    outputs = self.forward(batch)
                self.scaler.scale(outputs["loss"] / accum).backward()
            outputs_per_batch.append(torch.stack([value.detach().float() for value in outputs.values()]))
        if previous is not None:
            finished(self._finish_step(previous, until=queued_at))
        return self._queue_update(list(outputs), torch.stack(outputs_per_batch), video_ids, queued_at)

    def _to_device(self, batch: Any) -> Any:
        """`batch` on the training device. On CUDA a Batch (which can `record_stream`) is copied on a stream
        of its own, so that the copy overlaps the step the device is still running (the host queues a
        step's work well ahead of the device); the step's stream waits for the copy before its forward."""
        if self.copy_stream is None or not hasattr(batch, "record_stream"):
            return batch.to(self.env.device, non_blocking=True)
        step_stream = torch.cuda.current_stream(self.env.device)
        with torch.cuda.stream(self.copy_stream):
            moved = batch.to(self.env.device, non_blocking=True)
        step_stream.wait_stream(self.copy_stream)
        moved.record_stream(step_stream)
        return moved

    def _queue_update(self, names: list[str], outputs: torch.Tensor, video_ids: list[list[str]],
                      queued_at: float) -> QueuedStep:
        """Clip and update after the backward; `outputs` (grad_accum, len(names)) are this rank's output
        values per micro-batch."""
        self.scaler.unscale_(self.optimizer)
        clip = self.wrapped.clip_grad_norm_ if self.fsdp else self._clip_local
        # the norm of the whole (all-reduced or sharded) gradient: the same on every rank
        grad_norm = clip(self.train.clip_grad if self.train.clip_grad > 0 else math.inf).float().reshape(1)  # 0: none
        local_loss_bad = (~torch.isfinite(outputs[:, names.index("loss")])).any().float().reshape(1)
        # the step's mean outputs, and the share of ranks with a non-finite loss
        shared = mean_over_ranks(torch.cat([outputs.mean(dim=0), local_loss_bad]), self.env)
        loss_bad, gradient_bad = shared[-1:] > 0, ~torch.isfinite(grad_norm)
        # a finite loss can still overflow in the backward, and stepping would make every weight NaN
        # (with amp_fp16 the GradScaler also lowers its scale for such a step)
        self._update_unless(loss_bad | gradient_bad)
        self.scaler.update()
        readout = torch.cat([outputs.flatten(), shared[:-1], grad_norm, loss_bad.float(), gradient_bad.float()])
        host, ready = start_copy_to_host(readout)
        return QueuedStep(names, host, ready, video_ids, self.optimizer.param_groups[0]["lr"], queued_at)

    def _update_unless(self, skip: torch.Tensor) -> None:
        """The optimiser's update unless `skip` (bool, shape (1,), on the device). The fused kernels take
        the flag on the device, as they take a GradScaler's overflow flag: where it is set they leave the
        weights, the moments and the step count as they were, and the host never waits. The other
        kernels take no flag, so it is read first (a host sync)."""
        if self.optimizer.defaults.get("fused"):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skip.float().reshape(())
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif not bool(skip):
            self.optimizer.step()

    def _finish_step(self, queued: QueuedStep, until: float | None = None) -> dict[str, float] | None:
        """Read a queued step's outcome (waiting for its copy to the host) and count it. Returns its
        rank-averaged metrics when it was taken, with its "seconds": from when the host began to queue
        it to `until`, when it began to queue the next step (now if None: a step read at once, whose
        read waits for the device to finish it). None when a non-finite loss or gradient skipped it
        (train.nonfinite=stop raises instead; see `_non_finite`). Collective when it was skipped."""
        width, batches = len(queued.names), len(queued.video_ids)
        numbers = queued.read()
        per_batch = [numbers[i * width:(i + 1) * width] for i in range(batches)]
        metrics = dict(zip(queued.names, numbers[batches * width:(batches + 1) * width]))
        grad_norm, loss_bad, gradient_bad = numbers[-3:]
        if loss_bad:
            loss_at = queued.names.index("loss")
            blamed = [video_id for values, ids in zip(per_batch, queued.video_ids)
                      if not math.isfinite(values[loss_at]) for video_id in ids]
            return self._non_finite(blamed, metrics, "loss")
        metrics["grad_norm"] = grad_norm
        if gradient_bad:
            return self._non_finite([video_id for ids in queued.video_ids for video_id in ids], metrics, "gradient")
        self.scheduler.step()
        self.step += 1
        self.skipped_in_a_row = 0
        seconds = (time.perf_counter() if until is None else until) - queued.queued_at
        return {**metrics, "lr": queued.lr, "clips": float(queued.clips), "seconds": seconds}

    def _needs_outcome_at_once(self, step: int) -> bool:
        """Whether validation, a checkpoint or the end of training follow optimiser step `step`: the step
        queued as `step` is then finished before the next is queued, so that they see its weights and
        random state, not the next step's."""
        return step == self.train.steps or step % self.train.save_every == 0 or self._validates_after(step)

    def _validates_after(self, step: int) -> bool:
        return self.evaluate is not None and (step == self.train.steps or step % self.train.eval_every == 0)

    def _clip_local(self, max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def _non_finite(self, video_ids: list[str], values: dict[str, float], what: str) -> None:
        """Apply train.nonfinite to a step whose update the device skipped because its `what` ("loss" or
        "gradient") was not finite; `video_ids` are this rank's clips to blame (none where its values are
        finite). Collective.

        Under amp_fp16 a non-finite gradient is the GradScaler's overflow, by which it also calibrates
        its scale (a few such steps early in a run are normal): it is skipped under either policy, and
        only MAX_SKIPS_IN_A_ROW of them in a row stop the run (the scale has by then halved as often)."""
        video_ids = [video_id for ids in gather_objects(list(video_ids), self.env) for video_id in ids]
        scaler_overflow = what == "gradient" and self.scaler.is_enabled()
        if self.train.nonfinite == "stop" and not scaler_overflow:
            raise NonFiniteLossError(self.step + 1, video_ids, values, what)
        self.skipped_batches += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row == MAX_SKIPS_IN_A_ROW:
            raise NonFiniteLossError(self.step + 1, video_ids, values, what, advice=(
                f"{MAX_SKIPS_IN_A_ROW} steps in a row were skipped: the model itself has diverged (lower train.lr, "
                "or resume from an earlier checkpoint)"))
        overflow = " (an amp_fp16 overflow: the loss scale is lowered)" if scaler_overflow else ""
        log.warning("skipped step %d: non-finite %s%s %s (video ids %s)", self.step + 1, what, overflow, values,
                    video_ids)
        return None

    # ---- validation --------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Run the evaluator on rank 0 (others wait); keeps training RNG streams untouched. It runs in
        float32, as `stoa-vlp evaluate` and `finetune --test` do, so that the checkpoint is chosen on
        the numbers they report (under bf16 autocast, retrieval scores rounded into ties: R@1 1.5
        points lower on 1,000 videos)."""
        metrics: dict[str, float] = {}
        devices = [self.env.device.index or 0] if self.env.device.type == "cuda" else []
        gather = contextlib.nullcontext()
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel

            gather = FullyShardedDataParallel.summon_full_params(self.wrapped, writeback=False)
        with gather, torch.random.fork_rng(devices=devices):
            if self.env.is_main and self.evaluate is not None:
                self.module.eval()
                with torch.no_grad():
                    metrics = {name: float(value) for name, value in self.evaluate(self.module).items()}
                self.module.train()
        return gather_objects(metrics, self.env)[0]

    def _is_best(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.train.best_metric)
        if value is None:
            if metrics and len(self.validations) == 1 and self.env.is_main:  # said once, at the first validation
                log.warning("train.best_metric %s is not among the validation metrics (%s): no best checkpoint "
                            "is selected", self.train.best_metric, ", ".join(sorted(metrics)))
            return False
        if not math.isfinite(value):  # never best: no value compares above a NaN, so it would stay best for good
            return False
        # a NaN best comes from a checkpoint written before non-finite values were kept out
        if self.best_value is None or not math.isfinite(self.best_value) or value > self.best_value:
            self.best_value = value
            return True
        return False

    # ---- the run -----------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None, init: dict[str, Any] | None = None) -> TrainResult:
        """Train to train.steps; `init`: the checkpoint the weights started from, kept in run.json
        (`provenance.checkpoint_record`)."""
        if resume is not None:
            self.load_checkpoint(ckpt.resolve_resume(str(resume), self.run_dir))
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            write_run_record(self.run_dir, self.config, self.env.device, self.env.world_size, init, resume is not None)
        logger = MetricsLogger(
            self.run_dir if self.env.is_main else None, self.train.tensorboard,
            resumed_step=self.step if resume is not None else None,
        )
        progress = Progress(self.train.steps, self.step, self.env.is_main and self.train.progress, self.run_dir.name)
        result = TrainResult(step=self.step)
        self.module.train()
        batches = self._micro_batches()
        run = _RunRecord(logger, progress, result, started=time.perf_counter())
        record = functools.partial(self._record, run)
        pending: QueuedStep | None = None  # queued, and not yet read by the host
        try:
            while self.step < self.train.steps:
                pending = self._train_step(batches, pending, record)
                if self._needs_outcome_at_once(self.step + 1):
                    record(self._finish_step(pending))
                    pending = None
        finally:
            progress.close()
            logger.close()
        result.step = self.step
        result.skipped_batches = self.skipped_batches
        result.seconds = time.perf_counter() - run.started
        result.clips_per_s = run.clips_done / max(result.seconds, 1e-9)
        result.validations = self.validations
        result.best = self.best
        result.data_skips = self._data_skip_summary()
        if self.env.is_main:
            if result.data_skips is not None:
                log.info("training data: %s", result.data_skips)
            best = None if result.best is None else finite_or_null(result.best)
            ckpt.write_json_atomic(self.run_dir / ckpt.FINISHED_MARKER, {"step": self.step, "best": best})
            log.info("\n%s", summary_table(result))
        return result

    def _data_skip_summary(self) -> str | None:
        """The training data's SkipCounter summary, its counts summed over the ranks; None without one."""
        if self.data_skips is None:
            return None
        from stoa_vlp.data.skips import skip_summary

        return skip_summary(*self._data_skip_counts())

    def _data_skip_counts(self) -> tuple[int, dict[str, int]] | None:
        """The training data's SkipCounter counts (samples drawn, skips per reason) summed over the ranks;
        None without one. Collective."""
        if self.data_skips is None:
            return None
        counts = gather_objects((self.data_skips.total, self.data_skips.skipped), self.env)
        skipped = {reason: sum(rank_skipped[reason] for _, rank_skipped in counts) for reason in counts[0][1]}
        return sum(total for total, _ in counts), skipped

    def _record(self, run: _RunRecord, metrics: dict[str, float] | None) -> None:
        """Log a finished step (None: skipped), then validate and save where due."""
        if metrics is None:
            run.result.skipped_batches = self.skipped_batches
            return
        clips = metrics.pop("clips") * self.env.world_size
        run.clips_done += clips
        metrics["clips_per_s"] = clips / max(metrics.pop("seconds"), 1e-9)
        run.result.history.append({"step": self.step, **metrics})
        if len(run.result.history) > HISTORY_STEPS + 1:
            del run.result.history[1]  # the oldest but the first
        run.progress.update(metrics["loss"], metrics["clips_per_s"], self.skipped_batches)
        if self.step % self.train.log_every == 0 or self.step == self.train.steps:
            counts = {"skipped_batches": self.skipped_batches}
            if self.data_skips is not None:
                counts["skipped_samples"] = sum(self._data_skip_counts()[1].values())
            run.logger.log("train", self.step, {**metrics, **counts})
        self._after_step(run.logger, run.result, metrics)

    def _after_step(self, logger: MetricsLogger, result: TrainResult, train_metrics: dict[str, float]) -> None:
        final = self.step == self.train.steps
        validate = self._validates_after(self.step)
        val_metrics: dict[str, float] = {}
        if validate:
            raw = self.validate()
            logger.log("val", self.step, raw)
            val_metrics = {f"val/{name}": value for name, value in raw.items()}
            self.validations.append({"step": self.step, **val_metrics})
        is_best = self._is_best(val_metrics)
        if is_best:
            self.best = {"step": self.step, **val_metrics}
            self.best_checkpoint = {"name": ckpt.checkpoint_name(self.step), "step": self.step}
        if final or self.step % self.train.save_every == 0 or is_best:  # the best is always saved
            result.last_checkpoint = self.save_checkpoint({**train_metrics, **val_metrics}, is_best)


def require_same_size_on_every_rank(size: int, env: DistEnv) -> None:
    """ValueError on every rank unless each rank's training set holds `size` samples: the ranks share one
    shuffled order, so a rank that read its split differently (a video file that appeared or vanished
    between the ranks' checks on a shared file system) would draw other samples than the others leave
    it, duplicating some and missing others. Collective."""
    sizes = gather_objects(size, env)
    if len(set(sizes)) > 1:
        raise ValueError(f"the ranks' training sets differ in size ({', '.join(map(str, sizes))} samples on ranks "
                         f"0-{len(sizes) - 1}): the split's files changed while the ranks read it")


def grad_scaler(device_type: str, enabled: bool, fsdp: bool) -> torch.amp.GradScaler:
    """The loss scaler of amp_fp16 (disabled otherwise). Under FSDP each rank holds a shard of the
    gradients, so the scaler must agree on overflow across ranks (ShardedGradScaler all-reduces it):
    a plain one skipped the step on one rank only and let the ranks' scales drift apart."""
    if fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type, enabled=enabled)
    return torch.amp.GradScaler(device_type, enabled=enabled)


def summary_table(result: TrainResult) -> str:
    rows: list[list[object]] = [["steps", result.step], ["seconds", round(result.seconds, 1)]]
    rows.append(["clips/s", round(result.clips_per_s, 2)])
    rows.append(["skipped batches", result.skipped_batches])
    if result.data_skips is not None:
        rows.append(["training data", result.data_skips])
    if result.history:
        for name, value in result.history[-1].items():
            if name != "step":
                rows.append([f"final {name}", value])
    if result.best:
        for name, value in result.best.items():
            rows.append([f"best {name}", value])
    if result.last_checkpoint is not None:
        rows.append(["last checkpoint", str(result.last_checkpoint)])
    return format_table(["summary", "value"], rows)
