"""The library's way into a trained run (`stoa_vlp.load_run`): the model in eval mode with the config it
was trained with, the run's class ids and a QA run's answer head; and the README's Python API section,
run as written."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stoa_vlp import load_run
from stoa_vlp.cli import main
from stoa_vlp.config import load_config
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.data.side_data import load_detections
from stoa_vlp.data.detections import LabelVocab
from stoa_vlp.data.synth import write_video
from stoa_vlp.model import build_model
from stoa_vlp.tasks.data import video_loader
from stoa_vlp.tasks.qa import ANSWER_OUTPUTS, AnswerVocab, QAModel
from stoa_vlp.train.checkpointing import save_weights

README = Path(__file__).resolve().parent.parent / "README.md"


def tiny_run(run: Path, task: str = "retrieval", answers: list[str] | None = None) -> Path:
    """RUN/checkpoints/step_00000001 of an untrained tiny model fine-tuned for `task`, as training writes it
    (model.safetensors and state.json; a QA run's answers.json)."""
    config = load_config("tiny", ["model.image_size=32", "model.frames=2", "data.num_workers=0", f"task.name={task}"])
    checkpoint = run / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.manual_seed(0)
    module = build_model(config.model)
    if answers is not None:
        module = QAModel(module, len(answers))
        AnswerVocab(answers).save(run / "answers.json")
    save_weights(module.state_dict(), checkpoint / "model.safetensors")
    (checkpoint / "state.json").write_text(json.dumps({"config": config.to_dict()}))
    return checkpoint


def write_clip(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, np.random.default_rng(seed).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), fps=4)
    return path


def detections_line(video_id: str, classes: list[str]) -> str:
    objects = [{"class": name, "rect": [2, 2, 20, 20], "conf": 0.9} for name in classes]
    return json.dumps({"video_id": video_id, "width": 32, "height": 32, "frames": [{"time": 0.0, "objects": objects}]})


def test_a_run_folder_loads_its_model_in_eval_mode_with_its_config(tmp_path):
    checkpoint = tiny_run(tmp_path / "run")
    run = load_run(tmp_path / "run", device="cpu")
    assert run.checkpoint == checkpoint and run.device == torch.device("cpu")
    assert not run.model.training and run.config.model.frames == 2 and run.config.model.image_size == 32
    assert run.qa_model is None and run.answers is None
    assert load_run(checkpoint, "cpu", ["model.frames=4"]).config.model.frames == 4  # frame tables resampled
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        load_run(tmp_path / "nothing")


def test_a_run_loads_without_the_clip_file_it_started_from(tmp_path):
    checkpoint = tiny_run(tmp_path / "run")
    state = json.loads((checkpoint / "state.json").read_text())
    state["config"]["model"]["init_checkpoint"] = str(tmp_path / "clip.pt")  # deleted, or left on another machine
    (checkpoint / "state.json").write_text(json.dumps(state))
    run = load_run(tmp_path / "run", device="cpu")
    assert run.config.model.init_checkpoint == str(tmp_path / "clip.pt")
    model = run.model.state_dict()
    assert all(torch.equal(model[name], value) for name, value in load_file(checkpoint / "model.safetensors").items())


def test_a_qa_run_gives_its_answer_head_and_answers(tmp_path):
    # load_pretrained dropped the answer head: a QA model could not be used from Python
    checkpoint = tiny_run(tmp_path / "qa", "qa", ["yes", "no", "red"])
    run = load_run(tmp_path / "qa", device="cpu")
    assert isinstance(run.qa_model, QAModel) and run.qa_model.model is run.model and not run.qa_model.training
    assert run.answers.answers == ["yes", "no", "red"]
    saved = load_file(checkpoint / "model.safetensors")
    assert torch.equal(run.qa_model.state_dict()[ANSWER_OUTPUTS], saved[ANSWER_OUTPUTS])  # the trained head
    write_clip(tmp_path / "clip.mp4")
    question = [VideoRecord("clip", str(tmp_path / "clip.mp4"), captions=["what colour is it?"])]
    with torch.no_grad():
        logits = run.qa_model.logits(next(iter(video_loader(question, run.config))))
    assert logits.shape == (1, 3)
    (tmp_path / "qa" / "answers.json").unlink()
    with pytest.raises(FileNotFoundError, match="answers.json does not exist"):
        load_run(checkpoint, device="cpu")


