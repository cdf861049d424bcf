"""Checkpoints that survive a kill, and the run directory they live in.

A checkpoint is a folder `RUN/checkpoints/step_00000300/`:
  model.safetensors   the model's weights (tied tensors stored once, aliases in metadata)
  config.json         {"model": model config}: with model.safetensors, a `stoa_vlp.model.load_pretrained`
                      directory
  training_state.pt   optimiser, LR scheduler and GradScaler states
  rng_rank{r}.pt      python / numpy / torch (CPU and CUDA) RNG states of rank r
  state.json          step, epoch, data position (and the global batch it counts), worker seeds, the
                      best validation and its checkpoint, bad-sample counts, metrics, config; written last
It is written into `checkpoints/.tmp-step_00000300/` and renamed into place, so a kill leaves either
the complete new folder or only a stale temporary one; loaders never look at temporary folders.
`best.json` (replaced atomically) names the best-on-validation checkpoint; pruning keeps the last
`keep_last` checkpoints and the best one. Every state.json also names the best checkpoint, so a resume
rewrites best.json from it. A run resumed from an older checkpoint moves the later ones into
`checkpoints/abandoned-step_N/`, which pruning and `--resume latest` never look into.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stoa_vlp.data.jsonl import one_line, read_json_object, write_json_atomic
from stoa_vlp.model.checkpoint import CheckpointError

CHECKPOINTS = "checkpoints"
BEST = "best.json"
RUN_MARKER = "run.json"
FINISHED_MARKER = "finished.json"
_TEMP_PREFIX = ".tmp-"
_ABANDONED_PREFIX = "abandoned-"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- model weights -----------------------------------------------------------------------------


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied weights): store each once, note aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name_of: dict[tuple, str] = {}
    seen_storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and key in first_name_of:
            aliases[name] = first_name_of[key]
            continue
        first_name_of[key] = name
        storage = tensor.untyped_storage().data_ptr()
        shared = tensor.numel() > 0 and storage in seen_storages
        seen_storages.add(storage)
        tensors[name] = tensor.clone().contiguous() if shared else tensor.contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    except Exception as error:  # safetensors raises its own error types for a missing or damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(error)})") from None
    for name, source in aliases.items():
        state[name] = state[source]
    return state


def to_cpu(state: Any) -> Any:
    """A nested state (dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(value) for value in state)
    return state


# ---- RNG ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The process's random states; on a GPU, of its own device only (a rank draws on no other)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; the device state goes to the current device. Checkpoints before
    2026-11-27 hold every visible device's state in a list, which the current device's index picks
    from (restoring the whole list failed on a machine with fewer GPUs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):
        device = torch.cuda.current_device() if cuda and torch.cuda.is_available() else -1
        cuda = cuda[device] if 0 <= device < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# ---- checkpoint folders ------------------------------------------------------------------------


def is_complete(folder: Path) -> bool:
    return (folder / "state.json").is_file() and not folder.name.startswith(_TEMP_PREFIX)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """best.json's record, {"name": "step_00000300", "step": 300}; None without one."""
    record = Path(run_dir) / CHECKPOINTS / BEST
    return read_json_object(record, {"name": str}) if record.is_file() else None


def best_checkpoint(run_dir: Path) -> Path | None:
    record = read_best(run_dir)
    if record is None:
        return None
    folder = Path(run_dir) / CHECKPOINTS / record["name"]
    return folder if is_complete(folder) else None


