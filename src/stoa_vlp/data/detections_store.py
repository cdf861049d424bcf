"""A detections file packed into a folder of memory-mapped arrays: `stoa-vlp pack`.

A detections JSONL file is read whole into every training process (`read_packed_detections`): about
33 bytes per box, so about 30 GB per rank for WebVid-2.5M detected densely (900M boxes). A store
holds the same detections in flat binary files that every process maps into memory: the operating
system reads the pages a sample touches and keeps one copy in its page cache for all ranks and data
workers on a machine. `DetectionsStore` is a read-only mapping from video id to
`PackedVideoDetections`, equal to what `read_packed_detections` gives for the file it was packed from.

Layout (little-endian; the counts V videos, F detected frames, n boxes are in store.json):
  store.json     format, version, counts, the sorted class names, the source file (path, size, mtime)
  ids.bin        uint8, the video ids' UTF-8 bytes (lone surrogates passed through), sorted, back to back
  id_ends.bin    int64 (V,): video v's id is ids.bin[id_ends[v - 1]:id_ends[v]]
  videos.bin     int64 (V, 4): width, height, first frame, end frame (rows of the frame arrays)
  times.bin      float64 (F,): each video's frame times, sorted
  frame_ends.bin int64 (F,): frame f's boxes are box rows frame_ends[f - 1]:frame_ends[f] (global)
  rects.bin      float32 (n, 4) x0, y0, x1, y1 in pixels of the video; confs.bin float32 (n,)
  classes.bin    int32 (n,): index into store.json's class names

A store holding what pack never writes (a damaged copy, an edited file) is a DetectionsError naming the
file, checked where it costs least: the manifest, the id ends and the video table when the store is
opened (V rows); the ids as they are listed; a video's frames and boxes when it is read (a few
microseconds, bench/detections.py); the class indexes also in `box_counts_by_class_name`'s pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from stoa_vlp.data.detections import DetectionsError, PackedVideoDetections, VideoDetections

log = logging.getLogger(__name__)

FORMAT, VERSION = "stoa-vlp detections store", 1
MANIFEST = "store.json"
CHUNK = 1 << 24  # boxes per pass over classes.bin
# file -> (dtype, shape of one row, the count in store.json that gives its rows)
ARRAYS = {
    "ids.bin": (np.dtype("u1"), (), "id_bytes"),
    "id_ends.bin": (np.dtype("<i8"), (), "videos"),
    "videos.bin": (np.dtype("<i8"), (4,), "videos"),
    "times.bin": (np.dtype("<f8"), (), "frames"),
    "frame_ends.bin": (np.dtype("<i8"), (), "frames"),
    "rects.bin": (np.dtype("<f4"), (4,), "boxes"),
    "confs.bin": (np.dtype("<f4"), (), "boxes"),
    "classes.bin": (np.dtype("<i4"), (), "boxes"),
}
COUNTS = ("videos", "frames", "boxes", "id_bytes")


def id_bytes(video_id: str) -> bytes:
    """A video id as stored: UTF-8, a lone surrogate (a file name that is not UTF-8) passed through.
    Byte order is code point order, so the ids sort alike either way."""
    return video_id.encode("utf-8", "surrogatepass")


def source_stamp(path: str | Path) -> dict:
    """What tells a detections file's versions apart: its path, size and modification time."""
    path = Path(path).resolve()
    status = path.stat()
    return {"path": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def write_detections_store(folder: str | Path, videos: Iterable[VideoDetections], source: dict | None = None) -> dict:
    """Pack `videos` (e.g. `iter_detections(path)`, read as they come: the file is never held whole) into
    the store `folder`, written in a temporary folder renamed into place; `source`: the file's
    `source_stamp`, to tell later whether it changed. Returns the manifest."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists: remove it, or pack into another folder")
    temporary = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex}")
    temporary.mkdir(parents=True)
    try:
        manifest = _write_arrays(temporary, videos, source)
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return manifest


def _write_arrays(folder: Path, videos: Iterable[VideoDetections], source: dict | None) -> dict:
    """Frames and boxes are appended to their files video by video; the video table (small) is sorted
    by id at the end. Class indexes are by first appearance while writing, rewritten at the end to
    index the sorted class names."""
    table: list[tuple[bytes, int, int, int, int]] = []  # id, width, height, first frame, end frame
    class_of: dict[str, int] = {}
    frames = boxes = 0
    names = ("times.bin", "frame_ends.bin", "rects.bin", "confs.bin", "classes.bin")
    files = {name: open(folder / name, "wb") for name in names}

    def append(name: str, values: np.ndarray) -> None:
        files[name].write(values.astype(ARRAYS[name][0]).tobytes())

    try:
        for video in videos:
            video_packed = PackedVideoDetections.pack(video)
            store_index = np.array([class_of.setdefault(name, len(class_of)) for name in video_packed.class_names],
                                   dtype=np.int64)
            append("times.bin", video_packed.times)
            append("frame_ends.bin", boxes + video_packed.ends)
            append("rects.bin", video_packed.rects)
            append("confs.bin", video_packed.confs)
            append("classes.bin", store_index[video_packed.class_index])
            table.append((id_bytes(video.video_id), video.width, video.height, frames, frames + len(video_packed.times)))
            frames += len(video_packed.times)
            boxes += len(video_packed.confs)
    finally:
        for file in files.values():
            file.close()
    class_names = sorted(class_of)
    if boxes:
        sorted_index = np.empty(len(class_names), dtype=ARRAYS["classes.bin"][0])
        sorted_index[[class_of[name] for name in class_names]] = np.arange(len(class_names))
        classes = np.memmap(folder / "classes.bin", dtype=ARRAYS["classes.bin"][0], mode="r+", shape=(boxes,))
        for start in range(0, boxes, CHUNK):
            classes[start:start + CHUNK] = sorted_index[classes[start:start + CHUNK]]
        classes.flush()
        del classes
    table.sort()
    ids = [row[0] for row in table]
    (folder / "ids.bin").write_bytes(b"".join(ids))
    (folder / "id_ends.bin").write_bytes(np.cumsum([len(i) for i in ids], dtype=ARRAYS["id_ends.bin"][0]).tobytes())
    videos = np.array([row[1:] for row in table], dtype=ARRAYS["videos.bin"][0]).reshape(-1, 4)
    (folder / "videos.bin").write_bytes(videos.tobytes())
    return {
        "format": FORMAT, "version": VERSION, "videos": len(table), "frames": frames, "boxes": boxes,
        "id_bytes": sum(len(i) for i in ids), "class_names": class_names, "source": source,
    }


class DetectionsStore(Mapping):
    """Read-only `{video id: PackedVideoDetections}` over a store folder. Opening it maps its arrays and
    checks the video table; a pickled store (a data-loading worker's copy) carries only its folder and
    maps them when first read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.class_names: list[str] = self.manifest["class_names"]
        self._arrays: dict[str, np.ndarray] | None = None
        self._check_tables()

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "manifest": self.manifest, "class_names": self.class_names, "_arrays": None}

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: self._map(name, dtype, row, self.manifest[count])
                            for name, (dtype, row, count) in ARRAYS.items()}
        return self._arrays

    def _map(self, name: str, dtype, row: tuple[int, ...], rows: int) -> np.ndarray:
        """A plain array over the mapped file (slices of a np.memmap cost more to make)."""
        if rows == 0:  # numpy cannot map an empty file
            return np.zeros((0, *row), dtype=dtype)
        return np.asarray(np.memmap(self.folder / name, dtype=dtype, mode="r", shape=(rows, *row)))

    def _check_tables(self) -> None:
        """id_ends.bin and videos.bin (V rows, read whole) as pack writes them: what the search of the ids
        and every read of a video rely on."""
        id_ends, table = self.arrays["id_ends.bin"], self.arrays["videos.bin"]
        if len(id_ends) and (id_ends[0] < 0 or id_ends[-1] != self.manifest["id_bytes"]
                             or not (id_ends[1:] >= id_ends[:-1]).all()):
            raise _damaged(self.folder / "id_ends.bin", "the id ends do not rise from 0 to the "
                           f"{self.manifest['id_bytes']} id bytes of {MANIFEST}")
        width, height, first, end = table.T
        unsized = np.flatnonzero((width <= 0) | (height <= 0))
        if len(unsized):
            raise _damaged(self.folder / "videos.bin", f"video {self._name(unsized[0])} is "
                           f"{width[unsized[0]]}x{height[unsized[0]]} pixels (not positive)")
        outside = np.flatnonzero((first < 0) | (first > end) | (end > self.manifest["frames"]))
        if len(outside):
            raise _damaged(self.folder / "videos.bin", f"video {self._name(outside[0])} has frames "
                           f"{first[outside[0]]}:{end[outside[0]]}, not inside the {self.manifest['frames']} "
                           f"frames of {MANIFEST}")

    def __len__(self) -> int:
        return self.manifest["videos"]

    def _id(self, v: int) -> bytes:
        return self.arrays["ids.bin"][_span(self.arrays["id_ends.bin"], v, v + 1)].tobytes()

    def _name(self, v: int) -> str:
        """Video v's id for a message, also when its bytes are damaged."""
        return repr(self._id(v).decode("utf-8", "replace"))

    def __iter__(self) -> Iterator[str]:
        """The video ids in stored order, decoded in one pass; an id that is not UTF-8 or out of order
        (the search needs them sorted, each once) is an error naming ids.bin."""
        blob, start, previous = self.arrays["ids.bin"].tobytes(), 0, None
        for end in self.arrays["id_ends.bin"].tolist():
            key = blob[start:end]
            if previous is not None and key <= previous:
                raise _damaged(self.folder / "ids.bin", f"video id {key!r} is not after {previous!r} (ids are sorted)")
            try:
                video_id = key.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as error:
                raise _damaged(self.folder / "ids.bin", f"video id {key!r} is not UTF-8 ({error.reason})") from None
            yield video_id
            start, previous = end, key

    def _find(self, video_id: object) -> int | None:
        """The row of `video_id` in the (sorted) video table, by binary search; None if absent."""
        if not isinstance(video_id, str):
            return None
        key, low, high = id_bytes(video_id), 0, len(self)
        while low < high:
            middle = (low + high) // 2
            if self._id(middle) < key:
                low = middle + 1
            else:
                high = middle
        return low if low < len(self) and self._id(low) == key else None

    def __contains__(self, video_id: object) -> bool:
        return self._find(video_id) is not None

    def __getitem__(self, video_id: str) -> PackedVideoDetections:
        v = self._find(video_id)
        if v is None:
            raise KeyError(video_id)
        arrays = self.arrays
        width, height, first, end = arrays["videos.bin"][v].tolist()
        rows = _span(arrays["frame_ends.bin"], first, end)  # the video's boxes
        ends = arrays["frame_ends.bin"][first:end].astype(np.int64) - rows.start
        times = arrays["times.bin"][first:end].astype(np.float64)
        rects = arrays["rects.bin"][rows].astype(np.float32)
        self._check_video(video_id, rows, ends, times, rects)
        # the video's classes renumbered in the order of the (sorted) store names, as `pack` numbers them
        store_classes = arrays["classes.bin"][rows]
        present = np.flatnonzero(self._class_counts(store_classes, video_id))
        renumber = np.zeros(len(self.class_names), dtype=np.int32)
        renumber[present] = np.arange(len(present), dtype=np.int32)
        return PackedVideoDetections(
            width, height, times, ends, rects, arrays["confs.bin"][rows].astype(np.float32),
            renumber[store_classes], [self.class_names[i] for i in present],
        )

    def _check_video(self, video_id: str, rows: slice, ends: np.ndarray, times: np.ndarray, rects: np.ndarray) -> None:
        """What one video read checks, in a few microseconds: its frame ends (`ends`, less `rows.start`) rise
        inside the boxes (else its frames take other frames' boxes), its frame times are finite and sorted
        (the nearest frame is found by bisection) and its boxes finite (a NaN box is dropped from every clip
        without a word)."""
        if rows.start < 0 or rows.stop > self.manifest["boxes"] or (
                len(ends) and (ends[0] < 0 or not (ends[1:] >= ends[:-1]).all())):
            raise _damaged(self.folder / "frame_ends.bin", f"the frame ends of video {video_id!r} do not rise "
                           f"from {rows.start} to {rows.stop} inside the {self.manifest['boxes']} boxes of {MANIFEST}")
        finite_bounds = len(times) == 0 or (math.isfinite(times[0]) and math.isfinite(times[-1]))
        if not (finite_bounds and (times[1:] >= times[:-1]).all()):  # a NaN or infinity between them is out of order
            raise _damaged(self.folder / "times.bin",
                           f"the frame times of video {video_id!r} are not finite and sorted")
        if not np.isfinite(rects).all():
            raise _damaged(self.folder / "rects.bin", f"video {video_id!r} has a box that is not finite")

    def _class_counts(self, classes: np.ndarray, video_id: str | None = None) -> np.ndarray:
        """(len(class_names),) int64: the boxes of each class among `classes` (store indexes, of `video_id`
        if given); an index outside the class names is an error naming classes.bin, checked first: a huge
        one would make bincount allocate that many counts. Read as uint32, a negative index is above every
        count: one pass finds both."""
        count = len(self.class_names)
        if len(classes) and classes.view(np.uint32).max() >= count:
            outside = classes[(classes < 0) | (classes >= count)][0]
            of_video = "" if video_id is None else f" of video {video_id!r}"
            raise _damaged(self.folder / "classes.bin", f"class index {outside}{of_video} is outside the {count} "
                           f"class names of {MANIFEST}")
        return np.bincount(classes, minlength=count)

    def boxes_per_frame_of(self, video_ids: set[str]) -> list[np.ndarray]:
        """(F,) int64 box counts per detected frame of each video of `video_ids` in the store, in one
        ordered pass over the video table (not one search per video)."""
        table, frame_ends = self.arrays["videos.bin"], self.arrays["frame_ends.bin"]
        counts = []
        for v, video_id in enumerate(self):
            if video_id in video_ids:
                first, end = int(table[v, 2]), int(table[v, 3])
                start = _span(frame_ends, first, end).start
                counts.append(np.diff(frame_ends[first:end].astype(np.int64), prepend=start))
        return counts

    def source_changed(self) -> bool:
        """Whether the detections file it was packed from is there and now differs (in size or time)."""
        source = self.manifest.get("source")
        if not isinstance(source, dict) or not isinstance(source.get("path"), str) or not Path(source["path"]).exists():
            return False  # packed from videos given in Python, not from a file
        return source_stamp(source["path"]) != source

    def box_counts_by_class_name(self) -> dict[str, int]:
        """Boxes of each class over all videos (one pass over classes.bin, in chunks)."""
        counts = np.zeros(len(self.class_names), dtype=np.int64)
        classes = self.arrays["classes.bin"]
        for start in range(0, len(classes), CHUNK):
            counts += self._class_counts(classes[start:start + CHUNK])
        return dict(zip(self.class_names, counts.tolist()))


