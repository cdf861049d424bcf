"""Training output: a tqdm bar with loss and clips/s, `metrics.jsonl`, TensorBoard events and a final
summary table. Only rank 0 writes; other ranks get a logger that does nothing."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from stoa_vlp.data.jsonl import write_jsonl_atomic

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per record to RUN/metrics.jsonl and mirrors scalars to TensorBoard
    under RUN/tensorboard (tags `split/name`). A fresh run (`resumed_step` None) starts both anew;
    a resumed one drops the records of steps after its checkpoint, which it is about to redo. NaN and
    infinite values are written as null (strict JSON)."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, resumed_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE if run_dir is not None else None
        self.writer = None
        if self.path is not None and self.path.exists():
            kept = [] if resumed_step is None else [r for r in read_metrics(run_dir) if r["step"] <= resumed_step]
            write_jsonl_atomic(self.path, (finite_or_null(record) for record in kept))
        if run_dir is not None and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(run_dir) / "tensorboard"
            if resumed_step is None and log_dir.exists():
                shutil.rmtree(log_dir)
            purge = None if resumed_step is None else resumed_step + 1
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(finite_or_null({"split": split, "step": step, **values})) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def finite_or_null(values: dict[str, object]) -> dict[str, object]:
    """`values` with None (JSON's null) for its NaN and infinite floats, which strict JSON has no words for
    (Python's json writes NaN and Infinity, which other readers reject)."""
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in values.items()}


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl. A last line that is not JSON (cut short by a kill or a full disk
    while it was appended) is left out with a warning; any other is a ValueError naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from error
            log.warning("%s: its last line is cut short (a kill or a full disk while it was written) and is "
                        "left out: %r", path, line[:80])
    return records


class Progress:
    """The rank-0 progress bar over optimiser steps."""

    def __init__(self, total: int, initial: int, enabled: bool, name: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True) if enabled else None

    def update(self, loss: float, clips_per_s: float, skipped: int) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{loss:.4f}", "clips/s": f"{clips_per_s:.1f}"}
        if skipped:
            postfix["skipped"] = skipped
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_table(header: list[str], rows: Iterable[list[object]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [header] + [[_format_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(value.ljust(width) for value, width in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
