"""Resuming with a changed config, from an older checkpoint, or after a kill at an awkward moment: the
schedule, optimiser settings and data position follow the resumed run's config; the best record, the
bad-sample counts and best.json survive; the abandoned checkpoints are set aside, not pruned in their place."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _train_toys import ToyDataset, ToyModel, collate

from stoa_vlp.config import load_config
from stoa_vlp.data.skips import SkipCounter
from stoa_vlp.train import Trainer
from stoa_vlp.train import checkpointing as ckpt
from stoa_vlp.train.data_position import ResumableSampler
from stoa_vlp.train.logging import read_metrics
from stoa_vlp.train.loop import TrainResult
from stoa_vlp.train.optim import warmup_cosine


def toy_config(*overrides: str):
    return load_config("tiny", [
        "train.steps=6", "train.warmup_steps=2", "train.lr=0.01", "train.save_every=3", "train.log_every=1",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu", "data.batch_size=4",
        "data.num_workers=0", *overrides,
    ])


def fit(run_dir, *overrides: str, model=None, dataset=None, scores=None, resume=None) -> TrainResult:
    """A toy run; `scores`: validate at every step, the evaluator returning them in turn."""
    evaluate = None
    if scores is not None:
        given = iter(scores)
        overrides = ("train.eval_every=1", "train.best_metric=val/score", *overrides)
        evaluate = lambda module: {"score": next(given)}  # noqa: E731
    config = toy_config(*overrides)
    torch.manual_seed(config.train.seed)
    trainer = Trainer(config, model or ToyModel(), dataset or ToyDataset(), collate, run_dir, evaluate=evaluate)
    return trainer.fit(resume=resume)


def state_of(run_dir, step: int) -> dict:
    return json.loads((run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step) / "state.json").read_text())


def test_more_steps_on_resume_follow_the_new_schedule_from_the_first_resumed_step(tmp_path):
    fit(tmp_path / "run")  # finished: its last lr, and the lr its optimiser state holds, is 0 (min_lr_scale 0)
    resumed = fit(tmp_path / "run", "train.steps=12", resume="latest")
    expected = [0.01 * warmup_cosine(step, 2, 12, 0.0) for step in range(6, 12)]
    assert [h["lr"] for h in resumed.history] == pytest.approx(expected)


class TowerToy(ToyModel):
    """A toy with a model-style `param_groups`: its first layer is a "tower" at lr x tower_lr_scale."""

    def param_groups(self, lr: float, tower_lr_scale: float, weight_decay: float) -> list[dict]:
        return [{"params": list(self.net[0].parameters()), "lr": lr * tower_lr_scale, "weight_decay": weight_decay}]


def test_changed_optimiser_settings_apply_on_resume_and_are_named_once(tmp_path, caplog):
    fit(tmp_path / "run", "train.steps=3", "train.tower_lr_scale=0.5", model=TowerToy())
    folder = tmp_path / "run" / "checkpoints" / "step_00000003"
    saved = torch.load(folder / "training_state.pt", weights_only=False)["optimizer"]["state"]
    config = toy_config("train.lr=0.1", "train.tower_lr_scale=0.1", "train.weight_decay=0.5", "train.betas=[0.5,0.6]",
                        "train.eps=0.001")
    trainer = Trainer(config, TowerToy(), ToyDataset(), collate, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="stoa_vlp.train.loop"):
        trainer.load_checkpoint(folder)
    groups = trainer.optimizer.param_groups
    assert trainer.scheduler.base_lrs == pytest.approx([0.01, 0.1, 0.1])  # the tower group, then decay / no decay
    assert [g["lr"] for g in groups] == pytest.approx([base * warmup_cosine(3, 2, 6, 0.0) for base in (0.01, 0.1, 0.1)])
    assert [g["weight_decay"] for g in groups] == [0.5, 0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.5, 0.6) and g["eps"] == 0.001 for g in groups)
    for index, parameter in enumerate(trainer.module.net[0].parameters()):  # Adam's moments are the checkpoint's
        torch.testing.assert_close(trainer.optimizer.state[parameter]["exp_avg"], saved[index]["exp_avg"])
    warnings = [r.getMessage() for r in caplog.records if "train.lr" in r.getMessage()]
    assert len(warnings) == 1
    for named in ("train.lr 0.01 -> 0.1", "train.tower_lr_scale 0.5 -> 0.1", "train.weight_decay 0.01 -> 0.5",
                  "train.betas [0.9, 0.98] -> [0.5, 0.6]", "train.eps 1e-06 -> 0.001", "train.steps 3 -> 6"):
        assert named in warnings[0]


def test_changed_lr_takes_effect_on_resume(tmp_path):
    fit(tmp_path / "run", "train.steps=3")
    resumed = fit(tmp_path / "run", "train.lr=0.1", resume="latest")
    assert [h["lr"] for h in resumed.history] == pytest.approx([0.1 * warmup_cosine(s, 2, 6, 0.0) for s in (3, 4, 5)])


class Recording(ToyDataset):
    def __init__(self):
        super().__init__()
        self.loaded: list[int] = []

    def __getitem__(self, index: int):
        self.loaded.append(index)
        return super().__getitem__(index)


@pytest.mark.parametrize("steps_before, batch_after", [(3, 8), (6, 16)])
def test_a_changed_batch_size_resumes_at_the_samples_consumed(tmp_path, caplog, steps_before, batch_after):
    fit(tmp_path / "run", f"train.steps={steps_before}")
    consumed = steps_before * 4
    dataset = Recording()
    with caplog.at_level(logging.WARNING, logger="stoa_vlp.train.loop"):
        fit(tmp_path / "run", f"train.steps={steps_before + 1}", f"data.batch_size={batch_after}", dataset=dataset,
            resume="latest")
    order = [index for index, _ in ResumableSampler(32, 4, 0, 1, 0)]  # epoch 0's order, whatever the batch size
    restart = consumed // batch_after * batch_after
    assert dataset.loaded == order[restart : restart + batch_after]
    assert f"global batches of 4 samples, this run's are {batch_after}" in caplog.text
    assert f"{consumed - restart} samples seen again" in caplog.text
    assert state_of(tmp_path / "run", steps_before)["global_batch"] == 4


def test_the_best_record_survives_a_resume(tmp_path):
    fit(tmp_path / "run", "train.steps=3", scores=[0.5, 0.9, 0.1])
    resumed = fit(tmp_path / "run", "train.steps=5", scores=[0.2, 0.3], resume="latest")
    assert resumed.best == {"step": 2, "val/score": 0.9}
    assert json.loads((tmp_path / "run" / "finished.json").read_text())["best"] == {"step": 2, "val/score": 0.9}


class Skipping(ToyDataset):
    """Every sample with an index divisible by 3 counts as a skipped bad video."""

    def __init__(self):
        super().__init__()
        self.skips = SkipCounter(max_share=1.0, min_seen=1)

    def __getitem__(self, index: int):
        self.skips.seen()
        if index % 3 == 0:
            self.skips.skip("bad_video", f"video{index}")
        return super().__getitem__(index)


def test_bad_sample_counts_survive_a_resume(tmp_path):
    straight = fit(tmp_path / "straight", dataset=Skipping())
    fit(tmp_path / "run", "train.steps=3", dataset=Skipping())
    resumed = fit(tmp_path / "run", dataset=Skipping(), resume="latest")

    def logged(run_dir):
        return [r["skipped_samples"] for r in read_metrics(run_dir) if r["split"] == "train"]

    assert logged(tmp_path / "run") == logged(tmp_path / "straight")
    assert resumed.data_skips == straight.data_skips and "of 24 samples" in resumed.data_skips
    assert state_of(tmp_path / "run", 3)["data_skips"][0] == 12


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    run = tmp_path / "run"
    fit(run, "train.save_every=2", "train.keep_last=3")
    older = run / "checkpoints" / "step_00000004"
    with caplog.at_level(logging.WARNING, logger="stoa_vlp.train.loop"):
        fit(run, "train.steps=5", "train.save_every=1", "train.keep_last=1", resume=str(older))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000005"]
    assert ckpt.resolve_resume("latest", run).name == "step_00000005"
    aside = run / "checkpoints" / "abandoned-step_00000004"
    assert [p.name for p in aside.iterdir()] == ["step_00000006"] and ckpt.is_complete(aside / "step_00000006")
    assert "step_00000006" in caplog.text and "abandoned-step_00000004" in caplog.text


def test_resuming_an_older_checkpoint_restores_its_best(tmp_path):
    run = tmp_path / "run"
    fit(run, "train.save_every=2", "train.keep_last=5", scores=[0.1, 0.5, 0.2, 0.3, 0.9, 0.4])
    assert ckpt.best_checkpoint(run).name == "step_00000005"
    resumed = fit(run, "train.save_every=2", "train.keep_last=5", scores=[0.3, 0.4],
                     resume=str(run / "checkpoints" / "step_00000004"))
    assert ckpt.best_checkpoint(run).name == "step_00000002" and resumed.best["step"] == 2
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001", "step_00000002", "step_00000004",
                                                          "step_00000006"]
    assert state_of(run, 6)["metrics"]["val/score"] == 0.4  # the resumed run's own step 6
    aside = run / "checkpoints" / "abandoned-step_00000004"
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000005", "step_00000006"]


def test_a_kill_before_best_json_is_written_is_repaired_on_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ckpt.write_json_atomic

    def killed_at_best_json_of_step_2(path, values):
        if path.name == "best.json" and values["step"] == 2:
            raise KeyboardInterrupt  # after step 2's folder was renamed into place
        real(path, values)

    monkeypatch.setattr(ckpt, "write_json_atomic", killed_at_best_json_of_step_2)
    overrides = ("train.save_every=3", "train.keep_last=1")
    with pytest.raises(KeyboardInterrupt):
        fit(run, *overrides, scores=[0.5, 0.9, 0.1, 0.2, 0.3, 0.4])
    monkeypatch.setattr(ckpt, "write_json_atomic", real)
    assert ckpt.best_checkpoint(run).name == "step_00000001"
    fit(run, *overrides, scores=[0.1, 0.2, 0.3, 0.4], resume="latest")
    assert ckpt.best_checkpoint(run).name == "step_00000002"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000006"]


def test_a_resume_whose_best_was_pruned_selects_the_best_anew(tmp_path):
    run = tmp_path / "run"
    settings = ("train.steps=4", "train.save_every=1", "train.keep_last=2")
    fit(run, *settings, scores=[0.1, 0.5, 0.5, 0.9])  # step 4 beats step 2, which is pruned
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000003", "step_00000004"]
    # step 3 names step 2 as its best: gone, so step 4's 0.5 (no better than the lost 0.5) is the new best
    resumed = fit(run, *settings, scores=[0.5], resume=str(run / "checkpoints" / "step_00000003"))
    assert resumed.best == {"step": 4, "val/score": 0.5}
    assert ckpt.best_checkpoint(run).name == "step_00000004"
    assert json.loads((run / "finished.json").read_text())["best"]["step"] == 4



def test_a_resume_reads_best_json_only_for_a_checkpoint_without_its_record(tmp_path, monkeypatch):
    """best.json was read on every rank at every resume, while rank 0 may be rewriting it (tidying)."""
    run = tmp_path / "run"
    fit(run, "train.save_every=2", scores=[0.1, 0.5, 0.2, 0.3, 0.9, 0.4])
    last = ckpt.list_checkpoints(run)[-1]
    read_best = ckpt.read_best

    def not_read(run_dir):
        raise AssertionError("best.json was read though state.json records the best checkpoint")

    def resumed() -> Trainer:
        trainer = Trainer(toy_config(), ToyModel(), ToyDataset(), collate, run)
        trainer.load_checkpoint(last)
        return trainer

    monkeypatch.setattr(ckpt, "read_best", not_read)
    assert resumed().best_checkpoint == {"name": "step_00000005", "step": 5}
    monkeypatch.setattr(ckpt, "read_best", read_best)
    state = json.loads((last / "state.json").read_text())
    del state["best_checkpoint"]  # as checkpoints written before state.json held it: best.json names the best
    (last / "state.json").write_text(json.dumps(state))
    assert resumed().best_checkpoint == {"name": "step_00000005", "step": 5}
