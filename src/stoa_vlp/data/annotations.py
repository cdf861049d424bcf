"""Annotation readers: every supported format becomes a list of `VideoRecord`.

Formats (README: Annotation formats), with the file `path` points at:
- msrvtt: CLIP4Clip's `MSRVTT_data.json` ({"videos": [{"video_id", "split"}], "sentences":
  [{"video_id", "caption"}]}), split train / val ("validate" in the file) / test;
  `MSRVTT_train.9k.csv` (column video_id; captions from MSRVTT_data.json beside it);
  `MSRVTT_JSFUSION_test.csv` (columns key, vid_key, video_id, sentence: one caption per video).
- msvd: `raw-captions.pkl` ({video_id: [[word, ...], ...]}) with `<split>_list.txt` beside it.
- didemo: CLIP4Clip's `<split>_data.json` (list of {"video", "description", "times"}) with
  `<split>_list.txt` beside it when present. Paragraph mode (format "didemo", as CLIP4Clip):
  one record per video, its sentences joined in file order, seconds 0 to 30. Format
  "didemo-moments": one record per sentence with the annotators' mean 5-second segment times.
- lsmdc: `LSMDC16_annos_*.csv`, tab-separated clip_id, start/end aligned, start/end extracted,
  sentence (no header); one record per clip id collecting its sentences.
- webvid: CSV with header including videoid, name and page_dir; video at <root>/<page_dir>/<videoid>.mp4.
- webdataset: video2dataset shards (`.tar`, a brace range `{00000..00099}.tar`, a folder of
  them, or a `.shards` list file): members <key>.mp4 with <key>.txt or <key>.json ("caption");
  the .txt is preferred. As in webdataset, a member's key is its path up to the first dot of its
  file name, without a leading "./" (`split_member_name`). The video id is the key's file name
  ("part0/0001" -> "0001", `shard_video_id`): the stem `stoa-vlp detect` gives the extracted
  video. Record path is "<shard>::<key>".
- jsonl: one {"video_id", "video", "caption"} per line ("caption" may be a list; "start"/"end"
  optional); lines with the same video_id and the same start/end merge their captions, other
  times of one video_id are records of their own (segments, as in didemo-moments).

Captions are whitespace-normalised (`clean_caption`), as the tag cache keys them.
Video files are found under `video_root` (default: a `videos` folder beside the annotation file
if there is one, else its folder) by file name stem, in any video extension, searching subfolders;
readers of captions only (`captions_only=True`, as `stoa-vlp tag`) look for none, so videos that are
missing or ambiguous there do not concern them.
Empty captions, and videos left without a caption, are dropped with a warning naming file and line
(errors with strict=True, as evaluation reads its splits);
structural problems (malformed JSON, missing columns, text that is not UTF-8, fields of the wrong
type, clip times that are not finite, negative or not increasing) are always errors naming file and
line (or item). A clip listed more than once (same video id, start and end) is kept, with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from stoa_vlp.data.jsonl import is_finite_number, non_empty_string, one_line, open_text, read_jsonl, shown
from stoa_vlp.data.video_files import VideoLookup

log = logging.getLogger(__name__)

FORMATS = ("msrvtt", "msvd", "didemo", "didemo-moments", "lsmdc", "webvid", "webdataset", "jsonl")
SPLITS = ("train", "val", "test")


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and, where known, the line."""


class SplitNeededError(AnnotationError):
    """A file that holds several splits was read without naming one."""


class SplitMissingError(AnnotationError):
    """The split asked for is not there (MSVD's `<split>_list.txt` does not exist)."""


@dataclass
class VideoRecord:
    video_id: str
    path: str  # video file, or "<shard.tar>::<key>" for WebDataset shards
    start: float | None = None  # seconds; None = from the beginning
    end: float | None = None  # seconds; None = to the end
    captions: list[str] = field(default_factory=list)


def existing_annotations(path: str | Path) -> Path:
    """`path` as a Path; an AnnotationError if it does not exist (a shard brace range need not)."""
    path = Path(path)
    if not path.exists() and "{" not in str(path):
        raise AnnotationError(f"{path}: annotation file does not exist")
    return path


