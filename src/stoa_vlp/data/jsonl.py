"""Text file opening (UTF-8, gzip-compressed when the name ends in .gz, errors naming file and line),
JSON and JSON Lines reading and the checks of their fields, shared by the annotation, detection, tag,
checkpoint and task-file readers, and the atomic JSON and JSONL file writing of checkpoints,
`prepare` and `detect`."""

from __future__ import annotations

import gzip
import json
import math
import numbers
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO


def _open(path: str | Path, mode: str, **text) -> IO:
    """`open(path, mode, **text)`, decompressing through gzip when the name ends in .gz (large
    detection and annotation files are often kept compressed)."""
    return gzip.open(path, mode, **text) if str(path).endswith(".gz") else open(path, mode, **text)


@contextmanager
def open_text(path: str | Path, error: type[Exception] = ValueError, newline: str | None = None) -> Iterator[TextIO]:
    """`path` opened as UTF-8 text (`newline` as `open` takes it), through gzip when its name ends in
    .gz; bytes that are not UTF-8 (`error` naming the file and line) or a .gz file that is not gzip
    or is cut short (`error` naming the file), met while reading it in the block, raise `error`."""
    try:
        with _open(path, "rt", encoding="utf-8", newline=newline) as handle:
            yield handle
    except UnicodeDecodeError:
        raise error(_not_utf8(path)) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as problem:
        raise error(f"{path}: not readable gzip data ({problem})") from None


def _not_utf8(path: str | Path) -> str:
    """The error message for a file that is not UTF-8, naming the line and byte of its first bad bytes."""
    with _open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                byte = decode_error.start + 1
                return f"{path}:{number}: not UTF-8 text ({decode_error.reason} at byte {byte} of the line)"
    return f"{path}: not UTF-8 text"


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a line that is not JSON, or not UTF-8, raises
    `error` naming file and line."""
    with open_text(path, error) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path}:{number}: malformed JSON ({decode_error.msg})") from None


JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
              bool: "true or false", type(None): "null"}


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON value in the file `path`; malformed JSON or text that is not UTF-8 raises `error` naming it."""
    try:
        with open_text(path, error) as handle:
            return json.load(handle)
    except json.JSONDecodeError as decode_error:
        position = f"line {decode_error.lineno}, column {decode_error.colno}"
        raise error(f"{path}: malformed JSON at {position} ({decode_error.msg})") from None


def read_json_object(path: str | Path, expected: dict[str, type] | None = None) -> dict[str, Any]:
    """The JSON object in the file `path`, with the `expected` keys holding values of their types;
    otherwise a ValueError naming the file and the problem."""
    values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object, got {JSON_KINDS[type(values)]}")
    for key, kind in (expected or {}).items():
        if key not in values:
            raise ValueError(f"{path}: no \"{key}\"")
        if not isinstance(values[key], kind):
            raise ValueError(f"{path}: \"{key}\" must be {JSON_KINDS[kind]}, got {JSON_KINDS[type(values[key])]}")
    return values


def shown(value, limit: int = 80) -> str:
    """`value` as Python writes it, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(error: BaseException) -> str:
    """An error's message on one line (tarfile's and safetensors' may span several)."""
    return " ".join(str(error).split())


def non_empty_string(value, name: str, where: str, error: type[Exception] = ValueError) -> str:
    """`value` of field `name` of the item `where` names, which must be a non-empty string."""
    if not isinstance(value, str) or not value:
        raise error(f"{where}: {name} must be a non-empty string, got {shown(value)}")
    return value


def is_finite_number(value) -> bool:
    """Whether `value` is a finite number (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@contextmanager
def _atomic_text_file(path: str | Path) -> Iterator[TextIO]:
    """A temporary file beside `path` that replaces it when the block completes; if the block raises
    (or is interrupted) the temporary file is removed and `path` is left as it was. The temporary name
    is random, so processes writing one file (ranks saving the same result, on one node or several
    whose process ids repeat) never share it. A write that fails (a full disk) is an OSError naming
    `path`: the system's names no file."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, f"{path}: writing failed ({error.strerror or error})") from error
        raise


def write_json_atomic(path: str | Path, values: Any, indent: int | None = 2) -> None:
    """Write `values` as JSON to `path` through a temporary file and a rename: never half-written."""
    with _atomic_text_file(path) as handle:
        json.dump(values, handle, indent=indent)


def write_jsonl_atomic(path: str | Path, values: Iterable[Any]) -> int:
    """Write each of `values` (consumed as it streams) as one JSON line to `path` through a temporary
    file and a rename: `path` holds all lines or, on an error, what it held before. Returns the line count."""
    count = 0
    with _atomic_text_file(path) as handle:
        for value in values:
            handle.write(json.dumps(value) + "\n")
            count += 1
    return count