def test_detections_read_with_a_runs_config_keep_the_class_ids_it_learned(tmp_path):
    # load_detections(config) of a config without data.label_vocab numbered the classes by their
    # frequency in the user's file, not as the model learned them
    tiny_run(tmp_path / "run")
    learned = LabelVocab.from_counts({"dog": 5, "ball": 3, "cat": 1})
    learned.save(tmp_path / "run" / "label_vocab.json")
    mine = tmp_path / "mine.jsonl"
    mine.write_text(detections_line("clip", ["cat", "cat", "cat", "ball", "dog"]) + "\n")
    assert LabelVocab.from_counts({"cat": 3, "ball": 1, "dog": 1}).names != learned.names  # else this checks nothing
    run = load_run(tmp_path / "run", device="cpu", overrides=[f"data.detections={mine}"])
    detections, label_vocab = load_detections(run.config)
    assert label_vocab.names == learned.names and set(detections) == {"clip"}


def test_video_loader_takes_records_without_captions(tmp_path):
    # encoding videos without text stopped at an IndexError deep in the dataset
    write_clip(tmp_path / "clip.mp4")
    config = load_config("tiny", ["model.image_size=32", "model.frames=2", "data.num_workers=0"])
    batch = next(iter(video_loader([VideoRecord("clip", str(tmp_path / "clip.mp4"))], config)))
    assert batch.video_ids == ["clip"] and batch.frames.shape == (1, 2, 3, 32, 32)


def python_api_snippets() -> list[str]:
    section = README.read_text().split("### Python API (library)\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readmes_python_api_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny_run(Path("runs/msrvtt-ret"))
    tiny_run(Path("runs/msrvtt-cap"), "captioning")
    tiny_run(Path("runs/msrvtt-qa"), "qa", ["cooking", "running"])
    LabelVocab.from_counts({"person": 2, "dog": 1}).save("runs/msrvtt-ret/label_vocab.json")
    for seed, video_id in enumerate(("cooking", "dog")):
        write_clip(Path("my_videos") / f"{video_id}.mp4", seed)
    Path("my_videos/detections.jsonl").write_text(
        detections_line("cooking", ["person"]) + "\n" + detections_line("dog", ["dog"]) + "\n")
    snippets = python_api_snippets()
    assert len(snippets) == 5 and "load_run" in snippets[0]
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["label_vocab"].names == LabelVocab.load("runs/msrvtt-ret/label_vocab.json").names
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2] in ("cooking", "running")  # the QA run's answer


def test_answer_warns_of_a_question_cut_off_at_the_text_length(tmp_path, capsys, caplog):
    # a question, query or caption longer than model.text_len was cut off without a word
    tiny_run(tmp_path / "qa", "qa", ["yes", "no"])
    clip = str(write_clip(tmp_path / "clip.mp4"))
    length = load_config("tiny").model.text_len
    assert main(["answer", "--checkpoint", str(tmp_path / "qa"), clip, "is it red?", "--top", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "Q: is it red?" and "cut off" not in caplog.text
    question = " ".join(["red"] * length)
    assert main(["answer", "--checkpoint", str(tmp_path / "qa"), clip, question]) == 0
    assert f"the question has {length} tokens, more than the {length - 2} that model.text_len={length}" in caplog.text
    assert "its last 2 are cut off" in caplog.text


def test_caption_of_a_folder_of_videos_says_to_give_the_files(tmp_path):
    # it failed in the decoder with "frame folder holds no images"
    tiny_run(tmp_path / "cap", "captioning")
    write_clip(tmp_path / "videos" / "one.mp4")
    write_clip(tmp_path / "videos" / "two.mp4")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'videos'} is a folder of 2 video files, not a frame "
                                                   f"folder: give the videos themselves (e.g. {tmp_path / 'videos'}/*.mp4)")):
        main(["caption", "--checkpoint", str(tmp_path / "cap"), str(tmp_path / "videos")])


def test_caption_help_names_the_checkpoints_default_length(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert "task.max_caption_tokens of the checkpoint" in " ".join(capsys.readouterr().out.split())