def detect_format(path: str | Path) -> str:
    """The format of an annotation file from its name (see the module docstring): an extension only
    one format uses first, then the dataset's name, then the other extensions."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir() or name.endswith(".tar") or name.endswith(".shards") or "{" in str(path):
        return "webdataset"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.startswith("msrvtt"):
        return "msrvtt"
    if name == "raw-captions.pkl":
        return "msvd"
    if name.endswith("_data.json"):
        return "didemo"
    if name.startswith("lsmdc"):
        return "lsmdc"
    if name.endswith(".csv"):
        return "webvid"
    raise AnnotationError(f"{path}: cannot tell the annotation format from the name; set data.format")


def clean_caption(text: str) -> str:
    """A caption with its whitespace runs made single spaces and its ends stripped: the form every
    reader returns and the tag cache (`stoa-vlp tag`) is keyed by."""
    return " ".join(text.split())


def _list(value, name: str, where: str) -> list:
    """`value` of field `name`, which must be a list."""
    if not isinstance(value, list):
        raise AnnotationError(f"{where}: {name} must be a list, got {shown(value)}")
    return value


def _check_window(start: float | None, end: float | None, where: str) -> None:
    """A clip starts at 0 s or later and ends after it starts (None: the video's start or end)."""
    if start is not None and start < 0:
        raise AnnotationError(f"{where}: start {start} is negative")
    if end is not None and end <= (start or 0):
        raise AnnotationError(f"{where}: end {end} is not after start {start or 0}")


def _caption_string(caption, where: str) -> str:
    if not isinstance(caption, str):
        raise AnnotationError(f"{where}: caption is not a string ({caption!r})")
    return caption


class _Captions:
    """Collects captions per video, dropping (or refusing) empty ones with file:line."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.dropped: list[str] = []

    def clean(self, caption, where: str) -> str | None:
        text = clean_caption(_caption_string(caption, where))
        if text:
            return text
        if self.strict:
            raise AnnotationError(f"{where}: empty caption")
        self.dropped.append(where)
        return None

    def report(self, path: Path) -> None:
        if self.dropped:
            log.warning(
                "%s: dropped %d empty captions (first at %s)", path, len(self.dropped), self.dropped[0]
            )


class _VideoFiles:
    """The videos under a root by id (`VideoLookup`), counting the ids that are not found."""

    def __init__(self, root: Path, annotation_file: Path):
        self.root = root
        self.annotation_file = annotation_file
        self.videos = VideoLookup(root)
        self.missing: list[str] = []

    def path(self, video_id: str) -> str:
        try:
            found = self.videos.get(video_id)
        except ValueError as error:
            raise AnnotationError(f"{self.annotation_file}: {error}") from None
        if found is None:
            self.missing.append(video_id)
            return str(self.root / (video_id if os.path.splitext(video_id)[1] else f"{video_id}.mp4"))
        return found

    def report(self, count: int) -> None:
        """Log (info) how many videos are not there: their readers say what it means (training leaves
        them out with a warning, evaluation refuses them, prepare fails them in its manifest)."""
        if self.missing:
            log.info("%d of %d videos not found under %s (e.g. %s)", len(self.missing), count, self.root,
                     self.missing[0])


def _json(path: Path):
    try:
        with open_text(path, AnnotationError) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None


def _need_split(split: str | None, path: Path) -> str:
    if split not in SPLITS:
        raise SplitNeededError(f"{path}: this format needs split to be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _id_list(path: Path) -> list[str]:
    if not path.exists():
        raise SplitMissingError(f"{path}: split list not found")
    with open_text(path, AnnotationError) as handle:
        return [line.strip() for line in handle if line.strip()]


def _csv_rows(path: Path, required: tuple[str, ...], delimiter: str = ",") -> list[tuple[int, dict]]:
    """(line number, row) per row; a row too short to hold every `required` column is an error."""
    with open_text(path, AnnotationError, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
        rows = [(reader.line_num, row) for row in reader]
    for line, row in rows:
        short = [column for column in required if row[column] is None]
        if short:
            raise AnnotationError(f"{path}:{line}: too few fields, no {', '.join(short)}")
    return rows


def _check_msrvtt_data(data, path: Path) -> None:
    if not isinstance(data, dict) or "sentences" not in data or "videos" not in data:
        raise AnnotationError(f"{path}: expected an object with 'videos' and 'sentences'")


def _msrvtt_sentences(data: dict, path: Path, captions: _Captions, wanted: list[str]) -> dict[str, list[str]]:
    """The captions of the `wanted` videos (those of other splits are only checked to be strings: an
    empty one is not this split's problem)."""
    wanted = set(wanted)
    by_video: dict[str, list[str]] = defaultdict(list)
    for number, sentence in enumerate(_list(data["sentences"], "sentences", str(path))):
        where = f"{path}: sentences[{number}]"
        if not isinstance(sentence, dict) or "video_id" not in sentence or "caption" not in sentence:
            raise AnnotationError(f"{where}: needs video_id and caption")
        video_id = non_empty_string(sentence["video_id"], "video_id", where, AnnotationError)
        if video_id not in wanted:
            _caption_string(sentence["caption"], where)
            continue
        text = captions.clean(sentence["caption"], where)
        if text:
            by_video[video_id].append(text)
    return by_video


def _msrvtt_split_ids(data: dict, path: Path, file_split: str) -> list[str]:
    """The video ids of `data["videos"]` whose split is `file_split` ("train", "validate", "test")."""
    ids = []
    for number, video in enumerate(_list(data["videos"], "videos", str(path))):
        where = f"{path}: videos[{number}]"
        if not isinstance(video, dict):
            raise AnnotationError(f"{where}: expected an object with video_id and split, got {shown(video)}")
        video_id = non_empty_string(video.get("video_id"), "video_id", where, AnnotationError)
        if non_empty_string(video.get("split"), "split", where, AnnotationError) == file_split:
            ids.append(video_id)
    return ids


def _read_msrvtt(path: Path, split: str | None, captions: _Captions) -> list[tuple[str, list[str], None, None]]:
    name = path.name.lower()
    if name.endswith(".json"):
        split = _need_split(split, path)
        data = _json(path)
        _check_msrvtt_data(data, path)
        file_split = {"train": "train", "val": "validate", "test": "test"}[split]
        ids = _msrvtt_split_ids(data, path, file_split)
        by_video = _msrvtt_sentences(data, path, captions, ids)
        return [(video_id, by_video.get(video_id, []), None, None) for video_id in ids]
    if "jsfusion" in name:
        rows = _csv_rows(path, ("video_id", "sentence"))
        items = []
        for line, row in rows:
            video_id = non_empty_string(row["video_id"], "video_id", f"{path}:{line}", AnnotationError)
            text = captions.clean(row["sentence"], f"{path}:{line}")
            items.append((video_id, [text] if text else [], None, None))
        return items
    rows = _csv_rows(path, ("video_id",))
    data_path = path.parent / "MSRVTT_data.json"
    if not data_path.exists():
        raise AnnotationError(f"{path}: needs MSRVTT_data.json beside it for the captions")
    data = _json(data_path)
    _check_msrvtt_data(data, data_path)
    ids = [non_empty_string(row["video_id"], "video_id", f"{path}:{line}", AnnotationError) for line, row in rows]
    by_video = _msrvtt_sentences(data, data_path, captions, ids)
    return [(video_id, by_video.get(video_id, []), None, None) for video_id in ids]


def _read_msvd(path: Path, split: str | None, captions: _Captions):
    split = _need_split(split, path)
    ids = _id_list(path.parent / f"{split}_list.txt")
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle)
    except Exception as error:  # unpickling can raise anything: a missing class, a bad opcode, ...
        raise AnnotationError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    if not isinstance(raw, dict):
        raise AnnotationError(f"{path}: expected a dict {{video_id: [[word, ...], ...]}}, got {type(raw).__name__}")
    items = []
    for video_id in ids:
        if video_id not in raw:
            raise AnnotationError(f"{path}: video '{video_id}' of {split}_list.txt has no captions")
        texts = []
        for number, words in enumerate(_list(raw[video_id], "captions", f"{path}: {video_id}")):
            where = f"{path}: {video_id}[{number}]"
            text = captions.clean(_msvd_sentence(words, where), where)
            if text:
                texts.append(text)
        items.append((video_id, texts, None, None))
    return items


def _msvd_sentence(words, where: str):
    """One MSVD caption: its list of words joined (anything else is left for `_Captions.clean` to judge)."""
    if not isinstance(words, (list, tuple)):
        return words
    if not all(isinstance(word, str) for word in words):
        raise AnnotationError(f"{where}: words must be strings, got {shown(words)}")
    return " ".join(words)


def _read_didemo(path: Path, captions: _Captions, paragraph: bool):
    data = _json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of {{video, description, times}}")
    split_name = path.name[: -len("_data.json")]
    list_path = path.parent / f"{split_name}_list.txt"
    keep = set(_id_list(list_path)) if list_path.exists() else None
    paragraphs: dict[str, list[str]] = {}
    items = []
    for number, entry in enumerate(data):
        where = f"{path}: [{number}]"
        if not isinstance(entry, dict) or not {"video", "description", "times"} <= entry.keys():
            raise AnnotationError(f"{where}: needs video, description and times")
        video_id = non_empty_string(entry["video"], "video", where, AnnotationError)
        if keep is not None and video_id not in keep:
            continue
        text = captions.clean(entry["description"], where)
        if paragraph:
            paragraphs.setdefault(video_id, [])
            if text:
                paragraphs[video_id].append(text)
            continue
        items.append((video_id, [text] if text else [], *_didemo_moment(entry["times"], where)))
    if paragraph:
        items = [(video_id, [" ".join(texts)] if texts else [], 0.0, 30.0) for video_id, texts in paragraphs.items()]
    return items


def _didemo_moment(times, where: str) -> tuple[float, float]:
    """(start, end) seconds of a DiDeMo moment from its annotators' [start, end] 5-second segment
    numbers: start mean * 5, (end mean + 1) * 5."""
    pairs = isinstance(times, list) and times and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(is_finite_number(t) for t in pair) for pair in times
    )
    if not pairs:
        raise AnnotationError(
            f"{where}: times must be a list of [start, end] segment number pairs, got {shown(times)}"
        )
    start = 5.0 * sum(pair[0] for pair in times) / len(times)
    end = 5.0 * (sum(pair[1] for pair in times) / len(times) + 1)
    _check_window(start, end, where)
    return start, end


