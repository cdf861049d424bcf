"""One downstream task from a Config: its training module and data, and its evaluation on a split.

Used by `stoa-vlp finetune`, `stoa-vlp evaluate` and the demo. What data.train / data.val /
data.test name depends on `task.name`:
- retrieval, captioning: annotation files of any supported format (data.format);
- qa: ALPRO/ClipBERT QA JSONL files (videos under data.video_root);
- mc: data.train an annotation file (MC fine-tunes like retrieval), data.val / data.test
  multiple-choice JSONL files.
Model selection uses the validation split only; the test split is evaluated by the caller once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from stoa_vlp.config import Config, TrainConfig
from stoa_vlp.data.annotations import VideoRecord, read_annotations, require_video_files
from stoa_vlp.data.side_data import load_detections, report_detection_coverage
from stoa_vlp.tasks.data import find_video_paths, video_loader, video_root
from stoa_vlp.tasks.runs import ANSWERS_FILE, read_answers
from stoa_vlp.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TASKS = ("retrieval", "captioning", "qa", "mc")
SELECTION_METRIC = {"retrieval": "t2v_r1", "captioning": "CIDEr", "qa": "accuracy", "mc": "accuracy"}
RETRIEVAL_LOSSES = ("vtc", "vtm")
# what a task's data.val and data.test files hold (mc trains on an annotation file, as retrieval does)
EVALUATION_FILES = {"retrieval": "annotation file", "captioning": "annotation file", "qa": "QA file",
                    "mc": "multiple-choice file"}
DUAL_SOFTMAX_SCALE = 100.0


def selection_metric(config: Config) -> str:
    """The validation metric (without the "val/" prefix) that picks the best checkpoint."""
    name = SELECTION_METRIC[config.task.name]
    if config.task.name == "retrieval" and config.task.rerank_k > 0:
        return "t2v_rerank_r1"
    return name


def check_task_settings(config: Config, task_name: str | None = None) -> None:
    """A ValueError naming every task setting that would only fail at the first validation (or fail
    there silently). `task_name`: the task the settings are for (default task.name)."""
    from stoa_vlp.tasks.multiple_choice import SCORINGS

    name = task_name or config.task.name
    task, problems = config.task, []
    if task.max_caption_tokens < 0 or task.max_caption_tokens + 1 > config.model.text_len:
        problems.append(f"task.max_caption_tokens must be 0 (= model.text_len - 1) up to model.text_len - 1 "
                        f"= {config.model.text_len - 1}, got {task.max_caption_tokens}")
    elif name == "captioning" and (task.max_caption_tokens or config.model.text_len - 1) < 2:
        problems.append(f"captioning generates task.max_caption_tokens={task.max_caption_tokens} (0: model.text_len "
                        f"- 1 = {config.model.text_len - 1}) tokens, the end token included: a caption needs at "
                        "least 2 (a word and the end; model.text_len at least 3 with the start token)")
    if task.mc_scoring not in SCORINGS:
        problems.append(f"task.mc_scoring must be one of {', '.join(SCORINGS)}, got {task.mc_scoring!r}")
    for key in ("beam_size", "answers"):
        if getattr(task, key) < 1:
            problems.append(f"task.{key} must be at least 1, got {getattr(task, key)}")
    if task.beam_size > config.model.vocab_size:
        # each step scores beam_size x vocab_size continuations per clip: a beam wider than the vocabulary
        # keeps no more distinct first tokens, and only costs memory (100,000 took 19 GB)
        problems.append(f"task.beam_size must be at most model.vocab_size ({config.model.vocab_size}): a beam "
                        f"holds distinct continuations, got {task.beam_size}")
    if task.rerank_k < 0:
        problems.append(f"task.rerank_k must be 0 (off) or more, got {task.rerank_k}")
    if task.qb_norm and not task.qb_norm_beta > 0:
        problems.append(f"task.qb_norm_beta must be above 0 with task.qb_norm=true (the inverted softmax's "
                        f"temperature), got {task.qb_norm_beta}")
    if problems:
        raise ValueError("; ".join(problems))


def validation_metric_names(config: Config, pretraining: bool = False) -> set[str]:
    """The metrics of task.name's validation (zero-shot retrieval's when `pretraining`) that can pick
    the best checkpoint: the highest value wins, so neither a rank (MdR, MnR) nor a count. Retrieval's
    grouped video-to-text needs a video with several captions in the split; QA's accuracy per answer
    type ("accuracy_<type>") depends on the split's types, which are not listed."""
    from stoa_vlp.tasks.retrieval import retrieval_metric_names

    if pretraining:
        return retrieval_metric_names()
    task = config.task
    if task.name == "retrieval":
        return retrieval_metric_names(task.rerank_k > 0, task.dual_softmax, task.qb_norm)
    if task.name == "captioning":
        from stoa_vlp.metrics.captioning import METRIC_NAMES

        return {name for name in METRIC_NAMES if task.meteor or name != "METEOR"}
    if task.name == "mc":
        from stoa_vlp.tasks.multiple_choice import SCORINGS

        return {"accuracy", *(f"accuracy_{name}" for name in SCORINGS)}
    return {"accuracy"}


