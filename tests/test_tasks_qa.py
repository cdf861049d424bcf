"""Video QA pieces: file reading, answer vocabulary, answer-slot head, per-type accuracy."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stoa_vlp.batch import Batch
from stoa_vlp.config import load_config
from stoa_vlp.data.detections import FrameDetections, VideoDetections, write_detections
from stoa_vlp.model import build_model
from stoa_vlp.tasks.data import LabelledBatch
from stoa_vlp.tasks.pipeline import TaskRunner
from stoa_vlp.tasks.qa import AnswerVocab, QAModel, accuracy_by_type, evaluate_qa, read_questions
from stoa_vlp.tokenizer import Tokenizer


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_read_questions_and_errors_name_file_and_line(tmp_path):
    good = write_lines(tmp_path / "qa.jsonl", [
        {"video_id": "video1", "question": "what is it?", "answer": " Red ", "answer_type": "what"},
        {"video_id": 7, "question": "who?", "answer": "man"},
    ])
    questions = read_questions(good)
    assert [(q.video_id, q.answer, q.answer_type) for q in questions] == [("video1", "red", "what"), ("7", "man", "all")]
    bad = write_lines(tmp_path / "bad.jsonl", [{"video_id": "v", "question": "q", "answer": "a"}, "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        read_questions(bad)
    missing = write_lines(tmp_path / "missing.jsonl", [{"video_id": "v", "question": "q"}])
    with pytest.raises(ValueError, match=r"missing.jsonl:1: missing answer"):
        read_questions(missing)
    listed = write_lines(tmp_path / "listed.jsonl", [["video1", "what?", "red"]])
    with pytest.raises(ValueError, match=r"listed.jsonl:1: not a JSON object"):
        read_questions(listed)
    with pytest.raises(FileNotFoundError, match=r"absent.jsonl: QA file does not exist"):
        read_questions(tmp_path / "absent.jsonl")


def test_read_questions_of_the_original_release_maps_video_ids(tmp_path):
    records = [
        {"answer": "Man", "id": 30934, "question": "who pours water into a bowl?", "video_id": 1201},
        {"answer": "dance", "id": 1, "question": "What does a girl do?", "video_id": 2},
        {"answer": "two", "id": 2, "question": "count the dogs", "video_id": "2"},
    ]
    msrvtt = tmp_path / "msrvtt" / "test_qa.json"
    msrvtt.parent.mkdir()
    msrvtt.write_text(json.dumps(records))
    questions = read_questions(msrvtt)
    assert [(q.video_id, q.answer, q.answer_type) for q in questions] == [
        ("video1201", "man", "who"), ("video2", "dance", "what"), ("video2", "two", "other")]

    msvd = tmp_path / "msvd" / "test_qa.json"
    msvd.parent.mkdir()
    msvd.write_text(json.dumps(records))
    (msvd.parent / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nzzit5b_-ukg_5_20 vid2\n\nabc_1_2 vid1201\n")
    assert [q.video_id for q in read_questions(msvd)] == ["abc_1_2", "zzit5b_-ukg_5_20", "zzit5b_-ukg_5_20"]
    (msvd.parent / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n")
    with pytest.raises(ValueError, match=r"test_qa.json: record 0: video_id 1201 has no line 'vid1201' in .*youtube_mapping.txt"):
        read_questions(msvd)
    (msvd.parent / "youtube_mapping.txt").write_bytes(b"-4wsuPCjDBc_5_15 vid1\ncaf\xe9_1_2 vid1201\n")  # Latin-1
    with pytest.raises(ValueError, match=r"youtube_mapping.txt:2: not UTF-8 text"):
        read_questions(msvd)
    (msvd.parent / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 1\n")
    with pytest.raises(ValueError, match=r"youtube_mapping.txt:1: expected '<clip name> vid<N>'"):
        read_questions(msvd)

    bad = tmp_path / "bad" / "test_qa.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps([records[0], {"question": "q?", "answer": "a", "video_id": "video3"}]))
    with pytest.raises(ValueError, match=r"test_qa.json: record 1: video_id must be an integer, got 'video3'"):
        read_questions(bad)
    bad.write_text(json.dumps([records[0], {"question": "q?", "video_id": 3}]))
    with pytest.raises(ValueError, match=r"test_qa.json: record 1: missing answer"):
        read_questions(bad)
    bad.write_text("[{oops")
    with pytest.raises(ValueError, match=r"test_qa.json: malformed JSON at line 1, column 3"):
        read_questions(bad)
    bad.write_bytes(b'[{"question": "caf\xe9?", "answer": "a", "video_id": 3}]')  # Latin-1
    with pytest.raises(ValueError, match=r"test_qa.json:1: not UTF-8 text"):
        read_questions(bad)


def test_answer_vocab_top_k_ties_alphabetical_and_round_trip(tmp_path):
    vocab = AnswerVocab.from_answers(["dog", "cat", "cat", "bird", "dog", "ant", "Cat"], size=3)
    assert vocab.answers == ["cat", "dog", "ant"]  # cat 3, dog 2, then ant/bird tie -> ant
    assert vocab.label("DOG") == 1 and vocab.label("bird") == -1
    vocab.save(tmp_path / "answers.json")
    assert json.loads((tmp_path / "answers.json").read_text()) == {"cat": 0, "dog": 1, "ant": 2}
    assert AnswerVocab.load(tmp_path / "answers.json").answers == vocab.answers


def test_a_given_answer_vocabulary_is_used_and_kept_with_the_run(tmp_path):
    alpro = tmp_path / "train_ans2label.json"
    alpro.write_text(json.dumps({"Red": 1, "blue": 0, "two ": 2}))  # answers are compared normalised
    questions = write_lines(tmp_path / "train.jsonl", [{"video_id": "v1", "question": "q?", "answer": "green"}] * 3)
    config = load_config("tiny", ["task.name=qa", f"task.answer_vocab={alpro}", f"data.train={questions}"])
    runner = TaskRunner(config, "cpu", tmp_path / "run", fine_tuning=True)
    assert runner.answers.answers == ["blue", "red", "two"]  # the file's labels, not the training answers
    assert not (tmp_path / "run").exists()  # saved once the run's checks have passed
    runner.save_answers()
    assert json.loads((tmp_path / "run" / "answers.json").read_text()) == {"blue": 0, "red": 1, "two": 2}
    config.task.answer_vocab = ""
    assert TaskRunner(config, "cpu", tmp_path / "run").answers.answers == ["blue", "red", "two"]  # the run's own
    other = TaskRunner(config, "cpu", tmp_path / "other", fine_tuning=True)
    assert other.answers.answers == ["green"]
    other.save_answers()
    # a new fine-tuning into a folder a failed attempt left answers.json in takes its own configuration's
    # answers (the old file won silently); resuming keeps the run's
    config.task.answer_vocab = str(alpro)
    assert TaskRunner(config, "cpu", tmp_path / "other", fine_tuning=True, resume=True).answers.answers == ["green"]
    again = TaskRunner(config, "cpu", tmp_path / "other", fine_tuning=True)
    assert again.answers.answers == ["blue", "red", "two"]
    again.save_answers()
    assert json.loads((tmp_path / "other" / "answers.json").read_text()) == {"blue": 0, "red": 1, "two": 2}
    config.task.answer_vocab = ""
    with pytest.raises(FileNotFoundError, match="elsewhere/answers.json does not exist: it holds the answers"):
        TaskRunner(config, "cpu", tmp_path / "elsewhere")  # evaluation never makes up the head's answers
    assert not (tmp_path / "elsewhere").exists()


def test_accuracy_overall_and_per_type_hand_computed():
    metrics = accuracy_by_type([True, False, True, True], ["what", "what", "who", "how"])
    assert metrics == {"accuracy": 75.0, "num_questions": 4.0, "accuracy_how": 100.0, "accuracy_what": 50.0,
                       "accuracy_who": 100.0}


def make_batch(config, tokenizer, questions, labels, seed=0):
    m = config.model
    frames = torch.randn(len(questions), m.frames, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(seed))
    tokens, mask = tokenizer(questions)
    empty = torch.zeros(len(questions), 0)
    base = Batch(frames, empty, empty, empty, empty, empty, tokens, mask, torch.zeros_like(tokens),
                 torch.arange(len(questions)), [f"v{i}" for i in range(len(questions))])
    return LabelledBatch(**vars(base), labels=torch.tensor(labels))


def test_answer_slot_head_loss_and_evaluation():
    torch.manual_seed(0)
    config = load_config("tiny", ["model.objects=false"])
    tokenizer = Tokenizer(config.model.text_len)
    qa = QAModel(build_model(config.model), num_answers=5).eval()
    batch = make_batch(config, tokenizer, ["what colour is it?", "how many shapes?", "does it spin?"], [1, 4, 0])
    with torch.no_grad():
        out = qa(batch)
        video, text = qa.model(batch)
        slots = qa.head.answer_slot.expand(3, 1, -1)
        fused = qa.model.fuse(video, text.tokens, text.mask, mode="bidirectional", extra_slots=slots)
        logits = qa.head.classifier(fused.hidden[:, -1])  # the answer slot is the last position
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch.labels))
    assert torch.count_nonzero(qa.head.answer_slot) == 0  # zero-initialised like the reference's slot
    predicted = logits.argmax(dim=-1).tolist()
    eval_batch = make_batch(config, tokenizer, ["what colour is it?", "how many shapes?", "does it spin?"],
                            [predicted[0], -1, (predicted[2] + 1) % 5])
    questions = read_questions_like([("colour", "x"), ("count", "y"), ("yesno", "z")])
    metrics = evaluate_qa(qa, [eval_batch], "cpu", questions)
    assert metrics["accuracy"] == pytest.approx(100 / 3)  # right, out-of-vocabulary (always wrong), wrong
    assert metrics["accuracy_colour"] == 100.0 and metrics["accuracy_count"] == 0.0
    assert metrics["out_of_vocabulary"] == pytest.approx(100 / 3) and metrics["num_questions"] == 3
    with pytest.raises(ValueError, match="outside the vocabulary"):
        qa(eval_batch)


def read_questions_like(types_and_answers):
    from stoa_vlp.tasks.qa import Question

    return [Question(f"v{i}", "q", answer, kind) for i, (kind, answer) in enumerate(types_and_answers)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "malformed JSON at line 1, column 2"),
        ('["yes", "no"]', "expected a JSON object, got an array"),
        ("{}", "no answers"),
        ('{"yes": "0", "no": 1}', "labels must be the integers 0..1, each once"),
        ('{"yes": null}', "labels must be the integers 0..0, each once"),
    ],
)
def test_a_bad_answers_file_is_an_error_naming_it(tmp_path, text, message):
    path = tmp_path / "answers.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: {re.escape(message)}"):
        AnswerVocab.load(path)


def test_answers_that_do_not_match_the_checkpoints_head_name_answers_json(tmp_path):
    from stoa_vlp.tasks.runs import load_task_weights
    from stoa_vlp.train.checkpointing import save_weights

    config = load_config("tiny", ["model.objects=false", "model.actions=false"])
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    save_weights(QAModel(build_model(config.model), num_answers=3).state_dict(), checkpoint / "model.safetensors")
    load_task_weights(QAModel(build_model(config.model), num_answers=3), checkpoint)
    answers = tmp_path / "run" / "answers.json"
    with pytest.raises(ValueError, match=f"^{answers}: 2 answers, but the answer head of {checkpoint} has 3 outputs"):
        load_task_weights(QAModel(build_model(config.model), num_answers=2), checkpoint)


def test_writers_of_one_file_never_share_a_temporary(tmp_path):
    """Every rank of a QA fine-tuning saves answers.json; temporaries named by the process id were
    shared by ranks on nodes whose process ids repeat (containers), and one rank's rename then failed."""
    from stoa_vlp.data.jsonl import _atomic_text_file

    path = tmp_path / "answers.json"
    with _atomic_text_file(path) as first, _atomic_text_file(path) as second:  # as two ranks at once
        first.write('{"red": 0}')
        second.write('{"red": 0}')
    assert AnswerVocab.load(path).answers == ["red"] and list(tmp_path.iterdir()) == [path]


