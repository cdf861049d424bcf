"""Open-ended video QA (MSRVTT-QA, MSVD-QA) as classification.

Two file formats:
- the ALPRO/ClipBERT JSONL, one JSON object per line: {"video_id", "question", "answer",
  "answer_type"} ("answer_type" optional, e.g. what/who/how or the synthetic world's colour/shape/...);
- the original release (Xu et al. 2017: `train_qa.json`, `val_qa.json`, `test_qa.json`), a .json
  file holding one JSON array of {"id", "video_id": integer, "question", "answer"}. MSVD-QA
  numbers its clips: a `youtube_mapping.txt` beside the file ("<YouTube clip name> vid<N>" per
  line) gives the clip of id N; without it, id N is MSR-VTT's "video<N>". The answer type is the
  question word (what/who/how/where/when, else "other").

Model: the fusion encoder runs bidirectionally over [visual tokens | question tokens | answer
slot]; the answer slot is a learned vector (zero-initialised, as the reference's zero vector) and
its output goes through a 2-layer classifier over an answer vocabulary: the `task.answers` most
frequent training answers (ties broken alphabetically). Training uses only questions whose answer
is in the vocabulary; in evaluation an out-of-vocabulary answer always counts as wrong.
Accuracy is reported overall and per answer type. Evaluation (`evaluate_questions`) decodes and
encodes each video once and answers all of its questions from those features: MSRVTT-QA's test split
asks 72,821 questions of 2,990 videos.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stoa_vlp.checks import require
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.data.dataset import VideoTextDataset
from stoa_vlp.data.jsonl import open_text, read_json, read_json_object, write_json_atomic
from stoa_vlp.tasks.data import LabelledBatch, LabelledCollate, read_jsonl_rows
from stoa_vlp.tasks.retrieval import encode_videos, require_one_clip_per_video
from stoa_vlp.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Question:
    video_id: str
    question: str
    answer: str
    answer_type: str


def normalise_answer(answer: str) -> str:
    return " ".join(str(answer).lower().split())


QUESTION_WORDS = ("what", "who", "how", "where", "when")
VIDEO_MAPPING = "youtube_mapping.txt"  # MSVD-QA's clip numbering, beside its QA files


def read_questions(path: str | Path) -> list[Question]:
    """Questions of a QA file in either format; errors name the file and the line or record."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: QA file does not exist")
    original = False
    if path.suffix == ".json":  # the original release; ALPRO's files are .jsonl
        with open_text(path) as handle:
            original = handle.read(64).lstrip().startswith("[")
    if original:
        rows = _original_rows(path)
    else:
        rows = [(f"{path}:{number}", row) for number, row in read_jsonl_rows(path, "QA")]
    questions = []
    for where, row in rows:
        missing = [key for key in ("video_id", "question", "answer") if key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if not str(row["question"]).strip():
            raise ValueError(f"{where}: empty question")
        questions.append(
            Question(str(row["video_id"]), str(row["question"]), normalise_answer(row["answer"]),
                     str(row.get("answer_type", "all")))
        )
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def _original_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) of the original release's JSON array, with video ids and answer types filled in."""
    records = read_json(path)
    video_name = _video_names(path)
    rows = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object")
        row = dict(record)
        if "video_id" in row:
            row["video_id"] = video_name(row["video_id"], where)
        if "question" in row:
            words = str(row["question"]).lower().split(maxsplit=1)
            row["answer_type"] = words[0] if words and words[0] in QUESTION_WORDS else "other"
        rows.append((where, row))
    return rows


def _video_names(path: Path):
    """A function (integer video id, location) -> video name: through youtube_mapping.txt when it lies
    beside `path` (MSVD-QA), else "video<N>" (MSRVTT-QA)."""
    mapping_file = path.parent / VIDEO_MAPPING
    if not mapping_file.exists():
        log.info("%s: no %s beside it: integer video ids name MSR-VTT clips (video<N>)", path, VIDEO_MAPPING)
        mapping = None
    else:
        mapping = {}
        with open_text(mapping_file) as handle:
            lines = handle.read().splitlines()
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].startswith("vid"):
                raise ValueError(f"{mapping_file}:{number}: expected '<clip name> vid<N>', got {line!r}")
            mapping[parts[1]] = parts[0]

    def name(video_id, where: str) -> str:
        if isinstance(video_id, bool) or not isinstance(video_id, (int, str)) or not str(video_id).isdigit():
            raise ValueError(f"{where}: video_id must be an integer, got {video_id!r}")
        if mapping is None:
            return f"video{int(video_id)}"
        key = f"vid{int(video_id)}"
        if key not in mapping:
            raise ValueError(f"{where}: video_id {video_id} has no line '{key}' in {mapping_file}")
        return mapping[key]

    return name


