"""Finding videos on disk: video files, whose id is the file name's stem, and frame folders (folders
holding frame images, `decode.is_frame_image`, and no video file), whose id is the folder's name.

`find_videos` lists a collection for `prepare`, `detect` and `index`, and refuses two videos with one
id. `VideoLookup` finds the videos an annotation file names under its video root; there only an id
that is actually asked for must be unambiguous.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from stoa_vlp.data.decode import is_frame_image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".m2ts",
                    ".mts")


def is_video_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def holds_frames(names: Iterable[str]) -> bool:
    """Whether a folder of these file names is a frame folder: images and no video file (a poster image
    beside videos does not make their folder one video)."""
    names = list(names)
    return any(map(is_frame_image, names)) and not any(map(is_video_file, names))


def videos_below(root: str | Path) -> Iterator[tuple[str, str]]:
    """(video id, path) of every video file and frame folder below `root`, in sorted path order.
    `root` itself is not a frame folder here; ids may repeat."""
    root = str(root)
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        if folder != root and holds_frames(names):
            yield os.path.basename(folder), folder
        for name in sorted(names):
            if is_video_file(name):
                yield os.path.splitext(name)[0], os.path.join(folder, name)


def find_videos(inputs: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(video id, path) sorted by id, of the video files and frame folders given and of every one below
    the other folders given. A ValueError names the paths of an id found twice or an input that does
    not exist."""
    found: dict[str, str] = {}
    for item in map(Path, inputs):
        if item.is_dir() and holds_frames(os.listdir(item)):
            videos = [(item.name, str(item))]
        elif item.is_dir():
            videos = list(videos_below(item))
        elif item.exists():
            videos = [(item.stem, str(item))]
        else:
            raise FileNotFoundError(f"{item} does not exist")
        for video_id, path in videos:
            if video_id in found:
                raise ValueError(f"two videos share the id '{video_id}': {found[video_id]} and {path}")
            found[video_id] = path
    return sorted(found.items())


class VideoLookup:
    """The videos below a root by id: a video file's stem or exact file name, or a frame folder's name."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._paths: dict[str, list[str]] = {}  # id or file name -> every path it names
        for video_id, path in videos_below(self.root):
            self._paths.setdefault(video_id, []).append(path)
            name = os.path.basename(path)
            if name != video_id:
                self._paths.setdefault(name, []).append(path)

    def get(self, video_id: str) -> str | None:
        """The one path `video_id` names, None if none; a ValueError when it names several."""
        paths = self._paths.get(video_id, [])
        if len(paths) > 1:
            raise ValueError(f"video '{video_id}' is ambiguous under {self.root}: {', '.join(paths)}")
        return paths[0] if paths else None
