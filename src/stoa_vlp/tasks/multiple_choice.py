"""Multiple-choice video-text matching (the MSR-VTT MC test as JSFusion/ClipBERT ship it).

Two file formats:
- ClipBERT's `msrvtt_mc_test.jsonl`, one JSON object per line: {"video_id" (or "clip_name"),
  "options": [caption, ...], "answer": index of the true option (an integer or its digits)};
- JSFusion's `MSR_MC_test.csv`, tab-separated with a header: key, vid_key (msr<N>, the clip
  video<N>), a1..a5, answer (index into a1..a5).
Each option is scored against its video by the fusion
encoder's matching head (vtm: its log-odds, in float64, which order the options as P(matched) does
without rounding to 1.0) and by the contrastive cosine (vtc); an item is answered correctly when
its answer scores above every other option (a tie counts against the model, NaN is the lowest score).
Both accuracies are reported; `task.mc_scoring` names the headline one.
Fine-tuning for MC is retrieval fine-tuning (VTC + VTM on captions), as in the reference code.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from stoa_vlp.batch import Batch
from stoa_vlp.data.jsonl import open_text
from stoa_vlp.metrics.retrieval import nan_lowest
from stoa_vlp.tasks.data import read_jsonl_rows
from stoa_vlp.tasks.retrieval import (
    contrastive_similarity,
    encode_texts,
    encode_videos,
    match_log_odds,
    require_one_clip_per_video,
)
from stoa_vlp.tokenizer import Tokenizer

SCORINGS = ("vtm", "vtc")


@dataclass
class Choice:
    video_id: str
    options: list[str]
    answer: int


def read_choices(path: str | Path) -> list[Choice]:
    """Items of a multiple-choice JSONL or JSFusion CSV file; errors name the file and line."""
    path = Path(path)
    if path.suffix in (".csv", ".tsv"):
        rows = _jsfusion_rows(path)
    else:
        rows = [(f"{path}:{number}", row) for number, row in read_jsonl_rows(path, "multiple-choice")]
    choices = []
    for where, row in rows:
        video_id = row.get("video_id", row.get("clip_name"))
        options = row.get("options")
        answer = row.get("answer")
        if video_id is None or not isinstance(options, list) or len(options) < 2:
            raise ValueError(f"{where}: needs video_id (or clip_name) and a list of 2+ options")
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise ValueError(f"{where}: answer must be an option index in 0..{len(options) - 1}, got {answer!r}")
        choices.append(Choice(str(video_id), [str(o) for o in options], answer))
    if not choices:
        raise ValueError(f"{path}: no multiple-choice items")
    return choices


def _jsfusion_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, {video_id, options, answer}) per line of JSFusion's tab-separated MC file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: multiple-choice file does not exist")
    with open_text(path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        option_columns = [f"a{i}" for i in range(1, 6)]
        missing = [name for name in ("vid_key", *option_columns, "answer") if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a JSFusion MC file: no column(s) {', '.join(missing)} in the header")
        rows = []
        for number, line in enumerate(reader, 2):
            video = line["vid_key"] or ""
            video_id = "video" + video[3:] if video.startswith("msr") else video
            rows.append((f"{path}:{number}", {"video_id": video_id, "answer": line["answer"],
                                              "options": [line[name] for name in option_columns]}))
    return rows


@torch.no_grad()
def option_scores(model, videos, video_rows: list[int], choices: list[Choice], tokenizer: Tokenizer, device,
                  video_feature: str = "mean", batch_size: int = 256,
                  progress: bool = False) -> dict[str, list[torch.Tensor]]:
    """{"vtm": [(options,) matching log-odds per item], "vtc": [(options,) cosine per item]};
    item i's video is row video_rows[i] of VideoFeatures `videos`. With `progress`, tqdm bars on stderr."""
    captions = [option for choice in choices for option in choice.options]
    owner = torch.tensor([video_rows[i] for i, choice in enumerate(choices) for _ in choice.options], dtype=torch.long)
    tokens, mask = tokenizer(captions)
    texts = encode_texts(model, tokens, mask, device, batch_size, progress)
    cosine = contrastive_similarity(videos, texts, video_feature).cpu()  # (num_options, num_items)
    vtc = cosine[torch.arange(len(owner)), owner]
    vtm = match_log_odds(
        model, videos, texts, torch.arange(len(owner)), owner, batch_size, progress, "matching options"
    )
    sizes = [len(choice.options) for choice in choices]
    return {"vtm": list(vtm.split(sizes)), "vtc": list(vtc.split(sizes))}


def chose_answer(scores: torch.Tensor, answer: int) -> bool:
    """Whether the answer's score beats every other option's in `scores` (options,). As in retrieval, a
    tie counts against the model (an argmax would pick the first of the tied options) and NaN is the
    lowest score (a NaN answer is never chosen)."""
    scores = nan_lowest(scores)
    others = torch.cat([scores[:answer], scores[answer + 1 :]])
    return bool(scores[answer] > others.max())


def evaluate_multiple_choice(
    model,
    video_loader: Iterable[Batch],
    choices: list[Choice],
    tokenizer: Tokenizer,
    device,
    scoring: str = "vtm",
    video_feature: str = "mean",
    progress: bool = False,
) -> dict[str, float]:
    """{"accuracy" (by `scoring`), "accuracy_vtm", "accuracy_vtc", "num_items"} in percent.

    `video_loader` yields the items' videos (each video is encoded once, by video id).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"task.mc_scoring must be one of {SCORINGS}, got {scoring!r}")
    ids, videos = encode_videos(model, video_loader, device, progress)
    require_one_clip_per_video(ids, "multiple-choice")
    position = {video_id: row for row, video_id in enumerate(ids)}
    missing = sorted({c.video_id for c in choices} - set(position))
    if missing:
        raise ValueError(f"the video loader gave no clip for {len(missing)} items' videos (e.g. {missing[:3]})")
    rows = [position[choice.video_id] for choice in choices]
    scores = option_scores(model, videos, rows, choices, tokenizer, device, video_feature, progress=progress)
    metrics = {}
    for name in SCORINGS:
        hits = [chose_answer(item_scores, choice.answer) for item_scores, choice in zip(scores[name], choices)]
        metrics[f"accuracy_{name}"] = 100.0 * sum(hits) / len(hits)
    metrics["accuracy"] = metrics[f"accuracy_{scoring}"]
    metrics["num_items"] = float(len(choices))
    return metrics