class AnswerVocab:
    """Answer strings <-> class ids; saved as ALPRO's {answer: label} JSON."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.index = {answer: label for label, answer in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise ValueError("answer vocabulary holds duplicates")

    @classmethod
    def from_answers(cls, answers: Iterable[str], size: int) -> "AnswerVocab":
        counts = Counter(normalise_answer(a) for a in answers)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([answer for answer, _ in ranked[:size]])

    def __len__(self) -> int:
        return len(self.answers)

    def label(self, answer: str) -> int:
        """Class id, or -1 for an answer outside the vocabulary."""
        return self.index.get(normalise_answer(answer), -1)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.index, indent=0)

    @classmethod
    def load(cls, path: str | Path) -> "AnswerVocab":
        mapping = read_json_object(path)
        if not mapping:
            raise ValueError(f"{path}: no answers")
        labels = list(mapping.values())
        if not all(type(label) is int for label in labels) or sorted(labels) != list(range(len(labels))):
            raise ValueError(f"{path}: labels must be the integers 0..{len(labels) - 1}, each once")
        answers = [normalise_answer(answer) for answer, _ in sorted(mapping.items(), key=lambda item: item[1])]
        if len(set(answers)) != len(answers):
            raise ValueError(f"{path}: two answers are the same once lower-cased and with single spaces")
        return cls(answers)


ANSWER_OUTPUTS = "head.classifier.3.bias"  # in a QAModel's state dict: one value per answer


class QAHead(nn.Module):
    """Answer slot plus classifier: Linear(E, 2E) - GELU - LayerNorm - Linear(2E, A)."""

    def __init__(self, width: int, num_answers: int):
        super().__init__()
        self.answer_slot = nn.Parameter(torch.zeros(width))
        self.classifier = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.LayerNorm(2 * width), nn.Linear(2 * width, num_answers)
        )

    def forward(self, model, video, text) -> torch.Tensor:
        """(B, A) answer logits for VideoFeatures `video` and question TextFeatures `text`."""
        slots = self.answer_slot.to(text.tokens.dtype).expand(text.tokens.shape[0], 1, -1)  # (B, 1, E)
        fused = model.fuse(video, text.tokens, text.mask, mode="bidirectional", extra_slots=slots)
        return self.classifier(fused.hidden[:, -1])


class QAModel(nn.Module):
    """STOA-VLP with a QA head; `forward(batch)` gives the Trainer {"loss", "accuracy"}."""

    def __init__(self, model: nn.Module, num_answers: int):
        super().__init__()
        self.model = model
        self.head = QAHead(model.config.text_width, num_answers)

    def logits(self, batch) -> torch.Tensor:
        video, text = self.model(batch)
        return self.head(self.model, video, text)

    def question_logits(self, video, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, A) answer logits for already encoded VideoFeatures `video` (one row per question) and the
        questions' token ids and masks (B, L): `logits` without running the video tower."""
        return self.head(self.model, video, self.model.encode_text(tokens, text_mask))

    def forward(self, batch: LabelledBatch) -> dict[str, torch.Tensor]:
        logits = self.logits(batch)
        require(((batch.labels >= 0) & (batch.labels < logits.shape[-1])).all(),
                "QA training batch holds questions whose answer is outside the vocabulary")
        loss = F.cross_entropy(logits.float(), batch.labels)
        accuracy = (logits.argmax(dim=-1) == batch.labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


def accuracy_by_type(correct: list[bool], answer_types: list[str]) -> dict[str, float]:
    """{"accuracy": overall percent, "accuracy_<type>": percent per answer type, "num_questions"}."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for hit, kind in zip(correct, answer_types):
        groups[kind].append(hit)
    metrics = {"accuracy": 100.0 * sum(correct) / max(1, len(correct)), "num_questions": float(len(correct))}
    for kind in sorted(groups):
        metrics[f"accuracy_{kind}"] = 100.0 * sum(groups[kind]) / len(groups[kind])
    return metrics


@torch.no_grad()
def predict(
    qa_model: QAModel, loader: Iterable[LabelledBatch], device, progress: bool = False
) -> tuple[list[int], list[int]]:
    """(predicted class ids, true labels with -1 for out-of-vocabulary) over an evaluation loader;
    with `progress`, a tqdm bar on stderr."""
    was_training = qa_model.training
    qa_model.eval()
    predicted, labels = [], []
    for batch in tqdm(loader, desc="answering questions", unit="batch", disable=not progress):
        batch = batch.to(device)
        predicted += qa_model.logits(batch).argmax(dim=-1).tolist()
        labels += batch.labels.tolist()
    qa_model.train(was_training)
    return predicted, labels


def evaluate_qa(
    qa_model: QAModel, loader: Iterable[LabelledBatch], device, questions: list[Question], progress: bool = False
) -> dict[str, float]:
    """Accuracy overall and per answer type, the share of out-of-vocabulary answers and the number of
    questions; `questions` in loader order. A loader of one row per question runs the video tower once
    per question; `evaluate_questions` runs it once per video."""
    predicted, labels = predict(qa_model, loader, device, progress)
    return qa_metrics(predicted, labels, questions)


@torch.no_grad()
def predict_questions(
    qa_model: QAModel, video_loader: Iterable, questions: list[Question], tokenizer: Tokenizer, device,
    batch_size: int = 256, progress: bool = False,
) -> list[int]:
    """Predicted class id of each question: each video of `video_loader` (one row per video, e.g.
    `tasks.data.video_loader`) is decoded and encoded once, then the questions are answered in batches
    of `batch_size` from their videos' features. With `progress`, tqdm bars on stderr."""
    ids, videos = encode_videos(qa_model.model, video_loader, device, progress)
    require_one_clip_per_video(ids, "video QA")
    position = {video_id: row for row, video_id in enumerate(ids)}
    missing = sorted({q.video_id for q in questions} - set(position))
    if missing:
        raise ValueError(f"the video loader gave no clip for {len(missing)} questions' videos (e.g. {missing[:3]})")
    rows = torch.tensor([position[q.video_id] for q in questions], dtype=torch.long)
    tokens, mask = tokenizer([q.question for q in questions])
    was_training = qa_model.training
    qa_model.eval()
    predicted: list[int] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="answering questions", unit="batch", disable=not progress):
        end = start + batch_size
        video = videos.index_select(rows[start:end].to(videos.video.device))
        logits = qa_model.question_logits(video, tokens[start:end].to(device), mask[start:end].to(device))
        predicted += logits.argmax(dim=-1).tolist()
    qa_model.train(was_training)
    return predicted


