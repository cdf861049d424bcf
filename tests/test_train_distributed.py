"""2 gloo ranks (DDP, FSDP, compiled DDP) against 1 rank with the same global batch: the same
parameters after 3 steps; and an FSDP run resumed from its checkpoint against the straight run.

Uses the real tiny STOA model with the objectives that draw no random numbers (VTC with the
all-gather, DOTA, STASP), since MLM/VTM/PLM draws differ by construction between 1 and 2 ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _train_toys import RandomClips, one_thread, tiny_pretrainer

from stoa_vlp.config import load_config
from stoa_vlp.data.dataset import collate
from stoa_vlp.train import DistEnv, Trainer
from stoa_vlp.train import checkpointing as ckpt
from stoa_vlp.train.logging import read_metrics

STEPS = 3
GLOBAL_BATCH = 4
# FSDP's results differ from one rank's in the last bits (flat parameter buffers, reduce-scatter);
# Adam turns that into differences of up to 1.2e-5 on a few of the ~2.5e-3 updates (5 of 167 tensors)
TOLERANCE = {"ddp": 1e-5, "fsdp": 3e-5}


def overrides(batch_size: int, distributed: str = "ddp") -> list[str]:
    return [
        f"train.steps={STEPS}",
        "train.warmup_steps=1",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.eval_every={STEPS}",
        "train.device=cpu",
        f"train.distributed={distributed}",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "loss.vtm=0",
        "loss.mlm=0",
        "loss.plm=0",
        "train.find_unused_parameters=true",  # the fusion encoder gets no gradient without VTM/MLM/PLM
        "model.frames=2",
        "model.image_size=32",
        "model.text_len=12",
    ]


def weight_statistics(module) -> dict[str, float]:
    """An evaluator that sees every weight: under FSDP it runs on rank 0 inside summon_full_params."""
    parameters = list(module.model.parameters())
    return {"weight_sum": float(sum(p.double().sum() for p in parameters)),
            "weight_count": float(sum(p.numel() for p in parameters))}


def run_rank(rank: int, world_size: int, init_file: str, run_dir: str, distributed: str,
             extra: tuple[str, ...] = (), resume: str | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = load_config("tiny", [*overrides(GLOBAL_BATCH // world_size, distributed), *extra])
        trainer = Trainer(config, tiny_pretrainer(config), RandomClips(config), collate, run_dir,
                          env=DistEnv.current("cpu"), evaluate=weight_statistics)
        if distributed == "ddp":  # the constant pixel mean/std buffers are not broadcast before each forward
            assert list(trainer.wrapped.named_buffers()) and not trainer.wrapped.will_sync_module_buffers()
        trainer.fit(resume)
    finally:
        dist.destroy_process_group()


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.list_checkpoints(run_dir)[-1] / "model.safetensors")


@pytest.mark.parametrize("distributed, extra", [("ddp", ()), ("fsdp", ()), ("ddp", ("train.compile=true",))],
                         ids=["ddp", "fsdp", "ddp-compiled"])
def test_two_gloo_ranks_match_one_rank(tmp_path, distributed, extra):
    config = load_config("tiny", overrides(GLOBAL_BATCH))
    with one_thread():
        one = Trainer(config, tiny_pretrainer(config), RandomClips(config), collate, tmp_path / "one",
                      evaluate=weight_statistics).fit()
    run_args = (2, str(tmp_path / "init"), str(tmp_path / "two"), distributed, extra)
    mp.spawn(run_rank, args=run_args, nprocs=2, join=True)

    two_history = read_metrics(tmp_path / "two")
    assert [r["step"] for r in two_history if r["split"] == "train"][-1] == STEPS
    (validation,) = [r for r in two_history if r["split"] == "val"]  # rank 0 saw every full weight
    (reference,) = [r for r in read_metrics(tmp_path / "one") if r["split"] == "val"]
    assert validation["weight_count"] == reference["weight_count"]
    assert validation["weight_sum"] == pytest.approx(reference["weight_sum"], abs=1e-2)
    single, double = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    initial = tiny_pretrainer(config).model.state_dict()
    moved = 0
    for name in single:
        torch.testing.assert_close(double[name], single[name], atol=TOLERANCE[distributed], rtol=0, msg=name)
        moved += not torch.equal(single[name], initial[name])
    assert moved > 0.5 * len(single)  # the comparison is not between untouched weights
    assert one.history[-1]["loss"] > 0
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step_00000003").glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]


def test_unknown_strategy_is_refused_with_a_clear_error():
    from stoa_vlp.train.distributed import wrap_model

    two_cpu_ranks = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="ddp or fsdp"):
        wrap_model(torch.nn.Linear(2, 2), "zero", two_cpu_ranks)


def test_fsdp_resumes_exactly_from_its_sharded_checkpoint(tmp_path):
    """2 FSDP ranks: a run resumed from its step-2 checkpoint (model and optimizer state gathered to
    full state dicts, then re-sharded) ends with the straight run's weights."""
    extra = ("train.save_every=1",)
    mp.spawn(run_rank, args=(2, str(tmp_path / "init1"), str(tmp_path / "straight"), "fsdp", extra), nprocs=2)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    last = ckpt.list_checkpoints(tmp_path / "resumed")[-1]
    assert last.name == "step_00000003"
    shutil.rmtree(last)
    mp.spawn(run_rank, args=(2, str(tmp_path / "init2"), str(tmp_path / "resumed"), "fsdp", extra, "latest"), nprocs=2)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert ckpt.list_checkpoints(tmp_path / "resumed")[-1].name == "step_00000003"
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0, msg=name)


