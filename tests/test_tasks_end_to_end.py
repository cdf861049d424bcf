"""Every downstream task fine-tunes a few steps and evaluates end to end on the synthetic world,
through the command line: finetune (validation selection, one test evaluation), evaluate, caption,
answer, index, search and visualise."""

import hashlib
import json
import os
import shutil

import av
import pytest

from stoa_vlp.cli import main
from stoa_vlp.data.synth import render_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return render_world(tmp_path_factory.mktemp("world"), train=4, val=2, test=2, seconds=1.0, fps=6.0,
                        captions_per_clip=2, questions_per_clip=3)


def common(world, output):
    return ["--config", "tiny", "--output", str(output),
            "--set", f"data.video_root={world.videos}", "--set", f"data.detections={world.detections}",
            "--set", "model.image_size=32", "--set", "train.steps=1", "--set", "train.eval_every=1",
            "--set", "train.save_every=1", "--set", "train.warmup_steps=1", "--set", "data.batch_size=4",
            "--set", "train.progress=false",
            "--set", "train.tensorboard=false"]


SPLIT_FILES = {
    "retrieval": lambda w: (w.annotations, w.annotations, w.annotations),
    "captioning": lambda w: (w.annotations, w.annotations, w.annotations),
    "qa": lambda w: (w.qa["train"], w.qa["val"], w.qa["test"]),
    "mc": lambda w: (w.annotations, w.mc["val"], w.mc["test"]),
}
HEADLINE = {"retrieval": "t2v_rerank_r1", "captioning": "CIDEr", "qa": "accuracy", "mc": "accuracy"}


def test_validation_on_test_videos_is_named(world, tmp_path, caplog):
    args = ["finetune", "--task", "qa", *common(world, tmp_path / "run"), "--set", f"data.train={world.qa['train']}",
            "--set", f"data.val={world.qa['test']}", "--set", f"data.test={world.qa['test']}"]
    assert main(args) == 0
    assert "data.val and data.test share 2 of the 2 test videos (e.g. video" in caplog.text
    assert json.loads((tmp_path / "run" / "report.json").read_text())["videos_in_validation"] == 2
    caplog.clear()
    assert main(["evaluate", str(tmp_path / "run"), "--split", "test", "--report", str(tmp_path / "eval.json")]) == 0
    assert f"data.val: {world.qa['test']}, data.test: {world.qa['test']}): the checkpoint is selected" in caplog.text
    assert "the numbers on them are not held out" in caplog.text
    assert json.loads((tmp_path / "eval.json").read_text())["videos_in_validation"] == 2


def test_finetuning_records_the_weights_it_started_from(world, tmp_path):
    from stoa_vlp.config import load_config
    from stoa_vlp.model import build_model
    from stoa_vlp.model.checkpoint import save_pretrained

    pretrained = tmp_path / "pretrained"
    save_pretrained(build_model(load_config("tiny", ["model.image_size=32"]).model), pretrained)
    digest = hashlib.sha256((pretrained / "model.safetensors").read_bytes()).hexdigest()
    run = tmp_path / "run"
    assert main(["finetune", "--task", "qa", *common(world, run), "--set", f"data.train={world.qa['train']}",
                 "--set", f"data.val={world.qa['val']}", "--init", str(pretrained)]) == 0
    started_from = {"folder": str(pretrained.resolve()), "step": None, "sha256": digest}  # no state.json: no step
    assert json.loads((run / "report.json").read_text())["init"] == started_from
    assert json.loads((run / "run.json").read_text())["init"] == started_from


