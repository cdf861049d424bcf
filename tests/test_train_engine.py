"""The training engine on a toy task: schedule, data order, checkpoints, resume, failure policies."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import traceback

import numpy as np
import pytest
import torch
from _train_toys import ToyDataset, ToyModel, collate

from stoa_vlp.cli import bad_input_errors
from stoa_vlp.config import load_config
from stoa_vlp.data.skips import SkipCounter
from stoa_vlp.train import NonFiniteLossError, Trainer
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
from stoa_vlp.train.logging import MetricsLogger, read_metrics
from stoa_vlp.train.loop import summary_table
from stoa_vlp.train.optim import warmup_cosine


def toy_config(*overrides: str):
    return load_config(
        "tiny",
        [
            "train.steps=6",
            "train.warmup_steps=2",
            "train.lr=0.01",
            "train.save_every=3",
            "train.log_every=1",
            "train.progress=false",
            "train.tensorboard=false",
            "data.batch_size=4",
            "data.num_workers=0",
            *overrides,
        ],
    )


def toy_trainer(config, run_dir, model=None, dataset=None, evaluate=None) -> Trainer:
    torch.manual_seed(config.train.seed)
    return Trainer(config, model or ToyModel(), dataset or ToyDataset(), collate, run_dir, evaluate=evaluate)


def test_warmup_cosine_hand_values():
    assert warmup_cosine(0, 4, 14, 0.0) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 14, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 14, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(9, 4, 14, 0.0) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1)


def test_scheduler_drives_every_group(tmp_path):
    trainer = toy_trainer(toy_config("train.steps=4", "train.warmup_steps=2"), tmp_path / "run")
    seen = []
    for _ in range(4):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    expected = [0.01 * warmup_cosine(step, 2, 4, 0.0) for step in range(4)]
    assert seen == pytest.approx(expected)


def test_two_rank_blocks_concatenate_to_the_one_rank_batches():
    one = list(ResumableSampler(20, 4, rank=0, world_size=1, seed=3))
    rank0 = list(ResumableSampler(20, 2, rank=0, world_size=2, seed=3))
    rank1 = list(ResumableSampler(20, 2, rank=1, world_size=2, seed=3))
    merged = []
    for batch in range(5):
        merged += rank0[2 * batch : 2 * batch + 2] + rank1[2 * batch : 2 * batch + 2]
    assert merged == one
    assert sorted(index for index, _ in one) == list(range(20))


def test_sampler_resumes_mid_epoch_and_reshuffles_next_epoch():
    sampler = ResumableSampler(10, 3, rank=0, world_size=1, seed=0)  # 3 batches, one sample dropped
    full = list(sampler)
    sampler.set_position(0, 2)
    assert list(sampler) == full[6:]
    sampler.set_position(1, 0)
    assert [i for i, _ in sampler] != [i for i, _ in full]


def test_seeded_dataset_repeats_samples_and_keeps_caller_rng():
    dataset = SeededDataset(ToyDataset())
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = dataset[(3, 77)][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(dataset[(3, 77)][0], first)
    assert not torch.equal(dataset[(3, 78)][0], first)


def test_a_rank_seed_from_any_step_is_a_seed_numpy_takes():
    # a resumed rank of a run from before the per-rank seeding reseeds from its step: the seed plus the step
    # went past numpy's 2**32 - 1 for large seeds; the step is now mixed in by derive_seed
    seed = max(range(20000), key=lambda candidate: rank_seed(candidate, 1))
    assert rank_seed(seed, 1) + 10**6 > 2**32 - 1  # the old sum at step 10**6 was no seed numpy takes
    seed_everything(rank_seed(seed, 1, 10**6))
    assert rank_seed(seed, 1, 10**6) != rank_seed(seed, 1) == rank_seed(seed, 1, 0)


def test_worker_seeds_differ_by_seed_rank_epoch_and_worker():
    grid = [(seed, rank, epoch, worker) for seed in (0, 1) for rank in (0, 1) for epoch in (0, 1) for worker in (0, 1)]
    assert len({worker_seed(*key) for key in grid}) == len(grid)
    assert len({loader_seed(seed, rank, epoch) for seed, rank, epoch, _ in grid}) == len(grid) // 2
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        WorkerSeeder(seed=3, rank=1, epoch=2)(1)  # DataLoader worker 1 of rank 1 in epoch 2
        expected = worker_seed(3, 1, 2, 1)
        assert torch.initial_seed() == expected
        assert np.random.random() == np.random.RandomState(expected).random_sample()
        assert random.random() == random.Random(expected).random()
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def test_seeding_a_sample_leaves_the_gpu_generators_alone(monkeypatch):
    """torch.manual_seed also reseeds every GPU, which fork_rng(devices=[]) does not restore: with
    data.num_workers=0 each sample reset the training's GPU random state."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    SeededDataset(ToyDataset())[(3, 77)]
    assert reseeded == []