def _read_lsmdc(path: Path, captions: _Captions):
    by_clip: dict[str, list[str]] = {}
    with open_text(path, AnnotationError) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 6:
                raise AnnotationError(f"{path}:{number}: expected 6 tab-separated fields, got {len(fields)}")
            clip_id, sentence = fields[0], fields[5]
            texts = by_clip.setdefault(clip_id, [])
            text = captions.clean(sentence, f"{path}:{number}")
            if text:
                texts.append(text)
    return [(clip_id, texts, None, None) for clip_id, texts in by_clip.items()]


def _seconds(entry: dict, name: str, where: str) -> float | None:
    value = entry.get(name)
    if value is not None and not is_finite_number(value):
        raise AnnotationError(f"{where}: {name} must be a number of seconds or null, got {value!r}")
    return value


def _jsonl_video_id(value, where: str) -> str:
    """A JSONL line's video_id: a non-empty string, or an integer (numeric ids, as WebVid's)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return non_empty_string(value, "video_id", where, AnnotationError)


def _read_jsonl(path: Path, captions: _Captions):
    """One item per (video_id, start, end), in first-seen order, with the captions of its lines."""
    segments: dict[tuple[str, float | None, float | None], tuple[str, list[str]]] = {}
    for number, entry in read_jsonl(path, AnnotationError):
        where = f"{path}:{number}"
        if not isinstance(entry, dict) or "video_id" not in entry or "caption" not in entry:
            raise AnnotationError(f"{where}: needs video_id and caption")
        video_id = _jsonl_video_id(entry["video_id"], where)
        start, end = _seconds(entry, "start", where), _seconds(entry, "end", where)
        _check_window(start, end, where)
        video = non_empty_string(entry.get("video", video_id), "video", where, AnnotationError)
        video, texts = segments.setdefault((video_id, start, end), (video, []))
        given = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        texts.extend(text for text in (captions.clean(t, where) for t in given) if text)
    return [(video_id, texts, start, end, video) for (video_id, start, end), (video, texts) in segments.items()]


def _read_webvid(path: Path, captions: _Captions):
    rows = _csv_rows(path, ("videoid", "name", "page_dir"))
    items = []
    for line, row in rows:
        video_id = non_empty_string(row["videoid"], "videoid", f"{path}:{line}", AnnotationError)
        text = captions.clean(row["name"], f"{path}:{line}")
        relative = os.path.join(row["page_dir"], f"{video_id}.mp4")
        items.append((video_id, [text] if text else [], None, None, relative))
    return items


def _expand_braces(pattern: str) -> list[str]:
    """webdataset-style shard ranges: "data/{00000..00002}.tar" -> three names, zero padding kept."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = [f"{head}{n:0{len(first)}d}{tail}" for n in range(int(first), int(last) + 1)]
    return [expanded for name in names for expanded in _expand_braces(name)]