@pytest.mark.parametrize("task", ["retrieval", "captioning", "qa", "mc"])
def test_finetune_then_evaluate(world, tmp_path, task, capsys, caplog):
    train, val, test = SPLIT_FILES[task](world)
    extra = ["--set", "task.rerank_k=2"] if task == "retrieval" else []
    if task == "captioning":
        extra = ["--set", "task.meteor=false", "--set", "task.max_caption_tokens=4"]
    run = tmp_path / "run"
    args = ["finetune", "--task", task, *common(world, run), "--set", f"data.train={train}",
            "--set", f"data.val={val}", "--set", f"data.test={test}", *extra, "--test"]
    assert main(args) == 0
    assert "data.val and data.test share" not in caplog.text  # the world's splits are disjoint
    report = json.loads((run / "report.json").read_text())
    assert report["videos_in_validation"] == 0 and report["init"] is None
    assert [r["split"] for r in report["results"]] == ["val", "test"]
    assert report["selection_metric"] == f"val/{HEADLINE[task]}"
    assert report["preprocessing"]["model.frames"] == 4
    test_metrics = report["results"][1]["metrics"]
    assert HEADLINE[task] in test_metrics
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test", "--report", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "model.frames" in printed and "split: test" in printed
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["videos_in_validation"] == 0
    assert again["metrics"] == pytest.approx(test_metrics, abs=1e-6)  # the same checkpoint, the same numbers
    assert again["preprocessing"]["model.frames"] == {"training": 4, "evaluation": 4}
    if task == "mc":  # another frame count: the frame tables are resampled at loading
        assert main(["evaluate", str(run), "--split", "test", "--set", "model.frames=6",
                     "--report", str(tmp_path / "eval6.json")]) == 0
        at_six = json.loads((tmp_path / "eval6.json").read_text())
        assert at_six["preprocessing"]["model.frames"] == {"training": 4, "evaluation": 6}
        assert "other inputs than the model was trained on: model.frames (4 in training, 6 here)" in caplog.text
        assert HEADLINE[task] in at_six["metrics"]
        with pytest.raises(ValueError, match=r"does not match the model: shape mismatch: .*positional_embedding"):
            main(["evaluate", str(run), "--split", "test", "--set", "model.image_size=64"])
    if task == "retrieval":  # QB-Norm on request, with the training captions as the query bank
        assert main(["evaluate", str(run), "--split", "test", "--set", "task.qb_norm=true",
                     "--report", str(tmp_path / "qb.json")]) == 0
        normalised = json.loads((tmp_path / "qb.json").read_text())["metrics"]
        assert normalised["t2v_r1"] == test_metrics["t2v_r1"] and "t2v_qb_r1" in normalised
        assert not any(key.startswith("v2t_qb") for key in normalised)
        video = world.videos / f"{world.video_ids['test'][0]}.mp4"
        capsys.readouterr()
        assert main(["visualise", "--checkpoint", str(run), str(video), "a red disc moves to the left",
                     "--detections", str(world.detections), "--out", str(tmp_path / "clip.png"),
                     "--json", str(tmp_path / "clip.json")]) == 0
        printed = capsys.readouterr().out
        explained = json.loads((tmp_path / "clip.json").read_text())
        assert explained["boxes"] and explained["objects"] and explained["actions"] and explained["tagged"]
        assert {match["word"] for match in explained["objects"]} <= {"disc", "left", "<sentence>"}  # nouns only
        assert f"image: {tmp_path / 'clip.png'}" in printed and (tmp_path / "clip.png").stat().st_size > 0
    if task == "captioning":
        assert set(again["captions"]) == set(world.video_ids["test"])
        video = world.videos / f"{world.video_ids['test'][0]}.mp4"
        assert main(["caption", "--checkpoint", str(run), str(video), "--max-tokens", "3"]) == 0
        assert capsys.readouterr().out.startswith(f"{video}\t")
        frames = tmp_path / "frames" / video.stem  # the same clip as a frame folder
        frames.mkdir(parents=True)
        with av.open(str(video)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                frame.to_image().save(frames / f"{index:05d}.png")
        assert main(["caption", "--checkpoint", str(run), str(frames), "--max-tokens", "3"]) == 0
        assert capsys.readouterr().out.startswith(f"{frames}\t")
        with pytest.raises(ValueError, match="was trained for captioning, not retrieval"):  # its contrastive heads moved
            main(["index", str(world.videos), "--checkpoint", str(run), "--output", str(tmp_path / "index")])
    if task == "qa":
        video = world.videos / f"{world.video_ids['test'][0]}.mp4"
        assert main(["answer", "--checkpoint", str(run), str(video), "what shape moves left?", "--top", "2"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0] == "Q: what shape moves left?" and len(lines) == 3 and lines[1].startswith("A: ")
        with pytest.raises(ValueError, match="the question is empty"):
            main(["answer", "--checkpoint", str(run), str(video), "\t"])
        with pytest.raises(ValueError, match="was trained for qa, not captioning"):  # its LM head was not fine-tuned
            main(["caption", "--checkpoint", str(run), str(video), "--max-tokens", "3"])
        with pytest.raises(ValueError, match="was trained for qa, not retrieval"):
            main(["visualise", "--checkpoint", str(run), str(video), "a red circle", "--out", str(tmp_path / "v.png")])
    if task == "retrieval":
        index = tmp_path / "index"
        assert main(["index", str(world.videos), "--checkpoint", str(run), "--output", str(index),
                     "--detections", str(world.detections)]) == 0
        capsys.readouterr()
        assert main(["search", str(index), "a red circle moves left", "--top", "3", "--rerank-k", "2"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "video" in line]
        assert len(rows) == 4  # header + 3 hits
        for blank in ("  ", "\ufeff", "\x01"):  # nothing the tokenizer keeps: an empty query, not a search
            with pytest.raises(ValueError, match="the query is empty"):
                main(["search", str(index), blank])
        # the run trained again in place: same path, other weights
        weights = next((run / "checkpoints").glob("step_*/model.safetensors"))
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        assert main(["search", str(index), "a red circle", "--rerank-k", "0"]) == 0
        assert "changed since" in caplog.text and "build the index again" in caplog.text
        partial = tmp_path / "partial.jsonl"  # detections of the first video only
        partial.write_text(world.detections.read_text().splitlines()[0] + "\n")
        caplog.clear()
        assert main(["index", str(world.videos), "--checkpoint", str(run), "--output", str(tmp_path / "index2"),
                     "--detections", str(partial)]) == 0
        assert f"{partial}: {len(list(world.videos.glob('*.mp4'))) - 1} of" in caplog.text  # reported, not silent
        video = world.videos / f"{world.video_ids['test'][0]}.mp4"
        with pytest.raises(ValueError, match="the caption is empty"):
            main(["visualise", "--checkpoint", str(run), str(video), " ", "--out", str(tmp_path / "v.png")])
        with pytest.raises(ValueError, match="its folder does not exist"):
            main(["visualise", "--checkpoint", str(run), str(video), "a red circle", "--out", str(tmp_path / "v.png"),
                  "--json", str(tmp_path / "missing" / "v.json")])
        with pytest.raises(ValueError, match="is a folder, not a file to write"):
            main(["visualise", "--checkpoint", str(run), str(video), "a red circle", "--out", str(tmp_path / "v.png"),
                  "--json", str(tmp_path)])
        assert not (tmp_path / "v.png").exists()  # nothing drawn for a run that fails
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)
        assert main(["search", str(index), "a red circle", "--checkpoint", str(moved), "--rerank-k", "0"]) == 0
        assert "the scores hold only if these are the same weights" in caplog.text
        state_file = next((moved / "checkpoints").glob("step_*/state.json"))
        state = json.loads(state_file.read_text())
        state["config"]["model"]["frames"] = 8
        state_file.write_text(json.dumps(state))
        with pytest.raises(ValueError, match="is another model than .* was built with"):
            main(["search", str(index), "a red circle", "--checkpoint", str(moved)])
        # an index built at another frame count (resampled tables) still finds its moved checkpoint
        resampled = tmp_path / "index8"
        assert main(["index", str(world.videos), "--checkpoint", str(run), "--output", str(resampled),
                     "--detections", str(world.detections), "--set", "model.frames=8"]) == 0
        shutil.rmtree(moved)
        shutil.copytree(run, moved)
        assert main(["search", str(resampled), "a red circle", "--checkpoint", str(moved), "--rerank-k", "0",
                     "--set", "train.device=cpu"]) == 0


def test_inference_detections_come_from_the_flag_or_an_override(world, tmp_path):
    from types import SimpleNamespace

    from stoa_vlp.commands.task_common import inference_config

    run = tmp_path / "run"
    assert main(["finetune", "--task", "retrieval", *common(world, run), "--set", f"data.train={world.annotations}",
                 "--set", "task.rerank_k=0"]) == 0

    def detections(flag, overrides):
        return inference_config(SimpleNamespace(checkpoint=str(run), detections=flag, overrides=overrides), "retrieval")[1].data.detections

    assert detections(None, []) == ""  # the training videos' detections are not the user's
    assert detections("mine.jsonl", []) == "mine.jsonl"
    assert detections(None, ["data.detections=theirs.jsonl"]) == "theirs.jsonl"


def test_a_recorded_selection_metric_follows_the_task():
    from stoa_vlp.config import load_config
    from stoa_vlp.tasks.pipeline import task_config

    retrieval = task_config(load_config("tiny"), "retrieval")  # a run's config.yaml records this
    assert retrieval.train.best_metric == "val/t2v_rerank_r1"
    assert task_config(retrieval, "qa").train.best_metric == "val/accuracy"
    retrieval.task.rerank_k = 0
    assert task_config(retrieval, "retrieval").train.best_metric == "val/t2v_r1"
    chosen = load_config("tiny", ["train.best_metric=val/t2v_r5"])
    assert task_config(chosen, "retrieval").train.best_metric == "val/t2v_r5"  # a choice of the user's stays


def test_task_settings_are_checked_before_training():
    from stoa_vlp.config import load_config
    from stoa_vlp.tasks.pipeline import task_config

    bad = load_config("tiny", ["task.max_caption_tokens=40", "task.mc_scoring=cosine", "task.beam_size=0"])
    with pytest.raises(ValueError, match=r"task.max_caption_tokens must be 0 .* up to model.text_len - 1 = 23, got 40; "
                                         r"task.mc_scoring must be one of vtm, vtc, got 'cosine'; task.beam_size"):
        task_config(bad, "captioning")


@pytest.mark.parametrize("task", ["retrieval", "qa"])
def test_validation_is_capped_at_its_first_videos(world, task):
    from stoa_vlp.config import load_config
    from stoa_vlp.model import build_model
    from stoa_vlp.tasks.pipeline import TaskRunner, task_config

    train, val, _ = SPLIT_FILES[task](world)
    config = task_config(load_config("tiny", [f"data.train={train}", f"data.val={val}", "model.image_size=32",
                                              f"data.video_root={world.videos}", "train.val_max_clips=1",
                                              "task.rerank_k=0"]), task)
    runner = TaskRunner(config, "cpu")
    module = runner.module(build_model(config.model))
    capped, whole = runner.evaluator("val")(module), runner.evaluate(module, "val")
    if task == "retrieval":
        assert (capped["num_videos"], whole["num_videos"]) == (1, 2)
    else:
        assert (capped["num_questions"], whole["num_questions"]) == (3, 6)  # 3 questions per clip
