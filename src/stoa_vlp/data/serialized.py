"""Read-only containers that keep their items in a few numpy arrays instead of Python objects.

DataLoader workers forked from the main process share its memory pages until they are written.
Reading a Python object writes its reference count, so a list or dict of many objects is copied
page by page into every worker ("copy-on-read"); a numpy array is one object whose buffer is only
read. These containers pickle each item into one byte buffer (as detectron2 serialises its
dataset lists) and rebuild the item on access.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np


class SerializedList:
    """A read-only list of picklable objects stored as one numpy byte buffer plus offsets."""

    def __init__(self, items: list):
        blobs = [np.frombuffer(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for item in items]
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._bytes = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._bytes[start : int(self._ends[index])]))


def key_hash(key: str) -> np.uint64:
    """A 64-bit hash of `key` that is the same in every process (Python's `hash` of a str is
    salted per process, so it would differ in spawned workers)."""
    data = key.encode("utf-8", "surrogatepass")
    return np.uint64(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"))


class SerializedDict:
    """A read-only dict from str keys to picklable values.

    The (key, value) pairs are a SerializedList ordered by key hash, found with np.searchsorted
    over the sorted hashes; the stored key is compared too, so hash collisions stay correct.
    """

    def __init__(self, mapping: dict[str, Any]):
        keys = list(mapping)
        hashes = np.array([key_hash(key) for key in keys], dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]  # (n,) uint64, sorted
        self._pairs = SerializedList([(keys[i], mapping[keys[i]]) for i in order])

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, key: str) -> bool:
        return self._find(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        pair = self._find(key)
        return default if pair is None else pair[1]

    def _find(self, key: str) -> tuple[str, Any] | None:
        wanted = key_hash(key)
        first = int(np.searchsorted(self._hashes, wanted, side="left"))
        last = int(np.searchsorted(self._hashes, wanted, side="right"))
        for index in range(first, last):
            pair = self._pairs[index]
            if pair[0] == key:
                return pair
        return None
