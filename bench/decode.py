"""Decoding throughput: clips/s per core of `decode_clip` against naive PyAV baselines, same run.

Generates 10 s clips (30 fps, 480x360 like web video, moving shapes plus noise, libx264 veryfast crf 23, no
scene-cut keyframes) at two keyframe intervals, re-encodes one with `stoa-vlp prepare` settings
(defaults: 2 fps, short side 256, every frame a keyframe, crf 28, x264 tune fastdecode; and the
same at crf 26 and 23), then times, for 8 and 12 uniformly sampled frames:
- stoa-vlp `decode_clip` (GOP skipping, non-reference frames skipped, wanted frames to RGB),
- naive: decode every frame and convert every frame to RGB, then pick the wanted ones,
- sequential: decode every frame, convert only the wanted ones (a fairer hand-written baseline).
Then the whole frame path of a sample on the prepared clip, 12 frames: decode + Resize/CenterCrop
224 to uint8 (the model normalises on its device), against the same plus CLIP normalisation to
float32 on the CPU (the data pipeline before 2026-11-27), in the same rounds.
Every clip is opened from scratch; decoders use 1 thread; malloc keeps freed memory (as in the
data-loading processes, `keep_freed_memory`) for every method. Run pinned to one core:

    taskset -c 0 .venv/bin/python bench/decode.py

Rates are clips per CPU-second of this process (time.process_time), i.e. per core, so that
other processes sharing the core do not count; methods run in interleaved rounds (best round
kept) so that cache and frequency effects of such load hit all alike. Ratios are the result;
absolute rates vary with the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.transforms import v2

from stoa_vlp.data.dataset import keep_freed_memory
from stoa_vlp.data.decode import decode_clip, segment_indices
from stoa_vlp.data.prepare import PrepareOptions, encode_video, prepare_one
from stoa_vlp.data.transforms import FrameTransform
from stoa_vlp.model.towers import CLIP_MEAN, CLIP_STD


def synthetic_frames(seconds: float, fps: int, width: int, height: int, seed: int = 0):
    """Moving discs on a gradient with mild noise: compresses like simple real footage."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack([xs * 200 // width, ys * 200 // height, np.full_like(xs, 90)], axis=-1).astype(np.int16)
    for index in range(int(seconds * fps)):
        image = background.copy()
        for k, colour in enumerate(((255, 40, 40), (40, 255, 40), (40, 40, 255))):
            cx = (index * (3 + k) + 60 * k) % width
            cy = height // 2 + int(60 * np.sin(index / (10 + 5 * k)))
            image[(xs - cx) ** 2 + (ys - cy) ** 2 < (18 + 6 * k) ** 2] = colour
        image += rng.integers(-8, 9, image.shape, dtype=np.int16)
        yield np.clip(image, 0, 255).astype(np.uint8)


def naive(path: str, frames: int) -> np.ndarray:
    with av.open(path) as container:
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([images[i] for i in segment_indices(len(images), frames, "uniform")])


def sequential(path: str, frames: int) -> np.ndarray:
    with av.open(path) as container:
        stream = container.streams.video[0]
        count = stream.frames
        wanted = set(segment_indices(count, frames, "uniform").tolist())
        images = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                images[index] = frame.to_ndarray(format="rgb24")
    return np.stack([images[i] for i in segment_indices(count, frames, "uniform")])


def ours(path: str, frames: int) -> torch.Tensor:
    return decode_clip(path, frames, "uniform").frames


def timed_rounds(methods: dict, path: str, frames: int, rounds: int, seconds: float) -> dict[str, float]:
    """Best clips per CPU-second per method over interleaved rounds of about `seconds` CPU time."""
    best = dict.fromkeys(methods, 0.0)
    for _ in range(rounds):
        for name, method in methods.items():
            count, start = 0, time.process_time()
            while time.process_time() - start < seconds:
                method(path, frames)
                count += 1
            best[name] = max(best[name], count / (time.process_time() - start))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.3, help="CPU seconds of one timed round per method")
    parser.add_argument("--workdir", default=None, help="where clips are written (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = keep_freed_memory()  # as data-loading processes do (data.keep_freed_memory), for all methods
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stoa_decode_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    if cores != 1:
        print(f"warning: running on {cores} cores; pin to one with `taskset -c 0`", file=sys.stderr)

    clips = {}
    for label, keyframe_seconds in (("raw, GOP 250 (8.3 s)", 250 / 30), ("raw, GOP 30 (1 s)", 1.0)):
        path = workdir / f"gop{int(keyframe_seconds * 30)}.mp4"
        encode_video(path, synthetic_frames(10, 30, 480, 360), 30, keyframe_seconds, crf=23, preset="veryfast")
        clips[label] = str(path)
    for label, options in (
        ("prepared (defaults: 2 fps, short side 256, all keyframes, crf 28)", PrepareOptions()),
        ("prepared as above but crf 26", PrepareOptions(crf=26)),
        ("prepared as above but crf 23", PrepareOptions(crf=23)),
    ):
        prepared = prepare_one("prep", clips["raw, GOP 30 (1 s)"], str(workdir / f"prepared{options.crf}.mp4"), options)
        assert prepared.status == "ok", prepared.error
        clips[label] = prepared.output
    default_prepared = next(path for label, path in clips.items() if "defaults" in label)

    methods = {"stoa-vlp": ours, "naive (all to RGB)": naive, "sequential (wanted to RGB)": sequential}
    transform = FrameTransform(224)
    rows = []
    for label, path in clips.items():
        size_kb = os.path.getsize(path) / 1024
        for frames in (8, 12):
            rates = timed_rounds(methods, path, frames, args.rounds, args.seconds)
            rows.append((label, size_kb, frames, rates))
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])
    sample_paths = {
        "uint8": lambda p, t: transform(ours(p, t)),
        "float32": lambda p, t: normalise(transform(ours(p, t))),
    }
    full = timed_rounds(sample_paths, default_prepared, 12, args.rounds, args.seconds)

    print(f"\nclips per CPU-second on {cores} core(s), best of {args.rounds} interleaved rounds of {args.seconds}s"
          f"{', malloc keeps freed memory' if kept else ''}\n")
    print("| clip | size | frames | stoa-vlp | naive | sequential | stoa-vlp / naive | stoa-vlp / sequential |")
    print("|---|---|---|---|---|---|---|---|")
    for label, size_kb, frames, rates in rows:
        a, n, s = rates["stoa-vlp"], rates["naive (all to RGB)"], rates["sequential (wanted to RGB)"]
        print(f"| {label} | {size_kb:.0f} KB | {frames} | {a:.1f} | {n:.1f} | {s:.1f} | {a / n:.2f}x | {a / s:.2f}x |")
    print("\nprepared clip (defaults), 12 frames, decode + Resize/CenterCrop 224:")
    print(f"  to uint8 (the model normalises on its device): {full['uint8']:.1f} clips/s")
    print(f"  + CLIP normalisation to float32 on the CPU (before 2026-11-27): {full['float32']:.1f} clips/s "
          f"({full['uint8'] / full['float32']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