def qa_metrics(predicted: list[int], labels: list[int], questions: list[Question]) -> dict[str, float]:
    """`evaluate_qa`'s metrics of predicted class ids and true labels (-1: out of vocabulary)."""
    if len(predicted) != len(questions):
        raise ValueError(f"loader gave {len(predicted)} rows for {len(questions)} questions")
    correct = [p == label for p, label in zip(predicted, labels)]  # label -1 never matches
    metrics = accuracy_by_type(correct, [q.answer_type for q in questions])
    metrics["out_of_vocabulary"] = 100.0 * sum(label < 0 for label in labels) / len(labels)
    metrics["num_questions"] = float(len(labels))
    return metrics


def evaluate_questions(
    qa_model: QAModel, video_loader: Iterable, questions: list[Question], vocab: AnswerVocab, tokenizer: Tokenizer,
    device, batch_size: int = 256, progress: bool = False,
) -> dict[str, float]:
    """`evaluate_qa`'s metrics, encoding each video once (`predict_questions`) rather than once per question."""
    predicted = predict_questions(qa_model, video_loader, questions, tokenizer, device, batch_size, progress)
    return qa_metrics(predicted, [vocab.label(q.answer) for q in questions], questions)


def question_videos(questions: list[Question], video_paths: dict[str, str]) -> list[VideoRecord]:
    """One record per distinct video of `questions`, in first-seen order, without captions (for
    `tasks.data.video_loader` and `evaluate_questions`)."""
    video_ids = dict.fromkeys(q.video_id for q in questions)
    return [VideoRecord(video_id, video_paths[video_id], None, None, []) for video_id in video_ids]


def question_dataset(
    questions: list[Question],
    vocab: AnswerVocab,
    config,
    training: bool,
    video_paths: dict[str, str],
    detections=None,
    label_vocab=None,
):
    """(dataset, collate, kept questions): one item per question, labels from `vocab`.

    In training, questions whose answer is outside the vocabulary are left out (and counted in the
    log); in evaluation all are kept.
    """
    kept = [q for q in questions if vocab.label(q.answer) >= 0] if training else list(questions)
    if training:
        if not kept:
            raise ValueError("no training question has its answer in the answer vocabulary")
        if len(kept) < len(questions):
            log.info(
                "QA training: %d of %d questions have answers outside the %d-answer vocabulary and are left out",
                len(questions) - len(kept), len(questions), len(vocab),
            )
    records = [VideoRecord(q.video_id, video_paths[q.video_id], None, None, [q.question]) for q in kept]
    dataset = VideoTextDataset(records, config, training, detections, label_vocab, None, items="captions")
    return dataset, LabelledCollate([vocab.label(q.answer) for q in kept]), kept
