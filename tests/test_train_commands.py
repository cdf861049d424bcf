"""`stoa-vlp pretrain` from the command line: config + overrides, run folder rules, --resume latest."""

from __future__ import annotations

import json

import pytest

from stoa_vlp.cli import main
from stoa_vlp.data.synth import render_world
from stoa_vlp.data.tags import TagCache
from stoa_vlp.train.checkpointing import CheckpointError, list_checkpoints
from stoa_vlp.train.logging import read_metrics


def test_pretrain_command_resumes_and_guards_finished_runs(tmp_path, caplog):
    world = render_world(tmp_path / "world", train=8, val=3, test=0, seed=1)
    run = tmp_path / "run"
    common = [
        "pretrain", "--config", "tiny", "--output", str(run),
        "--set", f"data.train={world.annotations}", "--set", f"data.val={world.annotations}",
        "--set", f"data.video_root={world.videos}", "--set", f"data.detections={world.detections}",
        "--set", "data.batch_size=4", "--set", "model.frames=2", "--set", "model.image_size=32",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.save_every=1",
        "--set", "train.eval_every=2", "--set", "train.warmup_steps=1", "--set", "train.lr=1.0e-3",
        "--set", "train.log_every=1", "--set", "train.val_max_clips=2",
    ]
    assert main(common + ["--set", "train.steps=2"]) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(w.startswith("data.tags is not set: captions carry no noun/verb tags") for w in warnings)
    assert any(w.startswith("model.init_checkpoint is not set: the CLIP towers start from random") for w in warnings)
    assert not any(w.startswith("data.detections is not set") for w in warnings)  # the world has them
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    with pytest.raises(CheckpointError, match="finished run"):
        main(common + ["--set", "train.steps=3"])

    caplog.clear()
    assert main(common + ["--set", "train.steps=3", "--resume", "latest"]) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert not any(w.startswith("model.init_checkpoint is not set") for w in warnings)  # its towers were trained
    state = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["train"]["steps"] == 3
    train_steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert train_steps == [1, 2, 3]  # the resumed run appended step 3 only
    val = [r for r in read_metrics(run) if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 3] and val[0]["num_videos"] == 2.0  # train.val_max_clips


@pytest.mark.parametrize("command, problem", [
    (["pretrain"], "train.eval_every must be at least 1, got 0"),
    (["finetune", "--task", "retrieval"], "train.eval_every must be at least 1, got 0"),
    (["finetune", "--task", "qa"], "1 videos not found"),  # found after the answer list was built
])
def test_a_run_that_cannot_start_writes_nothing(tmp_path, command, problem):
    world = render_world(tmp_path / "world", train=2, val=1, test=0, seconds=1.0, fps=4.0, captions_per_clip=1)
    run = tmp_path / "run"
    train, val = (world.qa["train"], world.qa["val"]) if "qa" in command else (world.annotations, "")
    argv = [*command, "--config", "tiny", "--output", str(run), "--set", f"data.train={train}",
            "--set", f"data.val={val}", "--set", f"data.video_root={world.videos}",
            "--set", f"data.detections={world.detections}", "--set", "train.progress=false",
            "--set", "train.tensorboard=false"]
    if "qa" in command:
        (world.videos / f"{world.video_ids['val'][0]}.mp4").unlink()
    else:
        argv += ["--set", "train.eval_every=0"]
    with pytest.raises(ValueError, match=problem):
        main(argv)
    assert not run.exists()  # nothing (no label_vocab.json, answers.json) that --overwrite would refuse to delete


@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "--task", "retrieval"], ["finetune", "--task", "qa"],
                                     ["finetune", "--task", "mc", "--test"]])
