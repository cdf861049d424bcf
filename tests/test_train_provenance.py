"""What a run folder records about its origin (run.json), the warning when a resumed run's data
changed, and train.deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
import torch
from _train_toys import ToyDataset, ToyModel, collate

import stoa_vlp
from stoa_vlp.commands.common import set_deterministic
from stoa_vlp.config import load_config
from stoa_vlp.train import Trainer
from stoa_vlp.train.provenance import checkpoint_record, git_commit
from stoa_vlp.train.settings import check_settings


def toy_run(tmp_path, steps: int, *overrides: str):
    config = load_config("tiny", [f"train.steps={steps}", "train.warmup_steps=1", "train.save_every=1",
                                  "train.progress=false", "train.tensorboard=false", "train.device=cpu",
                                  "data.batch_size=4", "data.num_workers=0", *overrides])
    return Trainer(config, ToyModel(), ToyDataset(), collate, tmp_path / "run")


def test_run_json_records_versions_command_and_data_files(tmp_path, caplog):
    train = tmp_path / "train.jsonl"
    train.write_text('{"video": "a", "caption": "a cat"}\n')
    outside_run = ["data.train=" + str(train), "data.tags=" + str(tmp_path / "not-there.json")]
    toy_run(tmp_path, 1, *outside_run).fit()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["world_size"] == 1  # the marker's meaning stays
    assert record["stoa_vlp"] == stoa_vlp.__version__ and record["torch"] == torch.__version__
    assert record["cuda"] == torch.version.cuda and record["device"] == "cpu"
    assert record["command"] and "git_commit" in record and "git_uncommitted_changes" in record
    status = train.stat()
    assert record["data_files"] == {"data.train": {"path": str(train), "size": status.st_size,
                                                   "mtime_ns": status.st_mtime_ns}}  # a missing file is left out

    toy_run(tmp_path, 2, *outside_run).fit(resume="latest")
    assert "changed since" not in caplog.text
    train.write_text('{"video": "a", "caption": "a dog"}\n{"video": "b", "caption": "a cat"}\n')
    toy_run(tmp_path, 3, *outside_run).fit(resume="latest")
    warning = next(r.getMessage() for r in caplog.records if "changed since" in r.getMessage())
    assert warning.startswith(f"data.train changed since {tmp_path / 'run' / 'run.json'} recorded it (then: {train}, "
                              f"{status.st_size} bytes")
    assert f"now: {train}, {train.stat().st_size} bytes" in warning
    # the record stays what the run started with; each resume adds its session
    resumed = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {key: resumed[key] for key in record} == record
    assert [session["data_files_changed"] for session in resumed["resumes"]] == [[], ["data.train"]]
    assert all(session["command"] and session["world_size"] == 1 for session in resumed["resumes"])


def test_a_resumed_run_keeps_the_checkpoint_it_started_from(tmp_path):
    init = {"folder": "/runs/pt/checkpoints/step_00000100", "step": 100, "sha256": "0" * 64}
    toy_run(tmp_path, 1).fit(init=init)
    toy_run(tmp_path, 2).fit(resume="latest")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["init"] == init


def test_git_commit_only_inside_a_checkout(tmp_path):
    assert git_commit(tmp_path) == (None, None)
    checkout = tmp_path / "checkout"
    (checkout / "pkg").mkdir(parents=True)
    (checkout / "pkg" / "__init__.py").write_text("")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run([*git, *args], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(checkout / "pkg") == (commit, False)
    (checkout / "pkg" / "__init__.py").write_text("changed = True\n")
    assert git_commit(checkout / "pkg") == (commit, True)


def test_deterministic_training_is_asked_of_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: calls.append(mode))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored (unset) after the test
    config = load_config("tiny", ["train.deterministic=true"])
    check_settings(config)
    set_deterministic(config.train)
    assert calls == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    set_deterministic(load_config("tiny").train)  # off by default
    assert calls == [True]


def test_deterministic_is_a_boolean():
    with pytest.raises(ValueError, match="train.deterministic: expected true/false"):
        load_config("tiny", ["train.deterministic=yes please"])


def test_a_checkpoint_is_recorded_by_folder_step_and_hash(tmp_path):
    folder = tmp_path / "checkpoints" / "step_00000007"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text('{"step": 7, "config": {}}')
    (folder / "model.safetensors").write_bytes(b"weights")
    assert checkpoint_record(folder) == {"folder": str(folder.resolve()), "step": 7,
                                         "sha256": hashlib.sha256(b"weights").hexdigest()}
