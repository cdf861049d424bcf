"""JSON Lines reading shared by the annotation, detection and task-file readers, and the atomic
JSON file writing of checkpoints and `prepare`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a line that is not JSON raises `error` naming file and line."""
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path}:{number}: malformed JSON ({decode_error.msg})") from None


def write_json_atomic(path: Path, values: Any) -> None:
    """Write `values` as JSON to `path` through a temporary file and a rename: never half-written."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(values, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
