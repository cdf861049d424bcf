"""JSON Lines reading shared by the annotation, detection and task-file readers."""

from __future__ import annotations

import json
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