def restore_best(run_dir: Path, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Make best.json hold `record` (a resumed checkpoint's); remove it when `record` is None or names no
    complete checkpoint of this run. Returns the record kept."""
    path = Path(run_dir) / CHECKPOINTS / BEST
    if record is not None and is_complete(path.parent / record["name"]):
        write_json_atomic(path, record)
        return record
    path.unlink(missing_ok=True)
    return None


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints after `step` (an abandoned continuation of a run resumed from an older
    checkpoint) into a new `checkpoints/abandoned-step_N/` (`.2`, `.3`... if taken). Returns where they went."""
    root = Path(run_dir) / CHECKPOINTS
    later = sorted(p.name for p in root.glob("step_*") if p.is_dir() and p.name > checkpoint_name(step))
    if not later:
        return []
    base = f"{_ABANDONED_PREFIX}{checkpoint_name(step)}"
    aside = next(root / name for name in itertools.chain([base], (f"{base}.{k}" for k in itertools.count(2)))
                 if not (root / name).exists())
    aside.mkdir()
    for name in later:
        os.rename(root / name, aside / name)
    return [aside / name for name in later]


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """`latest` -> the run's newest complete checkpoint; a run folder -> its newest; else the folder."""
    target = Path(run_dir) if resume == "latest" else Path(resume)
    if is_complete(target):
        return target
    checkpoints = list_checkpoints(target)
    if not checkpoints:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint in {target / CHECKPOINTS}")
    return checkpoints[-1]


def write_checkpoint_files(
    temporary: Path,
    rank: int,
    weights: dict[str, torch.Tensor] | None,
    training_state: dict[str, Any] | None,
    model_config: dict[str, Any] | None,
) -> None:
    """This rank's share of a checkpoint: its RNG state; rank 0 also the weights and optimiser.
    state.json (`write_state`), which marks the folder complete, is written after every rank's share."""
    rng = rng_state()
    with _checkpoint_writes(temporary):
        torch.save(rng, temporary / f"rng_rank{rank}.pt")
        if weights is not None:
            save_weights(weights, temporary / "model.safetensors")
            write_json_atomic(temporary / "config.json", {"model": model_config})
        if training_state is not None:
            torch.save(training_state, temporary / "training_state.pt")


def write_state(temporary: Path, state: dict[str, Any]) -> None:
    """The checkpoint's state.json (rank 0, after every rank's files): the folder is complete."""
    with _checkpoint_writes(temporary):
        write_json_atomic(temporary / "state.json", state)


@contextmanager
def _checkpoint_writes(temporary: Path) -> Iterator[None]:
    """A write in the block that fails is an OSError naming the checkpoint's folder and what to do:
    torch.save's on a full disk ("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    and safetensors' name no file."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        raise OSError(f"{temporary}: writing the checkpoint failed ({one_line(error)}); is the disk full? Free "
                      f"space there (or lower train.keep_last), then resume with --resume latest") from error


def start_checkpoint(run_dir: Path, step: int) -> Path:
    """Create an empty temporary folder for the checkpoint of `step` (rank 0)."""
    temporary = Path(run_dir) / CHECKPOINTS / f"{_TEMP_PREFIX}{checkpoint_name(step)}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def finish_checkpoint(run_dir: Path, temporary: Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Rename the temporary folder into place, update best.json, prune old checkpoints (rank 0)."""
    final = temporary.parent / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    if is_best:
        write_json_atomic(final.parent / BEST, {"name": final.name, "step": step})
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and the best; drop stale temporaries."""
    root = Path(run_dir) / CHECKPOINTS
    for stale in root.glob(f"{_TEMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale)
    best = best_checkpoint(run_dir)
    checkpoints = list_checkpoints(run_dir)
    for folder in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if folder != best:
            shutil.rmtree(folder)


def read_checkpoint(folder: Path, rank: int) -> dict[str, Any]:
    """Everything a resume needs; `rng` is None when the checkpoint has no state for this rank."""
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no state.json)")
    rng_file = folder / f"rng_rank{rank}.pt"
    return {
        "state": read_json_object(folder / "state.json", {"step": int, "config": dict}),
        "weights": load_weights(folder / "model.safetensors"),
        "training_state": torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(rng_file, weights_only=False) if rng_file.is_file() else None,
    }


# ---- run directories ---------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a folder holding a finished run unless asked; `overwrite` deletes a previous
    run (only a folder this tool wrote, recognised by its run.json)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    ours = (run_dir / RUN_MARKER).is_file()
    finished = (run_dir / FINISHED_MARKER).is_file()
    if overwrite:
        if not ours and any(run_dir.iterdir()):
            raise CheckpointError(
                f"--overwrite: {run_dir} is not empty and holds no {RUN_MARKER}; refusing to delete a folder "
                "that stoa-vlp did not write"
            )
        shutil.rmtree(run_dir)
        return
    if resume:
        return
    if finished:
        raise CheckpointError(
            f"{run_dir} holds a finished run; pass --overwrite to replace it, --resume latest to continue it, "
            "or choose another --output"
        )
    if ours and list_checkpoints(run_dir):
        raise CheckpointError(
            f"{run_dir} holds an unfinished run with checkpoints; pass --resume latest to continue it "
            "or --overwrite to start again"
        )