def test_qa_and_mc_report_videos_without_detections_once_per_split(tmp_path, caplog):
    """QA and multiple-choice read their splits themselves (not through the captions dataset), so they
    report the detections file's coverage themselves: a video without a line gets no trajectories."""
    (tmp_path / "videos").mkdir()
    for video_id in ("v1", "v2", "v3"):
        (tmp_path / "videos" / f"{video_id}.mp4").write_bytes(b"")  # found by name; never decoded here
    train = write_lines(tmp_path / "train.jsonl", [{"video_id": v, "question": "q?", "answer": "red"} for v in ("v1", "v2")])
    val = write_lines(tmp_path / "val.jsonl", [{"video_id": v, "question": "q?", "answer": "red"} for v in ("v1", "v2", "v3")])
    detections = tmp_path / "detections.jsonl"
    write_detections(detections, [VideoDetections("v1", 64, 64, [FrameDetections(0.0, ["cat"], np.array([[1.0, 2, 30, 40]]), np.array([0.9]))])])
    config = load_config("tiny", ["task.name=qa", f"data.train={train}", f"data.val={val}", f"data.detections={detections}"])
    runner = TaskRunner(config, "cpu", tmp_path / "run", fine_tuning=True)
    with caplog.at_level("INFO", logger="stoa_vlp"):
        runner.train_data()
        runner.check_split("val")
        runner.check_split("val")  # validation reads the split again: reported once
        choices = write_lines(tmp_path / "mc.jsonl", [{"video_id": "v3", "options": ["a", "b"], "answer": 0}])
        mc_config = load_config("tiny", ["task.name=mc", f"data.test={choices}", f"data.detections={detections}"])
        TaskRunner(mc_config, "cpu").check_split("test")
    warnings = [r.getMessage() for r in caplog.records if "have no detections" in r.getMessage()]
    assert warnings == [f"{detections}: 1 of 2 videos have no detections (no object trajectories; e.g. v2)",
                        f"{detections}: 2 of 3 videos have no detections (no object trajectories; e.g. v2)",
                        f"{detections}: 1 of 1 videos have no detections (no object trajectories; e.g. v3)"]