def test_a_checkpoint_keeps_the_random_state_of_its_own_gpu_only(monkeypatch):
    """Saving every visible GPU's state and restoring them all failed on a machine with fewer GPUs."""
    states = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    saved = ckpt.rng_state()
    assert torch.equal(saved["cuda"], states[1])
    ckpt.set_rng_state(saved)
    ckpt.set_rng_state({**saved, "cuda": [states[0], states[1]]})  # a checkpoint from before 2026-11-27
    ckpt.set_rng_state({**saved, "cuda": [states[0]]})  # ... saved where this device did not exist
    assert [state.tolist() for state in restored] == [[2], [2]]


def test_kill_and_resume_matches_straight_run(tmp_path):
    straight = toy_trainer(toy_config(), tmp_path / "straight").fit()

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dying_collate(samples):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th step's batch: the run dies after logging step 4, checkpoint at 3
            raise Killed
        return collate(samples)

    torch.manual_seed(0)
    first = Trainer(toy_config(), ToyModel(), ToyDataset(), dying_collate, tmp_path / "killed")
    with pytest.raises(Killed):
        first.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "killed")] == ["step_00000003"]
    resumed_trainer = toy_trainer(toy_config(), tmp_path / "killed")
    torch.manual_seed(99)  # resume must not depend on the RNG state of the new process
    resumed = resumed_trainer.fit(resume="latest")
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5, 6]  # step 4 redone, once
    for a, b in zip(straight.history[3:], resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for a, b in zip(straight_params(tmp_path / "straight"), straight_params(tmp_path / "killed")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def straight_params(run_dir):
    return list(ckpt.load_weights(ckpt.list_checkpoints(run_dir)[-1] / "model.safetensors").values())


def test_grad_accumulation_equals_the_large_batch(tmp_path):
    big = toy_trainer(toy_config("data.batch_size=8", "train.steps=2"), tmp_path / "big")
    small = toy_trainer(toy_config("data.batch_size=4", "train.grad_accum=2", "train.steps=2"), tmp_path / "small")
    big.module.net[2].p = small.module.net[2].p = 0.0  # no dropout: RNG streams differ by construction
    big_result, small_result = big.fit(), small.fit()
    # the accumulated micro-batches are the big batch's two halves only if the orders agree
    order_big = [i for i, _ in ResumableSampler(32, 8, 0, 1, 0)]
    order_small = [i for i, _ in ResumableSampler(32, 4, 0, 1, 0)]
    assert order_big == order_small
    for a, b in zip(big.module.parameters(), small.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # AdamW's update barely changes with the gradient's scale: the logged norm (before clipping) shows
    # that the accumulated gradient is the big batch's mean, not the sum of the micro-batches' means
    for big_step, small_step in zip(big_result.history, small_result.history, strict=True):
        assert small_step["grad_norm"] == pytest.approx(big_step["grad_norm"], rel=1e-5)
        assert small_step["loss"] == pytest.approx(big_step["loss"], rel=1e-5)


def first_step_gradient(config, run_dir) -> tuple[float, torch.Tensor]:
    """(logged grad_norm, the flattened gradient the optimiser steps with) of a toy run's first step."""
    trainer = toy_trainer(config, run_dir)
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(torch.cat([p.grad.flatten() for p in trainer.module.parameters()]))
    )
    result = trainer.fit()
    return result.history[0]["grad_norm"], seen[0]


def test_clipping_scales_the_gradient_to_clip_grad_and_logs_the_norm_before(tmp_path):
    norm, gradient = first_step_gradient(toy_config("train.steps=1", "train.clip_grad=0"), tmp_path / "free")
    assert norm == pytest.approx(gradient.norm().item(), rel=1e-5) and norm > 0
    for clip_grad in (norm / 4, 4 * norm):
        logged, clipped = first_step_gradient(toy_config("train.steps=1", f"train.clip_grad={clip_grad}"),
                                              tmp_path / f"clip{clip_grad}")
        assert logged == pytest.approx(norm, rel=1e-5)  # the same first step, logged before clipping
        expected = gradient * min(1.0, clip_grad / norm)  # scaled down to norm clip_grad, never up
        torch.testing.assert_close(clipped, expected, atol=1e-7, rtol=1e-5)


def test_interrupted_checkpoint_write_leaves_last_good_one(tmp_path, monkeypatch):
    trainer = toy_trainer(toy_config("train.steps=3", "train.save_every=1", "train.keep_last=5"), tmp_path / "run")
    real_rename = os.rename

    def killed_before_rename(source, target):
        if str(target).endswith(ckpt.checkpoint_name(3)):
            raise KeyboardInterrupt  # the process dies between the write and the rename
        real_rename(source, target)

    monkeypatch.setattr(ckpt.os, "rename", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    run = tmp_path / "run"
    assert (run / "checkpoints" / ".tmp-step_00000003" / "model.safetensors").exists()
    latest = ckpt.resolve_resume("latest", run)
    assert latest.name == "step_00000002"
    again = toy_trainer(toy_config("train.steps=3", "train.save_every=1"), run)
    result = again.fit(resume="latest")
    assert [h["step"] for h in result.history] == [3]
    assert not (run / "checkpoints" / ".tmp-step_00000003").exists()


def fit_with_scores(run_dir, scores: list[float], *overrides: str):
    """A toy run of len(scores) steps validated at every step, the evaluator returning `scores` in turn."""
    given = iter(scores)
    config = toy_config(f"train.steps={len(scores)}", "train.eval_every=1", "train.best_metric=val/score", *overrides)
    return toy_trainer(config, run_dir, evaluate=lambda module: {"score": next(given)}).fit()


def test_keep_last_and_best_survive_pruning(tmp_path):
    result = fit_with_scores(tmp_path / "run", [0.5, 0.9, 0.1, 0.2, 0.3], "train.save_every=1", "train.keep_last=2")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    assert ckpt.best_checkpoint(tmp_path / "run").name == "step_00000002"
    assert result.best == {"step": 2, "val/score": 0.9}
    val = [r for r in read_metrics(tmp_path / "run") if r["split"] == "val"]
    assert [r["score"] for r in val] == [0.5, 0.9, 0.1, 0.2, 0.3]


def test_a_best_metric_that_validation_lacks_is_named(tmp_path, caplog):
    result = fit_with_scores(tmp_path / "run", [0.5, 0.9], "train.best_metric=val/t2v_rerank_r1")
    assert result.best is None and ckpt.best_checkpoint(tmp_path / "run") is None
    assert caplog.text.count("train.best_metric val/t2v_rerank_r1 is not among the validation metrics (val/score)") == 1


def test_a_best_validation_between_saves_is_saved(tmp_path):
    result = fit_with_scores(tmp_path / "run", [0.5, 0.3, 0.9, 0.1, 0.2, 0.4], "train.save_every=2", "train.keep_last=5")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_00000001", "step_00000002", "step_00000003", "step_00000004", "step_00000006"]
    assert ckpt.best_checkpoint(tmp_path / "run").name == "step_00000003" and result.best["step"] == 3


def test_a_step_is_read_after_the_next_step_is_queued(tmp_path, monkeypatch):
    """The host reads a step's losses, gradient norm and non-finite flags in one transfer, after it has
    queued the next step's forward and backward, so the device never waits for the host between steps.
    Only a step that a checkpoint (here every 3rd) or the end follows is read before the next is queued.
    Before, the host read the losses after each backward and the gradient norm before each update: it
    waited for the device twice per step, and the device then idled until the host queued more work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from stoa_vlp.train.loop import QueuedStep

    events = []

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # not the DataLoader's seed for each epoch's iterator, drawn from a generator on the host
            loader = any("torch/utils/data" in frame.filename for frame in traceback.extract_stack())
            if func is torch.ops.aten._local_scalar_dense.default and not loader:
                events.append("scalar read")
            return func(*args, **(kwargs or {}))

    backward, read = torch.Tensor.backward, QueuedStep.read
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: (events.append("backward"), backward(*a, **k))[1])
    monkeypatch.setattr(QueuedStep, "read", lambda queued: (events.append("read"), read(queued))[1])
    trainer = toy_trainer(toy_config("train.steps=6", "train.save_every=3"), tmp_path / "run")
    with ScalarReads():
        result = trainer.fit()
    assert result.step == 6
    steps = " ".join(events).replace("backward", "B").replace("read", "R")
    assert steps == "B B R B R R B B R B R R", steps  # steps 1-6: 3 and 6 are read at once, the others late


def test_on_cuda_a_batch_is_copied_on_its_own_stream_and_waited_for(tmp_path, monkeypatch):
    """The order of the side-stream copy, with CUDA's stream calls stood in for (no GPU here): the copy
    is queued on the copy stream, then the step's stream waits for it (its forward must not read a
    batch still being copied) and the batch's tensors are recorded there."""
    import contextlib

    from _objectives_batch import make_batch, tiny_config

    from stoa_vlp.batch import Batch
    from stoa_vlp.train import loop

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    current = [Stream("step")]

    @contextlib.contextmanager
    def on_stream(stream):
        events.append(f"enter {stream.name}")
        current.append(stream)
        yield
        current.pop()
        events.append(f"leave {stream.name}")

    class StreamBatch(Batch):
        def to(self, device, non_blocking=False):
            events.append(f"copy on {current[-1].name}" + (", not blocking" if non_blocking else ""))
            return self

        def record_stream(self, stream):
            events.append(f"recorded on {stream.name}")

    monkeypatch.setattr(loop.torch.cuda, "stream", on_stream)
    monkeypatch.setattr(loop.torch.cuda, "current_stream", lambda device: current[-1])
    trainer = toy_trainer(toy_config(), tmp_path / "run")
    trainer.copy_stream = Stream("copy")
    batch = make_batch(tiny_config())
    moved = trainer._to_device(StreamBatch(**batch.tensors(), video_ids=batch.video_ids))
    assert isinstance(moved, StreamBatch)
    assert events == ["enter copy", "copy on copy, not blocking", "leave copy", "step waits for copy", "recorded on step"]


def test_a_skipped_update_leaves_weights_moments_and_step_count(tmp_path):
    """The update is skipped on the device: the fused kernels take the non-finite flag as they take a
    GradScaler's; the other kernels read it first."""
    for fused in (True, False):
        trainer = toy_trainer(toy_config(), tmp_path / f"run{fused}")
        trainer.optimizer = torch.optim.AdamW(trainer.module.parameters(), lr=0.1, fused=fused, foreach=not fused or None)
        parameters = list(trainer.module.parameters())
        for p in parameters:
            p.grad = torch.ones_like(p)
        trainer._update_unless(torch.tensor([False]))
        taken = [p.detach().clone() for p in parameters]
        state = {id(p): {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in parameters}
        assert all(int(s["step"]) == 1 for s in state.values())
        trainer._update_unless(torch.tensor([True]))
        for p, before in zip(parameters, taken):
            assert torch.equal(p.detach(), before)
            for name, value in trainer.optimizer.state[p].items():
                assert torch.equal(value, state[id(p)][name]), (fused, name)
        trainer._update_unless(torch.tensor([False]))
        assert all(int(trainer.optimizer.state[p]["step"]) == 2 for p in parameters)
        assert not any(torch.equal(p.detach(), before) for p, before in zip(parameters, taken))


def batch_ids(config, tmp_path, index: int) -> set[str]:
    """The video ids of the `index`-th batch a toy run of `config` draws."""
    batches = toy_trainer(config, tmp_path / "ids")._micro_batches()
    for _ in range(index):
        next(batches)
    return set(next(batches).video_ids)


def test_a_skipped_step_leaves_the_schedule_where_it_was(tmp_path):
    """The second batch is skipped; the step taken on the third batch is step 2 and gets step 2's
    learning rate, though its update was queued before the host had read that the second was skipped."""
    config = toy_config("train.nonfinite=skip", "train.steps=4", "train.warmup_steps=3", "train.save_every=100")
    model = ToyModel()
    model.poison = batch_ids(config, tmp_path, 1)
    trainer = toy_trainer(config, tmp_path / "run", model=model)
    result = trainer.fit()
    assert result.skipped_batches == 1
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    expected = [0.01 * warmup_cosine(step, 3, 4, config.train.min_lr_scale) for step in range(4)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected, rel=1e-12)
    assert int(trainer.optimizer.state[next(trainer.module.parameters())]["step"]) == 4


class NaNLossFiniteGradient(ToyModel):
    """For the clips in `poison`, a NaN loss whose gradient is finite (a NaN constant added)."""

    def forward(self, batch):
        error = (self.net(batch.x).squeeze(-1) - batch.y) ** 2
        loss = error.mean() + (float("nan") if self.poison & set(batch.video_ids) else 0.0)
        return {"loss": loss, "mse": loss.detach()}


def test_a_non_finite_step_stops_with_the_weights_of_the_step_before(tmp_path):
    """With train.nonfinite=stop, the error comes while the next step is queued; no update after the
    last good step reaches the weights, even where the NaN loss has a finite gradient, and only the
    micro-batch with the NaN loss is blamed."""
    config = toy_config("train.grad_accum=2", "train.save_every=100", "train.steps=6")
    poisoned, one_step = NaNLossFiniteGradient(), ToyModel()
    one_step.load_state_dict(poisoned.state_dict())
    poisoned.poison = batch_ids(config, tmp_path, 3)  # the second micro-batch of step 2
    with pytest.raises(NonFiniteLossError) as raised:
        toy_trainer(config, tmp_path / "stopped", model=poisoned).fit()
    assert raised.value.step == 2 and set(raised.value.video_ids) == poisoned.poison
    toy_trainer(toy_config("train.grad_accum=2", "train.steps=1"), tmp_path / "one", model=one_step).fit()
    for a, b in zip(poisoned.parameters(), one_step.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_stop_names_step_and_videos(tmp_path):
    model = ToyModel()
    model.poison = {f"video{i}" for i in range(32)}
    trainer = toy_trainer(toy_config(), tmp_path / "run", model=model)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit()
    assert raised.value.step == 1
    assert len(raised.value.video_ids) == 4 and all(v.startswith("video") for v in raised.value.video_ids)
    assert "step 1" in str(raised.value)


def test_nonfinite_skip_counts_and_leaves_weights_finite(tmp_path):
    model = ToyModel()
    poisoned = {"video0", "video1"}
    model.poison = poisoned
    trainer = toy_trainer(toy_config("train.nonfinite=skip", "train.steps=8"), tmp_path / "run", model=model)
    result = trainer.fit()
    assert result.step == 8
    assert result.skipped_batches >= 1
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    assert all(math.isfinite(h["loss"]) for h in result.history)
    last = read_metrics(tmp_path / "run")[-1]
    assert last["skipped_batches"] == result.skipped_batches


class GradientPoison(ToyModel):
    """A finite loss whose gradient is NaN for the clips in `poison_gradient` (0 x d sqrt(u)/du at u = 0),
    as a backward that overflows gives."""

    poison_gradient: set[str] = set()

    def forward(self, batch):
        outputs = super().forward(batch)
        if self.poison_gradient & set(batch.video_ids):
            weight = self.net[0].weight.sum()
            outputs["loss"] = outputs["loss"] + 0.0 * torch.sqrt(weight - weight.detach())
        return outputs


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_a_non_finite_gradient_is_caught_before_it_reaches_the_weights(tmp_path, precision):
    model = GradientPoison()
    model.poison_gradient = {"video5"}
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step") as raised:
        toy_trainer(toy_config(f"train.precision={precision}", "train.clip_grad=0"), tmp_path / "stop", model=model).fit()
    assert "video5" in raised.value.video_ids  # the step's own clips, not the next step's
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model = GradientPoison()
    model.poison_gradient = {"video5"}
    trainer = toy_trainer(toy_config(f"train.precision={precision}", "train.nonfinite=skip", "train.steps=8"),
                          tmp_path / "skip", model=model)
    result = trainer.fit()
    assert result.step == 8 and result.skipped_batches >= 1
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())


def test_skipping_gives_up_when_every_step_is_skipped(tmp_path):
    model = GradientPoison()
    model.poison_gradient = {f"video{i}" for i in range(32)}  # a diverged model: every batch
    with pytest.raises(NonFiniteLossError, match="50 steps in a row were skipped: the model itself has diverged"):
        toy_trainer(toy_config("train.nonfinite=skip"), tmp_path / "run", model=model).fit()


def test_a_stream_without_a_batch_for_this_rank_is_an_error_not_a_hang(tmp_path):
    class EmptyStream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    torch.manual_seed(0)
    trainer = Trainer(toy_config(), ToyModel(), EmptyStream(), collate, tmp_path / "run")
    with pytest.raises(ValueError, match="rank 0: the training data gave no batch of 4 in epoch 0"):
        trainer.fit()


def test_finished_run_is_not_overwritten_without_flag(tmp_path):
    run = tmp_path / "run"
    toy_trainer(toy_config("train.steps=1"), run).fit()
    with pytest.raises(ckpt.CheckpointError, match="finished run"):
        ckpt.prepare_run_dir(run, overwrite=False, resume=False)
    ckpt.prepare_run_dir(run, overwrite=True, resume=False)
    assert not run.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="refusing"):
        ckpt.prepare_run_dir(foreign, overwrite=True, resume=False)


def test_tied_weights_round_trip(tmp_path):
    shared = torch.randn(5, 3)
    state = {"a.weight": shared, "b.weight": shared, "c": torch.arange(4.0)}
    ckpt.save_weights(state, tmp_path / "w.safetensors")
    loaded = ckpt.load_weights(tmp_path / "w.safetensors")
    assert set(loaded) == set(state)
    assert torch.equal(loaded["b.weight"], shared) and torch.equal(loaded["c"], state["c"])


def test_a_steps_throughput_leaves_out_validation_and_checkpoints(tmp_path):
    """Each step's clips/s counts the time from when the host began to queue it to when it began to
    queue the next (or, for a step read at once, to its read): validation and checkpoints in between
    are not the step's. Before, the step after a validation was charged with it."""
    import time

    def slow_validation(module):
        time.sleep(0.5)
        return {"t2v_r1": 1.0}

    result = toy_trainer(toy_config("train.steps=6", "train.eval_every=2", "train.save_every=3"), tmp_path / "run",
                         evaluate=slow_validation).fit()
    seconds = [4 / step["clips_per_s"] for step in result.history]  # 4 clips per step
    assert len(seconds) == 6 and max(seconds) < 0.25, seconds


def test_metrics_file_and_state_json(tmp_path):
    toy_trainer(toy_config("train.steps=3", "train.tensorboard=true"), tmp_path / "run").fit()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "mse", "lr", "grad_norm", "clips_per_s"} <= set(records[0])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["step"] == 3 and state["epoch"] == 0 and state["data_position"] == 3
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


class ToyStream(torch.utils.data.IterableDataset):
    """An endless stream (like WebDataset shards in training)."""

    def __iter__(self):
        base = ToyDataset()
        index = 0
        while True:
            yield base[index % len(base)]
            index += 1


class PositionedToyStream(ToyStream):
    """A stream that records the positions the trainer seeds it from (as WebDatasetShards does)."""

    def __init__(self):
        self.positions = []

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.positions.append((epoch, start_batch))


def test_streamed_dataset_trains_counts_its_position_and_resumes_from_it(tmp_path, caplog):
    config = toy_config("train.steps=3", "train.grad_accum=2")
    first = PositionedToyStream()
    trainer = toy_trainer(config, tmp_path / "run", dataset=first)
    result = trainer.fit()
    assert result.step == 3 and trainer.sampler.start_batch == 6 and first.positions == [(0, 0)]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["data_position"] == 6
    again = PositionedToyStream()
    resumed = toy_trainer(toy_config("train.steps=5", "train.grad_accum=2"), tmp_path / "run", dataset=again)
    with caplog.at_level(logging.WARNING, logger="stoa_vlp.train.loop"):
        assert resumed.fit(resume="latest").step == 5
    assert again.positions == [(0, 6)] and resumed.sampler.start_batch == 10
    assert "resumed stream is seeded from batch 6" in caplog.text


class SkippingToyDataset(ToyDataset):
    """Counts every load in a SkipCounter, every third one as a skipped bad video (as the video
    dataset does when it replaces a sample it could not decode)."""

    def __init__(self):
        super().__init__()
        self.skips = SkipCounter(max_share=1.0, min_seen=1)
        self.loads = 0

    def __getitem__(self, index: int):
        self.loads += 1
        self.skips.seen()
        if self.loads % 3 == 0:
            self.skips.skip("bad_video", f"video{index}: toy decoding error")
        return super().__getitem__(index)


def test_data_skip_summary_is_logged_and_in_the_final_table(tmp_path, caplog):
    dataset = SkippingToyDataset()
    with caplog.at_level(logging.INFO, logger="stoa_vlp.train.loop"):
        result = toy_trainer(toy_config("train.steps=3"), tmp_path / "run", dataset=dataset).fit()
    expected = "skipped 4 of 12 samples loaded (33.33%): bad_video 4"  # 3 steps x 4 clips, every third skipped
    assert dataset.skips.summary() == expected and result.data_skips == expected
    assert f"training data: {expected}" in caplog.text
    assert any("training data" in line and expected in line for line in summary_table(result).splitlines())
    assert toy_trainer(toy_config("train.steps=1"), tmp_path / "plain").fit().data_skips is None


def test_worker_count_does_not_change_the_run(tmp_path):
    in_process = toy_trainer(toy_config("train.steps=3", "data.num_workers=0"), tmp_path / "w0").fit()
    two_workers = toy_trainer(toy_config("train.steps=3", "data.num_workers=2"), tmp_path / "w2").fit()
    assert [h["loss"] for h in two_workers.history] == pytest.approx([h["loss"] for h in in_process.history], abs=1e-7)


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_trains_and_checkpoints_the_scaler(tmp_path, precision):
    trainer = toy_trainer(toy_config("train.steps=2", f"train.precision={precision}"), tmp_path / "run")
    result = trainer.fit()
    assert all(math.isfinite(h["loss"]) for h in result.history)
    scaler = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002" / "training_state.pt",
                        weights_only=False)["scaler"]
    if precision == "amp_fp16":
        assert trainer.scaler.is_enabled() and scaler["scale"] > 0  # GradScaler state travels with the checkpoint
    else:
        assert not trainer.scaler.is_enabled()