@pytest.mark.parametrize("problem", ["missing file", "missing video"])
def test_evaluation_splits_are_checked_before_training(tmp_path, command, problem):
    """A wrong data.val (or, with --test, data.test) used to fail at the first validation, before that
    step's checkpoint, or after the whole fine-tuning; it fails before the first step now."""
    world = render_world(tmp_path / "world", train=2, val=2, test=0, seconds=1.0, fps=4.0, captions_per_clip=1)
    task = command[2] if len(command) > 2 else "retrieval"
    split = {"retrieval": world.annotations, "qa": world.qa["val"], "mc": world.mc["val"]}[task]
    train = world.qa["train"] if task == "qa" else world.annotations
    if problem == "missing video":
        (world.videos / f"{world.video_ids['val'][1]}.mp4").unlink()
    else:
        split = tmp_path / "typo.json"
    evaluated = "test" if "--test" in command else "val"
    run = tmp_path / "run"
    argv = [*command, "--config", "tiny", "--output", str(run), "--set", f"data.train={train}",
            "--set", f"data.{evaluated}={split}", "--set", f"data.video_root={world.videos}",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.steps=1"]
    expected = "does not exist" if problem == "missing file" else "1 (of 2 )?videos not found"
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        main(argv)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("task", ["retrieval", "qa"])
def test_a_capped_validation_needs_only_the_videos_it_reads(tmp_path, task):
    """With train.val_max_clips, validation reads the first videos only; a later video missing from
    disk (a clip taken down) must not stop the run."""
    world = render_world(tmp_path / "world", train=2, val=3, test=0, seconds=1.0, fps=4.0, captions_per_clip=1)
    (world.videos / f"{world.video_ids['val'][-1]}.mp4").unlink()
    train, val = (world.qa["train"], world.qa["val"]) if task == "qa" else (world.annotations, world.annotations)
    run = tmp_path / "run"
    argv = ["finetune", "--task", task, "--config", "tiny", "--output", str(run), "--set", f"data.train={train}",
            "--set", f"data.val={val}", "--set", f"data.video_root={world.videos}", "--set", "train.val_max_clips=1",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.steps=1",
            "--set", "data.batch_size=2"]
    assert main(argv) == 0
    validations = [r for r in read_metrics(run) if r["split"] == "val"]
    counted = "num_videos" if task == "retrieval" else "num_questions"
    assert len(validations) == 1 and 0 < validations[0][counted] <= (1 if task == "retrieval" else 10)


def test_pretraining_reads_detections_and_tags_once_for_training_and_validation(tmp_path, monkeypatch):
    import numpy as np

    from stoa_vlp.data import side_data
    from stoa_vlp.data.annotations import read_annotations

    world = render_world(tmp_path / "world", train=4, val=2, test=0, seed=1)
    caption = read_annotations(world.annotations, "auto", "train")[0].captions[0]
    tags = TagCache(tmp_path / "tags.json", length=16)
    tags.update({caption: np.zeros(3, dtype=np.int64)})
    tags.save()
    reads = {"detections": 0, "tags": 0}

    def counted(what, read):
        def wrapper(*args, **kwargs):
            reads[what] += 1
            return read(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(side_data, "read_packed_detections", counted("detections", side_data.read_packed_detections))
    monkeypatch.setattr(TagCache, "read", counted("tags", TagCache.read))
    run = tmp_path / "run"
    assert main([
        "pretrain", "--config", "tiny", "--output", str(run),
        "--set", f"data.train={world.annotations}", "--set", f"data.val={world.annotations}",
        "--set", f"data.video_root={world.videos}", "--set", f"data.detections={world.detections}",
        "--set", f"data.tags={tmp_path / 'tags.json'}",
        "--set", "data.batch_size=4", "--set", "model.frames=2", "--set", "model.image_size=32",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.steps=1",
        "--set", "train.eval_every=1", "--set", "train.warmup_steps=1",
    ]) == 0
    assert [r["step"] for r in read_metrics(run) if r["split"] == "val"] == [1]  # validation read its split
    assert reads == {"detections": 1, "tags": 1}


def test_validation_keeps_only_its_own_videos_detections(tmp_path):
    # sharing the read must not keep the whole file's detections alive for the run (about 4 KB a video)
    from stoa_vlp.train.evaluation import pretraining_data
    from stoa_vlp.config import load_config
    from stoa_vlp.data.annotations import read_annotations
    from stoa_vlp.train.distributed import DistEnv

    world = render_world(tmp_path / "world", train=3, val=2, test=2, seed=1)
    config = load_config("tiny", [f"data.train={world.annotations}", f"data.val={world.annotations}",
                                  f"data.detections={world.detections}", f"data.video_root={world.videos}"])
    train_set, evaluate = pretraining_data(config, DistEnv.current("cpu"), validate=True)
    val_ids = {record.video_id for record in read_annotations(world.annotations, split="val")}
    assert set(evaluate.side_data.detections) == val_ids and evaluate.side_data.tags is None
    train_ids = {record.video_id for record in read_annotations(world.annotations, split="train")}
    assert len(train_set.builder.detections) == len(train_ids) and all(i in train_set.builder.detections for i in train_ids)


def test_validation_holding_test_videos_is_warned_about_and_never_stops_a_run(tmp_path, caplog):
    from stoa_vlp.commands.common import validation_overlap
    from stoa_vlp.config import load_config

    world = render_world(tmp_path / "world", train=2, val=1, test=2, seed=1)
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"video_id": world.video_ids["test"][0], "caption": "a red disc"}) + "\n")
    config = load_config("tiny", [f"data.val={val}", f"data.test={world.annotations}"])
    assert validation_overlap(config, config, "test") == 1
    assert f"data.val and data.test share 1 of the 2 test videos (e.g. {world.video_ids['test'][0]};" in caplog.text
    caplog.clear()
    config.data.val = str(world.annotations)  # read as its val split, apart from its test split
    assert validation_overlap(config, config, "test") == 0 and not caplog.records
    # pre-training reads no data.test: a test file that is missing or has a bad line was an error there
    config.data.test = str(tmp_path / "missing.jsonl")
    assert validation_overlap(config, config, "test") is None
    assert "cannot tell whether data.val" in caplog.text and "missing.jsonl: annotation file does not exist" in caplog.text
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"video_id": "video0", "caption": ""}) + "\n")
    config.data.test = str(bad)
    assert validation_overlap(config, config, "test") is None
    config.data.val = config.data.test = str(tmp_path / "shards" / "{000..001}.tar")  # streamed: compared by path
    assert validation_overlap(config, config, "test") is None
    assert "data.val and data.test are both" in caplog.text