def check_qa_fusion(model_config) -> None:
    """ValueError when video QA's answer slot does not fit model.fusion_positions."""
    from stoa_vlp.model.stoa import fusion_length

    length = fusion_length(model_config, extra_slots=1)
    if length > model_config.fusion_positions:
        raise ValueError(f"video QA adds an answer slot: the fusion sequence takes {length} positions, more than "
                         f"model.fusion_positions={model_config.fusion_positions}")


def task_config(config: Config, task: str) -> Config:
    """A copy of `config` set up for `task`: task.name, the retrieval losses only (retrieval, mc),
    and train.best_metric = the task's validation metric unless set to a metric no task selects by."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    check_task_settings(config, task)
    if task == "qa":
        check_qa_fusion(config.model)
    config = dataclasses.replace(
        config, task=dataclasses.replace(config.task, name=task), loss=dataclasses.replace(config.loss),
        train=dataclasses.replace(config.train),
    )
    if task in ("retrieval", "mc"):
        for name in ("mlm", "plm", "dota", "stasp"):
            setattr(config.loss, name, 0.0)
        if not any(getattr(config.loss, name) > 0 for name in RETRIEVAL_LOSSES):
            raise ValueError("retrieval fine-tuning needs loss.vtc or loss.vtm above 0")
    automatic = {TrainConfig().best_metric, "val/t2v_rerank_r1", *(f"val/{name}" for name in SELECTION_METRIC.values())}
    if config.train.best_metric in automatic:  # also when a run's config.yaml recorded another task's
        config.train.best_metric = f"val/{selection_metric(config)}"
    # every task leaves parts of the model without gradient (retrieval the LM head, captioning the
    # matching head...), which DDP must be told or it fails at the second step
    config.train.find_unused_parameters = True
    return config


def first_videos(items: list, count: int) -> list:
    """The items (anything with a `video_id`) of the first `count` distinct videos, in order; all
    of them when `count` is 0."""
    if count <= 0:
        return items
    kept: set[str] = set()
    chosen = []
    for item in items:
        if item.video_id in kept or len(kept) < count:
            kept.add(item.video_id)
            chosen.append(item)
    return chosen


def split_path(config: Config, split: str) -> str:
    """data.<split>; a ValueError when it is not set."""
    path = getattr(config.data, split)
    if not path:
        raise ValueError(f"data.{split} is not set: give the {split} file of the {config.task.name} task")
    return path


def split_items(config: Config, split: str, find_videos: bool = True) -> list:
    """data.<split>'s items as task.name reads them: records (read strictly: a problem in them is an
    error, not a skip; with `find_videos` false their video files are not looked for), questions or
    multiple-choice items."""
    path = split_path(config, split)
    if config.task.name in ("retrieval", "captioning"):
        return read_annotations(path, config.data.format, split, config.data.video_root or None, strict=True,
                                captions_only=not find_videos)
    if config.task.name == "qa":
        from stoa_vlp.tasks.qa import read_questions

        return read_questions(path)
    from stoa_vlp.tasks.multiple_choice import read_choices

    return read_choices(path)


def split_video_ids(config: Config, split: str) -> set[str]:
    """The videos that data.<split> names, read as task.name reads it (without looking for their files)."""
    return {item.video_id for item in split_items(config, split, find_videos=False)}


class TaskRunner:
    """Builds the task's module, training data and evaluations from a Config.

    run_dir: the run folder, where fine-tuning (`fine_tuning`) saves the QA answer vocabulary
    (`save_answers`) and evaluation reads it: the answers the trained head's outputs stand for. A
    resumed fine-tuning (`resume`) reads the run's own.
    """

    def __init__(self, config: Config, device, run_dir: str | Path | None = None, fine_tuning: bool = False,
                 resume: bool = False):
        self.config = config
        self.fine_tuning = fine_tuning
        self.resume = resume
        self.task = config.task.name
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (known: {', '.join(TASKS)})")
        self.device = torch.device(device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tokenizer = Tokenizer(config.model.text_len)
        self.detections, self.label_vocab = load_detections(config)
        self.coverage_reported: set[str] = set()  # the splits whose detection coverage is logged
        self.scorer = None
        self.captions: dict[str, str] = {}  # the last captioning evaluation's {video_id: generated caption}
        if self.task == "captioning":
            from stoa_vlp.metrics.captioning import CaptionScorer

            self.scorer = CaptionScorer(meteor=config.task.meteor)  # fails early, naming what is missing
            log.info("caption metrics: %s", self.scorer.java_version)
        self.answers = self._answer_vocab() if self.task == "qa" else None

    # ---- set-up ------------------------------------------------------------------------------

    def _answer_vocab(self):
        """The run's answers (RUN/answers.json) when evaluating a run (which requires them) or resuming
        its fine-tuning. A new fine-tuning, or a runner without a run folder, takes task.answer_vocab's,
        else the task.answers most frequent training answers (not those a failed earlier attempt left
        in the run folder)."""
        from stoa_vlp.tasks.qa import AnswerVocab, read_questions

        evaluating = self.run_dir is not None and not self.fine_tuning
        resuming = self.run_dir is not None and self.resume and (self.run_dir / ANSWERS_FILE).exists()
        if evaluating or resuming:
            return read_answers(self.run_dir)  # evaluating requires them
        if self.config.task.answer_vocab:
            vocab = AnswerVocab.load(self.config.task.answer_vocab)
        elif self.config.data.train:
            answers = (question.answer for question in read_questions(self.config.data.train))
            vocab = AnswerVocab.from_answers(answers, self.config.task.answers)
        else:
            raise ValueError("QA needs its answer vocabulary: set data.train (QA JSONL) or task.answer_vocab, "
                             f"or keep {ANSWERS_FILE} in the run folder")
        return vocab

    def save_answers(self) -> None:
        """Fine-tuning QA: save the answers as RUN/answers.json (replacing any that a failed earlier
        attempt left), for evaluation. Called once the run's checks have passed, not at set-up, so
        that a run that cannot start leaves no file behind."""
        if self.answers is not None and self.fine_tuning and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.answers.save(self.run_dir / ANSWERS_FILE)

    def module(self, model: nn.Module) -> nn.Module:
        """The module the Trainer optimises (and whose state dict a checkpoint holds)."""
        if self.task in ("retrieval", "mc"):
            from stoa_vlp.objectives import Pretrainer

            return Pretrainer(model, self.config.loss)
        if self.task == "captioning":
            from stoa_vlp.tasks.captioning import CaptioningModule

            return CaptioningModule(model)
        from stoa_vlp.tasks.qa import QAModel

        return QAModel(model, len(self.answers))

    def train_data(self, rank: int = 0, world_size: int = 1):
        """(dataset, collate) of the training split; a stream (WebDataset shards) of this rank's share."""
        if self.task == "qa":
            from stoa_vlp.tasks.qa import question_dataset, read_questions

            questions = read_questions(self.config.data.train)
            paths = self._video_paths([q.video_id for q in questions], self.config.data.train, leave_out_missing=True)
            questions = [question for question in questions if question.video_id in paths]
            self._report_coverage("train", paths.keys())
            dataset, collate, _ = question_dataset(
                questions, self.answers, self.config, True, paths, self.detections, self.label_vocab
            )
            return dataset, collate
        from stoa_vlp.data.dataset import build_dataset, collate
        from stoa_vlp.data.side_data import load_side_data

        side_data = load_side_data(self.config, (self.detections, self.label_vocab))  # detections read at set-up
        return build_dataset(self.config, "train", rank, world_size, side_data), collate

    def _video_paths(self, video_ids: list[str], source: str, leave_out_missing: bool = False) -> dict[str, str]:
        return find_video_paths(video_ids, video_root(self.config, source), source, leave_out_missing)

    def _report_coverage(self, split: str, video_ids: Iterable[str]) -> None:
        """Log, once per split, how data.detections covers the split's videos (as the training split's
        dataset does): a video without detections gets no object trajectories."""
        if self.detections is not None and split not in self.coverage_reported:
            self.coverage_reported.add(split)
            report_detection_coverage(self.config.data.detections, self.detections, video_ids, f"the {split} split")

    def check_split(self, split: str, max_videos: int = 0) -> None:
        """Read `split`'s file as its evaluation will and find the videos it reads (of its first
        `max_videos` videos when that is set, as `evaluate`), so that a wrong path, a malformed file or
        a missing video fails before training, not at the first validation (before that step's
        checkpoint) or after the last step."""
        items = first_videos(split_items(self.config, split), max_videos)
        if self.task in ("retrieval", "captioning"):
            require_video_files(items, split_path(self.config, split))
        else:
            self._video_paths(sorted({item.video_id for item in items}), split_path(self.config, split))
        self._report_coverage(split, (item.video_id for item in items))

    @functools.cached_property
    def querybank_captions(self) -> list[str]:
        """QB-Norm's query bank: the training captions, read once however often the model is evaluated,
        without looking for the training videos (evaluation needs none of them), and as training reads
        them: an empty caption, or a video without one, is left out with a warning (a bag of training
        captions, not a set of candidates)."""
        path = split_path(self.config, "train")
        records = read_annotations(path, self.config.data.format, "train", captions_only=True)
        return [caption for record in records for caption in record.captions]

    # ---- evaluation --------------------------------------------------------------------------

    def evaluator(self, split: str):
        """`evaluate(module) -> metrics` on `split`, for the Trainer's validation (its first
        train.val_max_clips videos when that is set)."""
        return lambda module: self.evaluate(module, split, self.config.train.val_max_clips)

    def evaluate(self, module: nn.Module, split: str, max_videos: int = 0) -> dict[str, float]:
        """The task's metrics on `split`; with `max_videos`, on the items of its first `max_videos` videos."""
        model = getattr(module, "model", module)
        config = self.config
        if self.task == "retrieval":
            from stoa_vlp.tasks.retrieval import evaluate_retrieval_records

            records = first_videos(split_items(self.config, split), max_videos)
            self._report_coverage(split, (record.video_id for record in records))
            loader = video_loader(records, config, self.detections, self.label_vocab)
            querybank = self.querybank_captions if config.task.qb_norm else None
            return evaluate_retrieval_records(
                model, loader, records, self.tokenizer, self.device, config.task.rerank_k,
                DUAL_SOFTMAX_SCALE if config.task.dual_softmax else None, config.loss.vtc_video_feature,
                querybank_captions=querybank, qb_norm_beta=config.task.qb_norm_beta, progress=config.train.progress,
            )
        if self.task == "captioning":
            from stoa_vlp.tasks.captioning import evaluate_captioning

            records = first_videos(split_items(self.config, split), max_videos)
            self._report_coverage(split, (record.video_id for record in records))
            loader = video_loader(records, config, self.detections, self.label_vocab)
            references = {}
            for record in records:
                references.setdefault(record.video_id, []).extend(record.captions)
            metrics, self.captions = evaluate_captioning(
                model, loader, self.device, references, self.scorer, self.tokenizer, config.task.beam_size,
                config.task.length_penalty, config.task.max_caption_tokens or None, progress=config.train.progress,
            )
            return metrics
        if self.task == "qa":
            from stoa_vlp.tasks.qa import evaluate_questions, question_videos, read_questions

            path = split_path(self.config, split)
            questions = first_videos(read_questions(path), max_videos)
            paths = self._video_paths([q.video_id for q in questions], path)
            self._report_coverage(split, paths.keys())
            # each video decoded and encoded once, however many questions it has
            loader = video_loader(question_videos(questions, paths), config, self.detections, self.label_vocab)
            return evaluate_questions(module, loader, questions, self.answers, self.tokenizer, self.device,
                                      progress=config.train.progress)
        from stoa_vlp.tasks.multiple_choice import evaluate_multiple_choice, read_choices

        path = split_path(self.config, split)
        choices = first_videos(read_choices(path), max_videos)
        paths = self._video_paths([c.video_id for c in choices], path)
        self._report_coverage(split, paths.keys())
        first_option = {}
        for choice in choices:
            first_option.setdefault(choice.video_id, choice.options[0])
        records = [VideoRecord(video_id, paths[video_id], None, None, [text]) for video_id, text in first_option.items()]
        loader = video_loader(records, config, self.detections, self.label_vocab)
        return evaluate_multiple_choice(
            model, loader, choices, self.tokenizer, self.device, config.task.mc_scoring, config.loss.vtc_video_feature,
            progress=config.train.progress,
        )