def test_validation_runs_in_float32_whatever_the_training_precision(tmp_path):
    """Under bf16 autocast, retrieval scores rounded into ties that count against the model, so the
    checkpoint was chosen on numbers lower than `evaluate` then reported for it."""
    seen = []

    def evaluate(module):
        seen.append(torch.is_autocast_enabled("cpu"))
        return {"score": 1.0}

    config = toy_config("train.steps=2", "train.precision=amp_bf16", "train.eval_every=1", "train.best_metric=score")
    toy_trainer(config, tmp_path / "run", evaluate=evaluate).fit()
    assert seen == [False, False]


def test_bad_train_settings_are_named():
    with pytest.raises(ValueError, match="train.precision"):
        toy_trainer(toy_config("train.precision=fp8"), "unused")
    with pytest.raises(ValueError, match="train.nonfinite"):
        toy_trainer(toy_config("train.nonfinite=ignore"), "unused")
    zeros = ["train.eval_every=0", "train.keep_last=0", "train.log_every=-1"]
    with pytest.raises(ValueError, match=r"train.log_every must be at least 1, got -1; train.eval_every must be "
                                         r"at least 1, got 0 \(the last step always validates .*; train.keep_last"):
        toy_trainer(toy_config(*zeros), "unused")


def test_a_batch_larger_than_the_training_set_names_data_batch_size():
    from stoa_vlp.train.data_position import ResumableSampler

    with pytest.raises(ValueError, match=r"fewer than one global batch \(data.batch_size=4 per rank x 1 ranks\)"):
        ResumableSampler(3, 4, 0, 1, 0)


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_an_fp16_gradient_overflow_is_a_counted_skip_under_either_policy(tmp_path, nonfinite):
    """The GradScaler skips a step whose gradient overflows (calibrating its scale): it used to count as
    taken, so nothing was counted and a run whose gradients were always NaN finished with unchanged weights."""
    model = GradientPoison()
    model.poison_gradient = {"video5"}
    config = toy_config("train.precision=amp_fp16", f"train.nonfinite={nonfinite}", "train.steps=8",
                        "train.clip_grad=0")
    result = toy_trainer(config, tmp_path / "run", model=model).fit()
    assert result.step == 8 and result.skipped_batches >= 1
    assert read_metrics(tmp_path / "run")[-1]["skipped_batches"] == result.skipped_batches


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_fp16_gradients_that_stay_non_finite_stop_the_run(tmp_path, nonfinite):
    model = GradientPoison()
    model.poison_gradient = {f"video{i}" for i in range(32)}
    before = [p.detach().clone() for p in model.parameters()]
    config = toy_config("train.precision=amp_fp16", f"train.nonfinite={nonfinite}", "train.steps=60",
                        "train.clip_grad=0", "train.save_every=100")
    with pytest.raises(NonFiniteLossError, match="50 steps in a row were skipped"):
        toy_trainer(config, tmp_path / "run", model=model).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def strict_json(path):
    """The JSON in `path`, which must be strict (no NaN or Infinity, which Python's json writes)."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_non_finite_validation_is_never_best(tmp_path):
    """A NaN at the first validation stayed best for good (nothing compares above NaN): the best checkpoint
    was its, a better one was pruned, and finished.json held NaN."""
    run = tmp_path / "run"
    given = iter([{"score": math.nan, "other": 1.0}, {"score": 0.5, "other": 1.0},
                  {"score": 0.9, "other": math.inf}, {"score": 0.7, "other": 1.0}])
    config = toy_config("train.steps=4", "train.eval_every=1", "train.best_metric=val/score",
                        "train.save_every=100", "train.keep_last=1")
    result = toy_trainer(config, run, evaluate=lambda module: next(given)).fit()
    assert result.best["step"] == 3 and ckpt.best_checkpoint(run).name == "step_00000003"
    assert strict_json(run / "finished.json")["best"] == {"step": 3, "val/score": 0.9, "val/other": None}
    for folder in ckpt.list_checkpoints(run):
        strict_json(folder / "state.json")


def test_a_nan_best_from_an_older_checkpoint_is_beaten_by_any_finite_value(tmp_path):
    trainer = toy_trainer(toy_config("train.best_metric=val/score"), tmp_path / "run")
    trainer.best_value = math.nan
    assert not trainer._is_best({"val/score": math.nan}) and trainer._is_best({"val/score": -1.0})
    assert trainer.best_value == -1.0


def test_a_metrics_file_cut_short_at_its_last_line_still_resumes(tmp_path, caplog):
    """A kill or a full disk while a record was appended left half a line, and resume failed on it with
    a JSONDecodeError that named no file."""
    run = tmp_path / "run"
    toy_trainer(toy_config(), run).fit()
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    result = toy_trainer(toy_config(), run).fit(resume=str(run / "checkpoints" / "step_00000003"))
    assert result.step == 6 and [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert f"{metrics}: its last line is cut short" in caplog.text


def test_a_metrics_line_that_is_not_json_before_the_last_is_named(tmp_path):
    run = tmp_path / "run"
    toy_trainer(toy_config(), run).fit()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:1] + ["{broken\n"] + lines[2:]))
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        toy_trainer(toy_config(), run).fit(resume="latest")


def test_metrics_file_is_strict_json(tmp_path):
    fit_with_scores(tmp_path / "run", [math.nan, 0.5])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant}: {line}")) for line in lines]
    assert [r["score"] for r in records if r["split"] == "val"] == [None, 0.5]


def test_a_resume_rewrites_the_metrics_file_atomically(tmp_path):
    """A full disk while a resume rewrote metrics.jsonl used to leave it truncated."""
    run = tmp_path / "run"
    toy_trainer(toy_config(), run).fit()
    before = (run / "metrics.jsonl").read_text()
    with file_size_limit(100), pytest.raises(OSError):
        MetricsLogger(run, tensorboard=False, resumed_step=3)
    assert (run / "metrics.jsonl").read_text() == before


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes beyond `size` bytes of a file fail (EFBIG), as they would on a full disk."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_that_cannot_be_written_is_an_error_naming_its_folder(tmp_path, monkeypatch):
    """torch.save on a full disk raised "RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos 64 vs 0", naming no file, which the command line showed as a traceback."""
    trainer = toy_trainer(toy_config("train.steps=1"), tmp_path / "run")
    write = ckpt.write_checkpoint_files

    def on_a_full_disk(*args):
        with file_size_limit(500):
            write(*args)

    monkeypatch.setattr(ckpt, "write_checkpoint_files", on_a_full_disk)
    with pytest.raises(OSError, match=r"\.tmp-step_00000001: writing the checkpoint failed .*disk full") as raised:
        trainer.fit()
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert isinstance(raised.value, bad_input_errors()) and "\n" not in str(raised.value)  # one line on the CLI


def test_a_state_file_that_cannot_be_written_is_an_error_naming_it(tmp_path, monkeypatch):
    """A checkpoint's state.json, written last, goes through a temporary file; a write that failed there
    on a full disk raised "[Errno 27] File too large", naming no file, with a traceback."""
    trainer = toy_trainer(toy_config("train.steps=1"), tmp_path / "run")
    write = ckpt.write_json_atomic

    def on_a_full_disk(path, values, **options):
        with file_size_limit(100 if path.name == "state.json" else 1 << 30):
            write(path, values, **options)

    monkeypatch.setattr(ckpt, "write_json_atomic", on_a_full_disk)
    folder, state = r"\.tmp-step_00000001", r"\.tmp-step_00000001/state\.json"
    with pytest.raises(OSError, match=rf"{folder}: writing the checkpoint failed \(\[Errno \d+\] .*{state}: writing "
                                      r"failed \(File too large\)\); is the disk full\? .*--resume latest$") as raised:
        trainer.fit()
    assert isinstance(raised.value.__cause__, OSError) and "\n" not in str(raised.value)
    assert list((tmp_path / "run").rglob("*.tmp")) == []  # the temporary file is removed


def test_the_history_keeps_the_first_and_the_last_steps_only(tmp_path, monkeypatch):
    """It kept a dict per step: about 1 GB after a million steps."""
    from stoa_vlp.train import loop

    monkeypatch.setattr(loop, "HISTORY_STEPS", 3, raising=False)
    result = toy_trainer(toy_config("train.steps=7"), tmp_path / "run").fit()
    assert [h["step"] for h in result.history] == [1, 5, 6, 7]
    assert summary_table(result).count("final loss") == 1
