"""Detections cost: the file read into memory, and per sample the stored form read back and the boxes chosen.

File: a detections file of --videos videos (18 detected frames x 20 boxes of 40 classes each) read
with `read_packed_detections` (each video packed as read; what training and evaluation hold)
against `read_detections` (per-frame objects), same run: seconds and bytes per box held (tracemalloc).
Also the file packed by `stoa-vlp pack` into a DetectionsStore and opened with its arrays mapped:
the process holds next to nothing (tracemalloc), the pages read stay in the page cache, one copy for
all processes of the machine.

A sample reads its video's detections from the dataset's SerializedDict (one pickle per video) and
chooses the boxes of its sampled frames (`select_objects`). Timed, same run, on random videos of
F detected frames x n boxes (as `stoa-vlp detect` writes them: 1 fps, up to 50 boxes):
- read: unpickling the video as PackedVideoDetections (a few arrays; what the datasets store) against
  unpickling it as VideoDetections (a list of per-frame objects; what they stored before 2026-11-27),
  and reading it from a DetectionsStore (a search of the ids, slices of mapped arrays);
- choose: `select_objects` on the packed video for 12 sampled frames and K=10 boxes per frame;
- suppress: the cross-class suppression of one frame (`suppress_across_classes`, which stops at K kept
  boxes) against the earlier code (a Python pass over every box, cut to K afterwards), same boxes.
Videos are written and read back as a detections file, so their objects are as `read_detections`
makes them.

    python bench/detections.py
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import tempfile
import time
import timeit
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from stoa_vlp.data.detections import (
    FrameDetections,
    LabelVocab,
    PackedVideoDetections,
    VideoDetections,
    iter_detections,
    read_detections,
    read_packed_detections,
    write_detections,
)
from stoa_vlp.data.detections_store import DetectionsStore, write_detections_store
from stoa_vlp.data.geometry import resize_crop
from stoa_vlp.data.object_targets import select_objects, suppress_across_classes

CLASSES = [f"class{i}" for i in range(80)]


def generated_video(video_id: str, frames: int, boxes: int, classes: list[str], rng: np.random.Generator) -> VideoDetections:
    """`frames` detected frames at 1 fps of a 640x360 video, each with `boxes` random boxes of `classes`."""
    detected = []
    for second in range(frames):
        corners = rng.uniform(0, 300, size=(boxes, 2))
        rects = np.concatenate([corners, corners + rng.uniform(10, 200, size=(boxes, 2))], axis=1)
        rects = np.minimum(rects, [640, 360, 640, 360])  # inside the image, as the reader requires
        names = [classes[i] for i in rng.integers(0, len(classes), boxes)]
        confs = rng.uniform(0.2, 1, boxes)
        detected.append(FrameDetections(float(second), names, rects.astype(np.float32), confs.astype(np.float32)))
    return VideoDetections(video_id, 640, 360, detected)


def random_video(frames: int, boxes: int, rng: np.random.Generator, folder: Path) -> VideoDetections:
    """`generated_video` of any of CLASSES, read back from a detections file."""
    path = folder / "detections.jsonl"
    write_detections(path, [generated_video("video", frames, boxes, CLASSES, rng)])
    return read_detections(path)["video"]


def read_cost(read, path: Path, boxes: int) -> tuple[float, float]:
    """(seconds, bytes per box held) of `read(path)`: time untraced, then memory under tracemalloc."""
    start = time.perf_counter()
    read(path)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    held = read(path)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held
    return seconds, size / boxes


def mapped_store(folder: Path) -> DetectionsStore:
    store = DetectionsStore(folder)
    store.arrays  # maps the files
    return store


def earlier_suppression(boxes: np.ndarray, labels: np.ndarray, confs: np.ndarray, limit: int, iou: float = 0.5):
    """The baseline: the code before 2026-11-27, every box visited in Python, cut to `limit` after."""
    order = np.argsort(-confs, kind="stable")
    overlaps = box_iou(torch.from_numpy(boxes[order]).double(), torch.from_numpy(boxes[order]).double()).numpy()
    kept: list[int] = []
    for rank in range(len(order)):
        if not any(overlaps[rank, k] >= iou and labels[order[k]] != labels[order[rank]] for k in kept):
            kept.append(rank)
    return order[kept][:limit]


def per_call_ms(function, repeat: int) -> float:
    """Best of 5 rounds of `repeat` calls, in ms per call."""
    return min(timeit.repeat(function, number=repeat, repeat=5)) / repeat * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="calls per timed round")
    parser.add_argument("--videos", type=int, default=1000, help="videos in the file read")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp(prefix="stoa_detections_bench_"))
    big = folder / "many.jsonl"
    write_detections(big, (generated_video(f"v{i}", 18, 20, list(rng.choice(CLASSES, 40)), rng) for i in range(args.videos)))
    boxes = args.videos * 18 * 20
    print(f"| read a file of {args.videos} videos ({boxes} boxes) | seconds | bytes per box held |")
    print("|---|---:|---:|")
    for name, read in (("read_detections (per-frame objects)", read_detections),
                       ("read_packed_detections (packed as read)", read_packed_detections)):
        seconds, per_box = read_cost(read, big, boxes)
        print(f"| {name} | {seconds:.2f} | {per_box:.0f} |")
    start = time.perf_counter()
    write_detections_store(folder / "many.store", iter_detections(big))
    packing = time.perf_counter() - start
    seconds, per_box = read_cost(mapped_store, folder / "many.store", boxes)
    print(f"| DetectionsStore (stoa-vlp pack), arrays mapped | {seconds:.2f} | {per_box:.1f} |")
    on_disk = sum(path.stat().st_size for path in (folder / "many.store").iterdir()) / boxes
    print(f"\npacking the file took {packing:.2f} s; the store takes {on_disk:.0f} bytes per box on disk")
    print()
    vocab = LabelVocab(CLASSES)
    geometry = resize_crop(640, 360, 224)
    print("| detected frames x boxes | read VideoDetections (before) ms | read packed ms | speed-up | "
          "read from a store ms | choose 12 frames ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for frames, boxes in ((10, 10), (30, 50), (180, 50), (600, 50)):
        video = random_video(frames, boxes, rng, folder)
        plain, packed = (pickle.dumps(form, protocol=pickle.HIGHEST_PROTOCOL) for form in (video, PackedVideoDetections.pack(video)))
        before = per_call_ms(lambda: pickle.loads(plain), args.repeat)
        after = per_call_ms(lambda: pickle.loads(packed), args.repeat)
        store_folder = folder / f"{frames}x{boxes}.store"
        write_detections_store(store_folder, [video])
        store = DetectionsStore(store_folder)
        from_store = per_call_ms(lambda: store["video"], args.repeat)
        times = np.linspace(0, frames - 1, 12).tolist()
        unpacked = pickle.loads(packed)
        choose = per_call_ms(lambda: select_objects(unpacked, times, geometry, vocab, 10, 20), args.repeat)
        print(f"| {frames} x {boxes} | {before:.3f} | {after:.3f} | {before / after:.0f}x | {from_store:.3f} | "
              f"{choose:.2f} |")
    print("\n| boxes in the frame | earlier code ms | suppress_across_classes, K=10 ms | speed-up |")
    print("|---:|---:|---:|---:|")
    for boxes in (10, 50, 100):
        frame = random_video(1, boxes, rng, folder).frames[0]
        labels = np.array([CLASSES.index(name) for name in frame.classes])
        ours = suppress_across_classes(frame.rects, labels, frame.confs, limit=10)
        assert np.array_equal(ours, earlier_suppression(frame.rects, labels, frame.confs, 10))
        before = per_call_ms(lambda: earlier_suppression(frame.rects, labels, frame.confs, 10), args.repeat * 10)
        after = per_call_ms(lambda: suppress_across_classes(frame.rects, labels, frame.confs, limit=10), args.repeat * 10)
        print(f"| {boxes} | {before:.3f} | {after:.3f} | {before / after:.1f}x |")
    shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