@pytest.mark.parametrize("extra, problem", [
    (["pretrain", "--resume", "/nonexistent"], "--resume /nonexistent: no complete checkpoint"),
    (["pretrain", "--resume", "latest"], "--resume latest: no complete checkpoint in"),
    (["pretrain", "--set", "task.name=captioning"], "task.name=captioning: pretrain trains the pre-training"),
    (["pretrain", "--set", "data.label_vocab=/nonexistent.json"], "data.label_vocab /nonexistent.json does not exist"),
    (["finetune", "--task", "captioning", "--set", "data.label_vocab=/nonexistent.json"],
     "data.label_vocab /nonexistent.json does not exist"),
    (["finetune", "--task", "qa", "--set", "task.answer_vocab=/nonexistent.json"],
     "task.answer_vocab /nonexistent.json does not exist"),
    # the override was silently replaced by --task's
    (["finetune", "--task", "retrieval", "--set", "task.name=qa"], "--set task.name=qa: finetune trains the task of "
                                                                   "--task, retrieval; leave task.name out"),
    (["finetune", "--task", "mc", "--set", "task={name: captioning}"], "finetune trains the task of --task, mc"),
])
def test_a_resume_or_a_file_that_is_not_there_fails_before_the_run_folder(tmp_path, extra, problem):
    """--resume failed only after the run folder got label_vocab.json; a missing data.label_vocab was a
    warning and a rebuilt vocabulary, a missing task.answer_vocab an OSError naming no setting."""
    world = render_world(tmp_path / "world", train=2, val=1, test=0, seconds=1.0, fps=4.0, captions_per_clip=1)
    run = tmp_path / "run"
    train, val = (world.qa["train"], world.qa["val"]) if "qa" in extra else (world.annotations, world.annotations)
    argv = [*extra, "--config", "tiny", "--output", str(run), "--set", f"data.train={train}",
            "--set", f"data.val={val}", "--set", f"data.video_root={world.videos}",
            "--set", f"data.detections={world.detections}", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "task.meteor=false"]
    with pytest.raises((ValueError, CheckpointError), match=problem):
        main(argv)
    assert not run.exists()
