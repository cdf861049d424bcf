"""Kill and resume with the real tiny STOA model and all six objectives: 6 steps straight equal
3 steps, a kill, and 3 resumed steps (losses of steps 4-6 and final parameters, fp32 CPU, 1e-6)."""

from __future__ import annotations

import pytest
import torch
from _train_toys import RandomClips, one_thread, tiny_pretrainer

from stoa_vlp.config import load_config
from stoa_vlp.data.dataset import collate
from stoa_vlp.train import Trainer
from stoa_vlp.train import checkpointing as ckpt

OVERRIDES = [
    "train.steps=6",
    "train.warmup_steps=2",
    "train.save_every=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.head_dropout=0.1",  # dropout draws from the RNG that resume must restore
    # smaller than tiny, to keep the test fast: 2 frames of 32 px, 12 text tokens
    "model.frames=2",
    "model.image_size=32",
    "model.text_len=12",
]


class Killed(Exception):
    pass


def test_tiny_stoa_kill_and_resume_is_exact(tmp_path):
    with one_thread():
        kill_and_resume(tmp_path)


def kill_and_resume(tmp_path):
    config = load_config("tiny", OVERRIDES)
    dataset = RandomClips(config)
    straight = Trainer(config, tiny_pretrainer(config), dataset, collate, tmp_path / "straight").fit()

    batches = {"n": 0}

    def dying_collate(samples):
        batches["n"] += 1
        if batches["n"] == 4:
            raise Killed  # dies while fetching step 4's batch, after the step-3 checkpoint
        return collate(samples)

    with pytest.raises(Killed):
        Trainer(config, tiny_pretrainer(config), dataset, dying_collate, tmp_path / "killed").fit()
    torch.manual_seed(12345)  # a new process starts from some other random state
    resumed = Trainer(config, tiny_pretrainer(config), dataset, collate, tmp_path / "killed").fit(resume="latest")

    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert {"vtc", "vtm", "mlm", "plm", "dota", "stasp"} <= set(resumed.history[0])
    for a, b in zip(straight.history[3:], resumed.history):
        for name in ("loss", "vtc", "vtm", "mlm", "plm", "dota", "stasp"):
            assert a[name] == pytest.approx(b[name], abs=1e-6), (a["step"], name)
    final_straight = ckpt.load_weights(tmp_path / "straight" / "checkpoints" / "step_00000006" / "model.safetensors")
    final_resumed = ckpt.load_weights(tmp_path / "killed" / "checkpoints" / "step_00000006" / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for name in final_straight:
        torch.testing.assert_close(final_straight[name], final_resumed[name], atol=1e-6, rtol=0, msg=name)


def test_checkpoint_is_a_pretrained_model_folder(tmp_path):
    from stoa_vlp.model import load_pretrained

    config = load_config("tiny", OVERRIDES + ["train.steps=1"])
    trainer = Trainer(config, tiny_pretrainer(config), RandomClips(config), collate, tmp_path / "run")
    trainer.fit()
    model = load_pretrained(ckpt.list_checkpoints(tmp_path / "run")[-1])
    for name, value in trainer.module.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0)


def test_damaged_checkpoint_files_are_errors_naming_them(tmp_path):
    folder = tmp_path / "run" / ckpt.CHECKPOINTS / "step_00000002"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        ckpt.load_weights(folder / "model.safetensors")
    (folder / "state.json").write_text('{"step": 2}')
    with pytest.raises(ValueError, match='state.json: no "config"'):
        ckpt.read_checkpoint(folder, rank=0)
    (tmp_path / "run" / ckpt.CHECKPOINTS / ckpt.BEST).write_text("{}")
    with pytest.raises(ValueError, match='best.json: no "name"'):
        ckpt.best_checkpoint(tmp_path / "run")


def test_a_truncated_checkpoint_is_the_public_checkpoint_error(tmp_path):
    from stoa_vlp.commands.task_common import load_model_weights_from
    from stoa_vlp.model import STOAVLP, CheckpointError, save_pretrained

    config = load_config("tiny").model
    save_pretrained(STOAVLP(config), tmp_path / "pt")
    weights = tmp_path / "pt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model_weights_from(STOAVLP(config), tmp_path / "pt")  # what `finetune --init` runs
