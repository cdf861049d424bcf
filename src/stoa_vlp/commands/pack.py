"""`stoa-vlp pack`: a detections JSONL file as a store of memory-mapped arrays."""

from __future__ import annotations

import argparse

HELP = "pack a detections JSONL file into a memory-mapped store (for large pre-training sets)"
EXAMPLES = """examples:
  stoa-vlp pack detections.jsonl.gz --out detections.store
  stoa-vlp pretrain --config base --set data.detections=detections.store ...

Training reads a detections JSONL file whole into every rank (about 33 bytes per box: some 30 GB
per rank for WebVid-2.5M detected densely). A store folder given as data.detections is mapped into
memory instead: each process reads only the pages its samples touch, and a machine's ranks and data
workers share one copy in the page cache. The file is read video by video, never whole.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("detections", help="detections JSONL file (.jsonl or .jsonl.gz)")
    parser.add_argument("--out", required=True, help="store folder to create (must not exist)")


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    from pathlib import Path

    from stoa_vlp.data.detections import iter_detections
    from stoa_vlp.data.detections_store import source_stamp, write_detections_store

    def stop(number, _frame):
        """A kill (a job's time limit, a pre-emption) unwinds as an exception, so that the partly written
        store (tens of GB for a large set) is removed; a repeated one must not interrupt that."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + number)

    signal.signal(signal.SIGTERM, stop)
    videos = iter_detections(args.detections)  # checks that the file exists, before its stamp is taken
    manifest = write_detections_store(args.out, videos, source_stamp(args.detections))
    size = sum(path.stat().st_size for path in Path(args.out).iterdir())
    print(f"{manifest['videos']} videos, {manifest['frames']} frames, {manifest['boxes']} boxes of "
          f"{len(manifest['class_names'])} classes packed into {args.out} ({size / 1e6:.1f} MB)")
    return 0
