"""Bad input to the commands that read runs, checkpoints and indexes: a one-line error naming the file and
the problem, with exit status 2 (`console_main`), never a traceback or a bare exit."""

import json

import numpy as np
import pytest

from stoa_vlp.cli import console_main
from stoa_vlp.config import load_config
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.data.synth import write_video
from stoa_vlp.tasks.pipeline import task_config
from stoa_vlp.tasks.retrieval import evaluate_retrieval_records, require_distinct_clips


def checkpoint_folder(run, values):
    """RUN/checkpoints/step_00000001 holding only a state.json of `values` (a JSON text, or a value to dump)."""
    folder = run / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(values if isinstance(values, str) else json.dumps(values))
    return folder


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize(
    "state, problem",
    [
        ("{not json", "malformed JSON at line 1, column 2"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ({"step": 1}, 'no "config"'),
        ({"config": {"model": {"frames": "four"}}}, "model.frames: expected an integer, got 'four'"),
        ({"config": {"model": {"frames": 0}}}, "model.frames must be at least 1, got 0"),
    ],
)
def test_a_bad_state_json_is_named(tmp_path, capsys, state, problem):
    checkpoint = checkpoint_folder(tmp_path / "run", state)
    assert console_main(["evaluate", str(checkpoint)]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp evaluate: error: {checkpoint / 'state.json'}: {problem}")


def test_an_override_error_names_the_override_not_the_checkpoint(tmp_path, capsys):
    checkpoint = checkpoint_folder(tmp_path / "run", {"config": load_config("tiny").to_dict()})
    assert console_main(["evaluate", str(checkpoint), "--set", "data.batch_size=0"]) == 2
    assert error_line(capsys).startswith(
        "stoa-vlp evaluate: error: override 'data.batch_size=0': data.batch_size must be at least 1, got 0")


def test_refusals_exit_with_status_2_and_one_error_line(tmp_path, capsys):
    pretrained = checkpoint_folder(tmp_path / "pretrain", {"config": load_config("tiny").to_dict()})
    answer = ["answer", "--checkpoint", str(pretrained), "clip.mp4", "what is it?"]
    assert console_main(answer) == 2
    assert error_line(capsys).startswith(f"stoa-vlp answer: error: {pretrained} was trained for pre-training, not QA")
    assert console_main(["evaluate", str(pretrained), "--task", "qa"]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp evaluate: error: {pretrained} was trained for pre-training")
    (tmp_path / "empty").mkdir()
    index = ["index", str(tmp_path / "empty"), "--checkpoint", str(pretrained), "--output", str(tmp_path / "idx")]
    assert console_main(index) == 2
    assert error_line(capsys).startswith(f"stoa-vlp index: error: {tmp_path / 'empty'}: no video files")
    finetune = ["finetune", "--task", "retrieval", "--config", "tiny", "--test", "--output", str(tmp_path / "ft")]
    assert console_main(finetune) == 2
    assert error_line(capsys).startswith("stoa-vlp finetune: error: --test needs data.test")


def test_a_checkpoint_fine_tuned_for_another_task_is_refused_naming_both(tmp_path, capsys):
    """caption refuses a QA run as answer refuses a captioning run (a QA run captioned gibberish), and
    evaluate --task names both tasks instead of failing on the first line of the run's other-task file."""
    qa = checkpoint_folder(tmp_path / "qa", {"config": load_config("tiny", ["task.name=qa"]).to_dict()})
    captioning = load_config("tiny", ["task.name=captioning"])
    captioning = checkpoint_folder(tmp_path / "cap", {"config": captioning.to_dict()})
    assert console_main(["caption", "--checkpoint", str(qa), "clip.mp4"]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp caption: error: {qa} was trained for qa, not captioning: the qa "
                                         "fine-tuning moved the weights under its captioning head without training it")
    assert console_main(["answer", "--checkpoint", str(captioning), "clip.mp4", "what is it?"]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp answer: error: {captioning} was trained for captioning, not QA")
    assert console_main(["evaluate", str(qa), "--task", "captioning", "--split", "test"]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp evaluate: error: {qa} was trained for qa, not captioning")
    retrieval = task_config(load_config("tiny", ["data.test=world/MSRVTT_data.json"]), "retrieval")
    retrieval = checkpoint_folder(tmp_path / "ret", {"config": retrieval.to_dict()})
    assert console_main(["evaluate", str(retrieval), "--task", "mc", "--split", "test"]) == 2  # one module, two files
    assert error_line(capsys).startswith(
        "stoa-vlp evaluate: error: data.test world/MSRVTT_data.json comes from the checkpoint's config, where it is "
        "the retrieval annotation file; mc reads a multiple-choice file: give one with --set data.test=FILE")
    pretrained = checkpoint_folder(tmp_path / "pt", {"config": load_config("tiny", ["data.test=w.json"]).to_dict()})
    assert console_main(["evaluate", str(pretrained), "--task", "mc", "--split", "test"]) == 2
    assert "where it is the pre-training annotation file" in error_line(capsys)  # it said "retrieval"


def test_a_resumed_fine_tuning_keeps_its_task(tmp_path, capsys):
    """--resume continues the run's own task: --task defaults to it (it was required), and another is
    refused before the other task's module or data are built."""
    checkpoint_folder(tmp_path / "qa", {"config": load_config("tiny", ["task.name=qa"]).to_dict()})
    resume = ["finetune", "--config", "tiny", "--output", str(tmp_path / "qa"), "--resume", "latest"]
    assert console_main([*resume, "--task", "retrieval"]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp finetune: error: --task retrieval: {tmp_path / 'qa'}/checkpoints/"
                                         "step_00000001 was fine-tuned for qa, so --resume continues qa")
    assert console_main(resume) == 2  # resumed as QA: it needs the run's answers.json or data.train
    assert "QA needs its answer vocabulary" in error_line(capsys)
    pretrained = checkpoint_folder(tmp_path / "pretrain", {"config": load_config("tiny").to_dict()})
    assert console_main(["finetune", "--config", "tiny", "--resume", str(pretrained)]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp finetune: error: --resume: {pretrained} is a pre-training "
                                         "checkpoint")
    assert console_main(["finetune", "--config", "tiny"]) == 2
    assert error_line(capsys).startswith("stoa-vlp finetune: error: --task is required")


def test_search_with_the_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    import torch

    from stoa_vlp.model import VideoFeatures
    from stoa_vlp.tasks.search import SearchIndex, save_index

    built_with = checkpoint_folder(tmp_path / "built", {"config": load_config("tiny").to_dict()})
    other = checkpoint_folder(tmp_path / "other", {"config": load_config("tiny", ["model.frames=2"]).to_dict()})
    videos = VideoFeatures(*(torch.zeros(1, 3) for _ in range(5)))
    info = {"checkpoint": str(built_with.resolve()), "config": load_config("tiny").to_dict()}
    save_index(tmp_path / "idx", SearchIndex(["a"], ["/v/a.mp4"], videos, info))
    assert console_main(["search", str(tmp_path / "idx"), "a query", "--checkpoint", str(other)]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp search: error: {other} is another model than")


def test_retrieval_evaluation_refuses_a_clip_listed_twice():
    clip = VideoRecord("video7", "/v/video7.mp4", None, None, ["a caption"])
    moments = [VideoRecord("video8", "/v/video8.mp4", start, start + 5.0, ["a moment"]) for start in (0.0, 5.0)]
    require_distinct_clips([clip, *moments])  # moments of one video are distinct clips
    with pytest.raises(ValueError, match=r"needs each clip once, but 2 clips are listed more than once "
                                         r"\(e.g. video7, video8 \[5.0-10.0 s\]\)"):
        evaluate_retrieval_records(None, [], [clip, *moments, clip, moments[1]], None, "cpu")


def test_prepare_takes_a_single_video_file(tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video, np.zeros((4, 32, 32, 3), np.uint8), fps=4)
    out = tmp_path / "prepared"
    argv = ["prepare", str(video), str(out), "--fps", "2", "--short-side", "32", "--workers", "1", "--no-progress"]
    assert console_main(argv) == 0
    assert (out / "videos" / "clip.mp4").is_file()


def test_a_wrong_data_format_or_tag_cache_names_the_setting(tmp_path, capsys):
    # before: "unknown annotation format 'msrvt'" after the start-up warnings, naming no setting; and a
    # detections file given as data.tags was "malformed JSON at line 2", not said to be no tag cache
    detections = tmp_path / "detections.jsonl"
    detections.write_text('{"video_id": "a"}\n{"video_id": "b"}\n')
    start = ["pretrain", "--config", "tiny", "--output", str(tmp_path / "run"), "--set", f"data.train={detections}"]
    assert console_main([*start, "--set", "data.format=msrvt"]) == 2
    assert error_line(capsys).startswith("stoa-vlp pretrain: error: data.format must be auto or one of msrvtt, ")
    assert console_main([*start, "--set", f"data.tags={detections}", "--set", "data.format=jsonl"]) == 2
    assert error_line(capsys).startswith(f"stoa-vlp pretrain: error: {detections}: malformed JSON at line 2, column 1 "
                                         "(Extra data): not a stoa-vlp tag cache (written by `stoa-vlp tag`)")


@pytest.mark.parametrize("query", ["", "   "])
def test_search_refuses_an_empty_query_before_loading_the_model(tmp_path, capsys, query):
    # before: the model was built and its weights loaded first (here: no weights, so another error)
    import torch

    from stoa_vlp.model import VideoFeatures
    from stoa_vlp.tasks.search import SearchIndex, save_index

    checkpoint = checkpoint_folder(tmp_path / "run", {"config": load_config("tiny").to_dict()})  # no weights
    videos = VideoFeatures(*(torch.zeros(1, 3) for _ in range(5)))
    info = {"checkpoint": str(checkpoint.resolve()), "config": load_config("tiny").to_dict()}
    save_index(tmp_path / "idx", SearchIndex(["a"], ["/v/a.mp4"], videos, info))
    assert console_main(["search", str(tmp_path / "idx"), query]) == 2
    assert error_line(capsys).startswith("stoa-vlp search: error: the query is empty (no word the tokenizer keeps)")