def shard_list(path: Path) -> list[str]:
    """WebDataset shards named by a .tar, a brace range ("{00000..00099}.tar"), a folder of .tar
    files, or a text file (*.shards) listing one shard per line."""
    if "{" in str(path):
        shards = _expand_braces(str(path))
    elif path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    elif path.name.endswith(".tar"):
        shards = [str(path)]
    else:
        shards = [str(path.parent / line) for line in _id_list(path)]
    if not shards:
        raise AnnotationError(f"{path}: no .tar shards found")
    missing = [shard for shard in shards if not os.path.exists(shard)]
    if missing:
        raise AnnotationError(f"{path}: {len(missing)} of {len(shards)} shards do not exist (e.g. {missing[0]})")
    return shards


def unreadable_shard(shard: str, error: Exception) -> str:
    """The one-line message for a shard that tarfile cannot read (its messages may span lines)."""
    return f"{shard}: not a readable tar shard ({one_line(error)})"


CAPTION_EXTENSIONS = ("txt", "json")  # shard members that may hold a caption, the preferred first


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a shard member, split as webdataset does at the first dot of the file
    name, without a leading "./": "./part0/0001.mp4" -> ("part0/0001", "mp4")."""
    folder, _, file_name = name.removeprefix("./").rpartition("/")
    stem, _, extension = file_name.partition(".")
    return f"{folder}/{stem}" if folder else stem, extension


def shard_video_id(key: str) -> str:
    """The video id of a shard key: its file name, "part0/0001" -> "0001" (the stem `stoa-vlp
    detect` and the other readers give the video once extracted), so detections are found by it."""
    return key.rpartition("/")[2]


def shard_caption(shard: str, members: dict[str, tuple[str, bytes]]) -> str | None:
    """The cleaned caption of one shard key from its caption members ({extension: (member name,
    data)}): the .txt, else the .json's "caption"; None when it has neither. A .json that is
    malformed or has no "caption" string is an AnnotationError naming shard::member."""
    if "txt" in members:
        name, data = members["txt"]
        try:
            return clean_caption(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise AnnotationError(f"{shard}::{name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if "json" not in members:
        return None
    name, data = members["json"]
    try:
        values = json.loads(data)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{shard}::{name}: malformed JSON ({error.msg})") from None
    if not isinstance(values, dict) or not isinstance(values.get("caption"), str):
        raise AnnotationError(f"{shard}::{name}: no .txt caption and the JSON has no 'caption' string")
    return clean_caption(values["caption"])


def _read_webdataset(path: Path, captions: _Captions):
    items = []
    without_video: list[str] = []  # "<shard>::<key>" of caption members with no video
    for shard in shard_list(path):
        caption_members: dict[str, dict[str, tuple[str, bytes]]] = defaultdict(dict)  # key -> extension -> member
        video_keys: list[str] = []
        try:
            with tarfile.open(shard) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = split_member_name(member.name)
                    if extension in CAPTION_EXTENSIONS:
                        caption_members[key][extension] = (member.name, archive.extractfile(member).read())
                    elif extension == "mp4":
                        video_keys.append(key)
        except tarfile.TarError as error:
            raise AnnotationError(unreadable_shard(shard, error)) from None
        without_video += [f"{shard}::{key}" for key in sorted(caption_members.keys() - set(video_keys))]
        for key in video_keys:
            raw = shard_caption(shard, caption_members.get(key, {}))
            text = captions.clean(raw, f"{shard}::{key}") if raw is not None else None
            items.append((shard_video_id(key), [text] if text else [], None, None, f"{shard}::{key}"))
    if without_video:
        log.warning("%s: %d captions have no .mp4 member and are left out (e.g. %s)",
                    path, len(without_video), without_video[0])
    return items


def repeated_clips(records: list[VideoRecord]) -> dict[tuple[str, float | None, float | None], int]:
    """{clip (video id, start, end): records listing it} of the clips listed more than once. Moments of
    one video at other times are other clips."""
    counts = Counter((record.video_id, record.start, record.end) for record in records)
    return {clip: count for clip, count in counts.items() if count > 1}


def video_is_there(record: VideoRecord) -> bool:
    """Whether the video a record points to exists (a member of WebDataset shards is not looked for)."""
    return "::" in record.path or os.path.exists(record.path)


def require_video_files(records: list[VideoRecord], source: str | Path) -> None:
    """AnnotationError naming `source` when videos its records point to do not exist (`video_is_there`):
    evaluation never skips a video, so it would fail at it."""
    missing = sorted({record.video_id for record in records if not video_is_there(record)})
    if missing:
        videos = len({record.video_id for record in records})
        raise AnnotationError(f"{source}: {len(missing)} of {videos} videos not found (e.g. {', '.join(missing[:3])})")


def leave_out_missing_videos(records: list[VideoRecord], source: str | Path) -> list[VideoRecord]:
    """The training `records` whose video exists (`video_is_there`), the others left out with a warning
    naming `source`; AnnotationError when none is left (a wrong data.video_root). A video that is not
    there is known before the first step, so it is not drawn and skipped against data.max_bad_samples,
    which is left for videos that cannot be read: lists of web videos name many that are no longer
    online."""
    present = [record for record in records if video_is_there(record)]
    if len(present) == len(records):
        return records
    missing = sorted({record.video_id for record in records} - {record.video_id for record in present})
    videos = len({record.video_id for record in records})
    if not present:
        raise AnnotationError(f"{source}: none of its {videos} videos found (e.g. {', '.join(missing[:3])})")
    log.warning("%s: %d of %d videos not found (e.g. %s): training leaves out their %d records",
                source, len(missing), videos, ", ".join(missing[:3]), len(records) - len(present))
    return present


def clip_name(video_id: str, start: float | None, end: float | None) -> str:
    """'video7', or 'video7 [2.0-9.5 s]' for a part of it."""
    if start is None and end is None:
        return video_id
    return f"{video_id} [{'' if start is None else start}-{'' if end is None else end} s]"


def _warn_repeated_clips(path: Path, records: list[VideoRecord]) -> None:
    """Warn when a clip is listed more than once: each copy is a record, so evaluation would count it
    as several videos."""
    repeated = repeated_clips(records)
    if repeated:
        log.warning("%s: %d clips are listed more than once (%d extra records; e.g. %s)", path, len(repeated),
                    sum(repeated.values()) - len(repeated), ", ".join(clip[0] for clip in list(repeated)[:3]))


def _video_location(item: tuple, root: Path, files: _VideoFiles | None) -> str:
    """Where the video of a reader's item is: the file the item names (jsonl, webvid and webdataset
    items; relative to `root`), else the one `files` finds by the item's id or, where that named file
    does not exist, by its file name."""
    if len(item) < 5:
        return files.path(item[0])
    given = item[4]
    location = given if "::" in given or os.path.isabs(given) else str(root / given)
    if files is not None and not os.path.exists(location):
        location = files.path(os.path.basename(given))
    return location


_counts_logged: dict[tuple[str, str, str | None], tuple[int, int]] = {}  # (file, format, split) -> counts said


def read_annotations(
    path: str | Path,
    format: str = "auto",
    split: str | None = None,
    video_root: str | Path | None = None,
    strict: bool = False,
    captions_only: bool = False,
) -> list[VideoRecord]:
    """Read an annotation file of any supported format into VideoRecords (videos without a
    usable caption are dropped with a warning; with `strict`, as evaluation reads, an error). With `captions_only`, no video file is looked for
    and every record's path is "": searching the video root for each id costs a walk of its tree
    and fails where two files share an id (raw and prepared copies side by side), which a reader
    of captions should not."""
    path = existing_annotations(path)
    format = detect_format(path) if format == "auto" else format
    if format not in FORMATS:
        raise AnnotationError(f"unknown annotation format '{format}' (known: {', '.join(FORMATS)})")
    captions = _Captions(strict)
    items = _read_items(path, format, split, captions)
    captions.report(path)
    root = _video_root(path, video_root)
    looked_up = not captions_only and format not in ("webdataset", "webvid")
    files = _VideoFiles(root, path) if looked_up else None
    records, without = _captioned_records(items, root, files, captions_only)
    _leave_out_uncaptioned(path, format, without, strict)
    _warn_repeated_clips(path, records)
    if files is not None:
        files.report(len(records))
    _log_counts(path, format, split, records)
    return records


def _read_items(path: Path, format: str, split: str | None, captions: _Captions) -> list[tuple]:
    """The reader's items of `path` in `format`: (video id, captions, start, end[, video file])."""
    if format == "msrvtt":
        return _read_msrvtt(path, split, captions)
    if format == "msvd":
        return _read_msvd(path, split, captions)
    if format in ("didemo", "didemo-moments"):
        return _read_didemo(path, captions, paragraph=format == "didemo")
    if format == "lsmdc":
        return _read_lsmdc(path, captions)
    if format == "jsonl":
        return _read_jsonl(path, captions)
    if format == "webdataset":
        return _read_webdataset(path, captions)
    return _read_webvid(path, captions)