def test_evaluation_encodes_each_video_once_and_answers_as_the_per_question_path(tmp_path, monkeypatch):
    """MSRVTT-QA asks 72,821 questions of 2,990 videos: evaluation runs the video tower once per video
    (not per question) and gives the per-question path's logits, predictions and metrics."""
    from stoa_vlp.data.synth import render_world
    from stoa_vlp.tasks.data import evaluation_loader, video_loader
    from stoa_vlp.tasks.qa import predict, predict_questions, question_dataset, question_videos

    world = render_world(tmp_path / "world", train=2, val=1, test=3, size=32, seconds=1.0, fps=6.0,
                         captions_per_clip=1, questions_per_clip=4)
    config = load_config("tiny", ["task.name=qa", "model.image_size=32", "data.batch_size=4",
                                  f"data.video_root={world.videos}", f"data.detections={world.detections}",
                                  f"data.train={world.qa['train']}", f"data.test={world.qa['test']}"])
    torch.manual_seed(0)
    runner = TaskRunner(config, "cpu", fine_tuning=True)
    qa = runner.module(build_model(config.model))
    with torch.no_grad():
        torch.nn.init.normal_(qa.head.answer_slot)  # zero-initialised: make the slot matter
    qa.train()  # evaluation switches to eval mode and back
    questions = read_questions(world.qa["test"])
    video_ids = list(dict.fromkeys(q.video_id for q in questions))
    assert len(video_ids) == 3 and len(questions) >= 2 * len(video_ids)

    encoded = []
    encode_video = qa.model.encode_video

    def counting(frames, *rest):
        encoded.append(frames.shape[0])
        return encode_video(frames, *rest)

    monkeypatch.setattr(qa.model, "encode_video", counting)
    monkeypatch.setattr(qa.model, "forward", lambda batch: (
        counting(batch.frames, batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask),
        qa.model.encode_text(batch.tokens, batch.text_mask)))

    paths = {video_id: str(next(world.videos.glob(f"{video_id}.*"))) for video_id in video_ids}
    dataset, collate, kept = question_dataset(questions, runner.answers, config, False, paths,
                                              runner.detections, runner.label_vocab)
    per_question = evaluation_loader(dataset, config, collate)
    reference, labels = predict(qa, per_question, "cpu")
    assert sum(encoded) == len(questions)  # the old path: the tower once per question
    with torch.no_grad():
        reference_logits = torch.cat([qa.eval().logits(batch) for batch in per_question])
    qa.train()

    encoded.clear()
    predicted = predict_questions(qa, video_loader(question_videos(questions, paths), config, runner.detections,
                                                   runner.label_vocab), questions, runner.tokenizer, "cpu", batch_size=5)
    assert sum(encoded) == len(video_ids)  # once per distinct video
    assert qa.training  # mode restored
    assert predicted == reference and labels == [runner.answers.label(q.answer) for q in questions]

    # the logits themselves, from the shared head
    from stoa_vlp.tasks.retrieval import encode_videos

    ids, videos = encode_videos(qa.model, video_loader(question_videos(questions, paths), config,
                                                       runner.detections, runner.label_vocab), "cpu")
    rows = torch.tensor([ids.index(q.video_id) for q in questions])
    tokens, mask = runner.tokenizer([q.question for q in questions])
    with torch.no_grad():
        logits = qa.eval().question_logits(videos.index_select(rows), tokens, mask)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert (reference_logits - reference_logits.mean(dim=0)).abs().max() > 1e-3  # questions' logits differ

    encoded.clear()
    metrics = runner.evaluate(qa, "test")
    assert sum(encoded) == len(video_ids)
    assert metrics == evaluate_qa(qa, per_question, "cpu", kept)