def fsdp_groups_on_rank(rank: int, world_size: int, init_file: str, report: str) -> None:
    import json

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = load_config("tiny", [*overrides(2, "fsdp"), "train.tower_lr_scale=0.1"])
        trainer = Trainer(config, tiny_pretrainer(config), RandomClips(config), collate,
                          Path(report).parent / "run", env=DistEnv.current("cpu"))
        names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in trainer.module.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups]
        if rank == 0:
            with open(report, "w") as handle:
                json.dump(groups, handle)
    finally:
        dist.destroy_process_group()


def test_fsdp_keeps_the_weight_decay_and_learning_rate_groups(tmp_path):
    """FSDP flattens parameter shapes; the groups (chosen by shape and name) are those of one rank."""
    import json

    report = tmp_path / "groups.json"
    mp.spawn(fsdp_groups_on_rank, args=(2, str(tmp_path / "init"), str(report)), nprocs=2, join=True)
    config = load_config("tiny", [*overrides(GLOBAL_BATCH), "train.tower_lr_scale=0.1"])
    single = Trainer(config, tiny_pretrainer(config), RandomClips(config), collate, tmp_path / "one")
    names = {id(p): n for n, p in single.module.named_parameters()}
    expected = [[names[id(p)] for p in g["params"]] for g in single.optimizer.param_groups]
    assert len(expected) == 4  # tower / new x decay / no decay
    assert json.loads(report.read_text()) == expected


def finetune_rank(rank: int, init_file: str, run_dir: str, task: str) -> None:
    from stoa_vlp.tasks.captioning import CaptioningModule
    from stoa_vlp.tasks.pipeline import task_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        settings = [*overrides(GLOBAL_BATCH // 2), "train.find_unused_parameters=false", "loss.vtm=1"]
        config = task_config(load_config("tiny", settings), task)
        model = tiny_pretrainer(config).model
        module = CaptioningModule(model) if task == "captioning" else tiny_pretrainer(config)
        Trainer(config, module, RandomClips(config), collate, run_dir, env=DistEnv.current("cpu")).fit()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("task", ["captioning", "retrieval"])
def test_two_gloo_ranks_fine_tune(tmp_path, task):
    """Fine-tuning modules leave parameters without gradient (DDP failed at the second step)."""
    mp.spawn(finetune_rank, args=(str(tmp_path / "init"), str(tmp_path / "run"), task), nprocs=2, join=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"][-1] == STEPS


class OverflowOnce(torch.nn.Module):
    """Linear(6, 1) whose first step's input feature 0 is so large that the fp16 weight gradient
    overflows in W[0, 0] only: on one FSDP rank's shard, the other rank's shard stays finite."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 1)
        self.steps = 0

    def forward(self, batch):
        self.steps += 1
        scale = torch.tensor([1000.0 if self.steps == 1 else 1.0, 0.1, 0.1, 0.1, 0.1, 0.1])
        return {"loss": 0.5 * self.net(batch.x * scale).float().mean()}


def fp16_overflow_rank(rank: int, init_file: str, run_dir: str, report: str) -> None:
    from _train_toys import ToyDataset
    from _train_toys import collate as toy_collate

    one_thread()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        config = load_config("tiny", ["train.steps=2", "train.warmup_steps=1", "train.progress=false",
                                      "train.tensorboard=false", "train.device=cpu", "train.distributed=fsdp",
                                      "train.precision=amp_fp16", "data.batch_size=2", "data.num_workers=0",
                                      "train.save_every=100", "train.clip_grad=0"])
        torch.manual_seed(0)
        trainer = Trainer(config, OverflowOnce(), ToyDataset(), toy_collate, run_dir, env=DistEnv.current("cpu"))
        before = [p.detach().clone() for p in trainer.module.parameters()]
        batches = trainer._micro_batches()
        trainer._train_step(batches)  # overflows on rank 0's shard only
        changed = sum(int((b != p.detach()).sum()) for b, p in zip(before, trainer.module.parameters()))
        scale = trainer.scaler.get_scale()
        trainer._train_step(batches)
        grads = [p.grad.tolist() for p in trainer.module.parameters() if p.grad is not None]  # this rank's shard
        torch.save({"changed": changed, "scale": scale, "grads": grads}, f"{report}.{rank}")
        dist.barrier()  # no rank tears the group down while the other still works in it
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown: about one run in 25 aborted there ("terminate called without an
    # active exception", torch 2.14, gloo on the CPU), after both reports were written
    os._exit(0)


def test_an_fp16_overflow_in_one_fsdp_shard_skips_the_step_on_every_rank(tmp_path):
    """A plain GradScaler sees only its rank's shard: rank 0 skipped the step and halved its scale while
    rank 1 stepped and kept its own, and the next gradients were averaged over differently scaled losses."""
    report = str(tmp_path / "report")
    mp.spawn(fp16_overflow_rank, args=(str(tmp_path / "init"), str(tmp_path / "run"), report), nprocs=2, join=True)
    ranks = [torch.load(f"{report}.{rank}") for rank in range(2)]
    assert [r["changed"] for r in ranks] == [0, 0]  # no parameter moved on any rank
    assert ranks[0]["scale"] == ranks[1]["scale"] == 2.0**15  # both halved the initial 2 ** 16
    assert ranks[1]["grads"][-1] == [0.5]  # the bias, in rank 1's shard: d(0.5 * mean(w.x + b)) / db, exactly


def test_asking_for_a_missing_cuda_device_is_bad_input(monkeypatch):
    from stoa_vlp.cli import bad_input_errors
    from stoa_vlp.train.distributed import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(bad_input_errors(), match="train.device=cuda but no CUDA device is available"):
        choose_device("cuda", 0)
    assert choose_device("auto", 0) == torch.device("cpu")
