"""train.epochs and train.warmup_share: the run's length and warmup from the training set."""

from __future__ import annotations

import io
import logging
import tarfile

import pytest
import torch
import yaml
from torch.utils.data import IterableDataset

from stoa_vlp.cli import main
from stoa_vlp.config import load_config
from stoa_vlp.data.synth import render_world
from stoa_vlp.train.logging import read_metrics
from stoa_vlp.train.run_length import set_run_length


class Items(torch.utils.data.Dataset):
    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


class Stream(IterableDataset):
    def __iter__(self):
        return iter(())


def test_epochs_and_warmup_share_set_steps_hand_computed(caplog):
    # 1,000 items, 32 per rank x 2 ranks: 15 global batches per epoch (the last 40 items dropped);
    # 2 batches per step: 7.5 steps per epoch, so 2.5 epochs are ceil(18.75) = 19 steps, 10% of them 2
    config = load_config("tiny", ["data.batch_size=32", "train.grad_accum=2", "train.epochs=2.5",
                                  "train.warmup_share=0.1"])
    with caplog.at_level(logging.INFO, logger="stoa_vlp.train.run_length"):
        set_run_length(config, Items(1000), world_size=2)
    assert (config.train.steps, config.train.warmup_steps) == (19, 2)
    assert "1000 items, 15 global batches of 64 per epoch" in caplog.text and "WARNING" not in caplog.text


def test_without_epochs_or_share_the_given_steps_stay():
    config = load_config("tiny", ["train.steps=7", "train.warmup_steps=3"])
    set_run_length(config, Items(10), world_size=1)
    assert (config.train.steps, config.train.warmup_steps) == (7, 3)


def test_a_warmup_share_applies_to_given_steps_and_a_long_warmup_is_warned_about(caplog):
    config = load_config("tiny", ["train.steps=40", "train.warmup_share=0.25"])
    set_run_length(config, Items(10), world_size=1)
    assert config.train.warmup_steps == 10
    config = load_config("tiny", ["train.steps=40", "train.warmup_share=0.5"])
    config.train.warmup_share = 0.9999  # a share of the steps that rounds to all of them
    with caplog.at_level(logging.WARNING):
        set_run_length(config, Items(10), world_size=1)
    assert caplog.text.count("train.warmup_steps=40 is not below train.steps=40") == 1


def test_a_long_warmup_of_given_steps_is_warned_about_once(caplog):
    """Given steps are warned about by check_settings, before the run starts; set_run_length, which
    the commands call after it, changes nothing then and said it a second time."""
    from stoa_vlp.train.settings import check_settings

    config = load_config("tiny", ["train.steps=5", "train.warmup_steps=5"])
    with caplog.at_level(logging.WARNING):
        check_settings(config)
        set_run_length(config, Items(10), world_size=1)
    assert caplog.text.count("train.warmup_steps=5 is not below train.steps=5") == 1


def test_epochs_need_a_known_length_and_a_full_batch():
    with pytest.raises(ValueError, match="WebDataset shards are streamed: give the run's length as train.steps"):
        set_run_length(load_config("tiny", ["train.epochs=1"]), Stream(), world_size=1)
    with pytest.raises(ValueError, match="the training set's 6 items fill no global batch of 8"):
        set_run_length(load_config("tiny", ["train.epochs=1", "data.batch_size=4"]), Items(6), world_size=2)


def test_pretrain_runs_the_epochs_it_is_given(tmp_path):
    world = render_world(tmp_path / "world", train=4, val=0, test=0, seed=1, captions_per_clip=3)
    run = tmp_path / "run"
    assert main([
        "pretrain", "--config", "tiny", "--output", str(run), "--set", f"data.train={world.annotations}",
        "--set", f"data.video_root={world.videos}", "--set", "data.batch_size=4", "--set", "model.frames=2",
        "--set", "model.image_size=32", "--set", "train.progress=false", "--set", "train.tensorboard=false",
        "--set", "train.log_every=1", "--set", "train.epochs=2", "--set", "train.warmup_share=0.5",
    ]) == 0
    # 4 clips x 3 captions = 12 items: 3 batches of 4 per epoch, 2 epochs = 6 steps, warmup 3
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["train"]["warmup_steps"] == 3 and saved["train"]["epochs"] == 2


def test_epochs_over_shards_are_refused_before_the_run_folder_is_touched(tmp_path):
    # before, the refusal came once the shards were opened, after --overwrite had deleted the old run
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        info = tarfile.TarInfo("0001.txt")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"a dog"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"world_size": 1}')  # an earlier run's folder, which --overwrite replaces
    (run / "kept.txt").write_text("an earlier run's file")
    with pytest.raises(ValueError, match="train.epochs needs a training set of known length"):
        main(["pretrain", "--config", "tiny", "--output", str(run), "--overwrite", "--set", f"data.train={shard}",
              "--set", "train.epochs=1"])
    assert (run / "kept.txt").exists()
