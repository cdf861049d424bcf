"""Where a run's numbers come from, kept in RUN/run.json: the stoa-vlp version and git commit (and
whether the checkout had uncommitted changes), torch, CUDA, the device, the command line, the size and
modification time of every data file the config names and, for fine-tuning, the checkpoint the weights
started from (folder, step, sha256 of its weights). A resumed run keeps that record, warns about each
data file that changed since, and adds its own session (versions, device, command) to "resumes"."""

from __future__ import annotations

import datetime
import hashlib
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import stoa_vlp
from stoa_vlp.config import Config
from stoa_vlp.data.jsonl import read_json_object, write_json_atomic
from stoa_vlp.train.checkpointing import RUN_MARKER

log = logging.getLogger(__name__)

# the settings that name input files (video_root, a tree of videos, is left out)
DATA_FILES = ("data.train", "data.val", "data.test", "data.detections", "data.tags", "data.label_vocab",
              "task.answer_vocab", "model.init_checkpoint")


def git_commit(folder: Path) -> tuple[str | None, bool | None]:
    """(the commit checked out where `folder`'s files are tracked, whether tracked files under `folder`
    differ from it); (None, None) when they are not tracked (an installed package) or git is not there."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None, None
        found = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no", ".")
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if found.returncode != 0:
        return None, None
    return found.stdout.strip(), bool(changes.stdout.strip()) if changes.returncode == 0 else None


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """The software and hardware a session of a run ran with, and its command line."""
    commit, changed = git_commit(Path(stoa_vlp.__file__).parent)
    return {
        "world_size": world_size,
        "stoa_vlp": stoa_vlp.__version__,
        "git_commit": commit,
        "git_uncommitted_changes": changed,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,  # rank 0's
        "command": sys.argv,
    }


def fingerprint(path: Path) -> dict[str, int] | None:
    """Size and modification time of a file; of a folder (a detections store, shards) its files' total
    size and newest modification time; None for a path that is not there (a shard pattern)."""
    if path.is_file():
        status = path.stat()
        return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}
    if path.is_dir():
        found = [file.stat() for file in path.rglob("*") if file.is_file()]
        return {"files": len(found), "size": sum(s.st_size for s in found),
                "mtime_ns": max((s.st_mtime_ns for s in found), default=0)}
    return None


def data_files(config: Config, run_dir: Path) -> dict[str, dict[str, Any]]:
    """{setting: {"path", size, mtime_ns...}} of the DATA_FILES set in `config`, but for the run's own
    files (the label vocabulary it saves in its folder)."""
    inside = Path(run_dir).resolve()
    found = {}
    for key in DATA_FILES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not value or inside in Path(value).resolve().parents:
            continue
        stamp = fingerprint(Path(value))
        if stamp is not None:
            found[key] = {"path": value, **stamp}
    return found


def describe(stamp: dict[str, Any]) -> str:
    modified = datetime.datetime.fromtimestamp(stamp["mtime_ns"] / 1e9).isoformat(sep=" ", timespec="seconds")
    return f"{stamp['path']}, {stamp['size']} bytes, modified {modified}"


def changed_data_files(recorded: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]], record: Path) -> list[str]:
    """The settings whose data file is not as `record` (the run's run.json) describes it, sorted, with a
    warning for each."""
    changed = sorted(key for key, then in recorded.items() if key in now and now[key] != then)
    for key in changed:
        log.warning("%s changed since %s recorded it (then: %s; now: %s): the resumed run reads other data "
                    "than its steps so far", key, record, describe(recorded[key]), describe(now[key]))
    return changed


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_record(folder: Path) -> dict[str, Any]:
    """The checkpoint a fine-tuning starts from: its folder, training step (None for a save_pretrained
    folder, which has no state.json) and the sha256 of its model.safetensors."""
    state = folder / "state.json"
    step = read_json_object(state, {"step": int})["step"] if state.is_file() else None
    return {"folder": str(folder.resolve()), "step": step, "sha256": sha256_of(folder / "model.safetensors")}


def write_run_record(run_dir: Path, config: Config, device: torch.device, world_size: int,
                     init: dict[str, Any] | None, resumed: bool) -> None:
    """Write RUN/run.json: what the run started with; a resumed run keeps that record, warns about each
    data file that is not as recorded, and adds its own session to "resumes"."""
    path = Path(run_dir) / RUN_MARKER
    files = data_files(config, run_dir)
    session = environment(device, world_size)
    if resumed and path.is_file():
        record = read_json_object(path)
        changed = changed_data_files(record.get("data_files", {}), files, path)
        record.setdefault("resumes", []).append({**session, "data_files_changed": changed})
    else:
        record = {**session, "data_files": files, **({"init": init} if init else {})}
    write_json_atomic(path, record)


def read_run_record(run_dir: Path) -> dict[str, Any]:
    return read_json_object(Path(run_dir) / RUN_MARKER)