def _span(ends: np.ndarray, first: int, end: int) -> slice:
    """Rows first:end of an ends array (row i ends where row i + 1 starts) as a slice of what they index."""
    start = int(ends[first - 1]) if first > 0 else 0
    return slice(start, int(ends[end - 1]) if end > first else start)


def _damaged(file: Path, problem: str) -> DetectionsError:
    """The error for a store file holding what pack never writes."""
    return DetectionsError(f"{file}: {problem} (a damaged store? pack the detections file again)")


def _read_manifest(folder: Path) -> dict:
    """store.json, checked: format, version, class names (distinct, sorted: pack numbers classes in that
    order) and every array file of the size its counts give."""
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a detections store: it has no {MANIFEST} (stoa-vlp pack makes one)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DetectionsError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DetectionsError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DetectionsError(f"{path}: store version {manifest.get('version')!r}, this stoa-vlp reads version "
                              f"{VERSION}: pack the detections file again")
    odd = [key for key in COUNTS if isinstance(manifest.get(key), bool) or not isinstance(manifest.get(key), int)
           or manifest[key] < 0]
    if odd or not isinstance(manifest.get("class_names"), list):
        raise DetectionsError(f"{path}: {', '.join(odd) or 'class_names'} missing or not valid")
    names = manifest["class_names"]
    if not all(isinstance(name, str) and name for name in names) or names != sorted(set(names)):
        raise _damaged(path, "class_names are not distinct non-empty strings in sorted order")
    for name, (dtype, row, count) in ARRAYS.items():
        expected = manifest[count] * int(np.prod(row, dtype=np.int64)) * np.dtype(dtype).itemsize
        file = folder / name
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size} bytes"
            raise DetectionsError(f"{file} {found}, {expected} expected from {path} (an interrupted copy?)")
    return manifest