def _video_root(path: Path, video_root: str | Path | None) -> Path:
    """`video_root`, else the annotation folder's videos/ folder where there is one, else that folder."""
    base = path if path.is_dir() else path.parent
    return Path(video_root) if video_root else (base / "videos" if (base / "videos").is_dir() else base)


def _captioned_records(
    items: list[tuple], root: Path, files: _VideoFiles | None, captions_only: bool
) -> tuple[list[VideoRecord], list[str]]:
    """(the records of the items with a caption, the ids of the videos without one)."""
    records = []
    without = []
    for item in items:
        video_id, texts, start, end = item[:4]
        if not texts:
            without.append(video_id)
            continue
        location = "" if captions_only else _video_location(item, root, files)
        records.append(VideoRecord(video_id, location, start, end, texts))
    return records, without


def _leave_out_uncaptioned(path: Path, format: str, without: list[str], strict: bool) -> None:
    """Warn about the videos `without` a caption, left out of the records; with `strict`, refuse them."""
    # an evaluation split: leaving them out would shrink its candidates (shard keys without a caption
    # are no samples: the stream leaves them out too, and `_read_webdataset` says so)
    if without and strict and format != "webdataset":
        raise AnnotationError(f"{path}: {len(without)} videos have no caption (e.g. {without[0]})")
    if without:
        log.warning("%s: %d videos have no caption and are left out (e.g. %s)", path, len(without), without[0])


def _log_counts(path: Path, format: str, split: str | None, records: list[VideoRecord]) -> None:
    """Log the videos and captions read, once per file, format and split (not at every re-read)."""
    counts = (len(records), sum(len(record.captions) for record in records))
    if _counts_logged.get((str(path), format, split)) != counts:
        _counts_logged[(str(path), format, split)] = counts
        log.info("%s (%s%s): %d videos, %d captions", path, format, f", split {split}" if split else "", *counts)
