"""`stoa-vlp demo` end to end at a reduced size: world, tags, pre-training, retrieval, report."""

from __future__ import annotations

import json

import pytest
import torch

from stoa_vlp.cli import main
from stoa_vlp.train.checkpointing import CheckpointError
from stoa_vlp.demo import DEMO_STAGES, DemoSettings, chance_metrics, class_noun_agreement, run_demo
from stoa_vlp.train.logging import read_metrics

SMALL = [
    "--train-clips", "12", "--val-clips", "3", "--test-clips", "6",
    "--set", "train.steps=3", "--set", "train.eval_every=3", "--set", "train.save_every=3",
    "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "data.batch_size=4",
    "--set", "model.frames=2", "--set", "model.image_size=32",
]


def test_demo_runs_end_to_end(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--output", str(folder), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "Zero-shot retrieval on 6 test clips (30 captions)" in printed and str(folder) in printed
    assert printed.rstrip().endswith(f"everything is in {folder}/ (captioning/, demo_metrics.json, pretrain/, qa/, "
                                     "report.md, visual.png, world/)")

    report = (folder / "report.md").read_text()
    for heading in ("## Synthetic world", "## Tags", "## Pre-training", "## Zero-shot retrieval",
                    "## Object-noun alignment", "## Captioning", "## Video QA", "## Time"):
        assert heading in report
    results = json.loads((folder / "demo_metrics.json").read_text())
    stages = ["world", "tags", "pretrain", "retrieval", "alignment", "captioning", "qa"]
    assert [name for name, _ in DEMO_STAGES] == stages and set(results["metrics"]) == set(stages)
    assert "CIDEr" in results["metrics"]["captioning"] and "accuracy" in results["metrics"]["qa"]
    retrieval = results["metrics"]["retrieval"]
    assert retrieval["t2v_r10"] == 100.0  # 6 videos: every caption's video is in the top 10
    assert retrieval["chance_t2v_r1"] == pytest.approx(100 / 6)
    assert results["metrics"]["pretrain"]["steps"] == 3
    alignment = results["metrics"]["alignment"]
    assert alignment["matched_trajectories"] > 0 and 0 < alignment["chance_percent"] < 100
    assert (folder / "visual.png").stat().st_size > 0 and "Object-noun alignment on 6 test clips" in printed

    train_rows = [r for r in read_metrics(folder / "pretrain") if r["split"] == "train"]
    assert train_rows and {"vtc", "vtm", "mlm", "plm", "dota", "stasp"} <= set(train_rows[-1])
    assert [r["split"] for r in read_metrics(folder / "pretrain")][-1] == "val"
    assert (folder / "pretrain" / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    vocabularies = [(folder / run / "label_vocab.json").read_text() for run in ("pretrain", "captioning", "qa")]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]  # each run keeps its ids when copied alone
    assert len(list((folder / "world" / "videos").glob("*.mp4"))) == 21

    with pytest.raises(CheckpointError, match="overwrite"):
        main(["demo", "--output", str(folder), *SMALL])

    # a second demo reuses the world and its tags (no rendering, no spaCy, no write into the world)
    tags_before = (folder / "world" / "tags.json").stat().st_mtime_ns
    reuse = run_demo(DemoSettings(world=str(folder / "world")), tmp_path / "again", stages=DEMO_STAGES[:2])
    assert reuse.metrics["world"] == {"train_clips": 12, "val_clips": 3, "test_clips": 6}
    assert reuse.config.data.tags == str(folder / "world" / "tags.json")
    assert "already tagged" in (tmp_path / "again" / "report.md").read_text()
    assert (folder / "world" / "tags.json").stat().st_mtime_ns == tags_before


def test_chance_closed_form_matches_random_scores():
    from stoa_vlp.metrics.retrieval import retrieval_metrics

    text_to_video = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 11])  # 1-4 captions each
    exact = chance_metrics(text_to_video, 12)
    assert exact["t2v_r1"] == pytest.approx(100 / 12) and exact["t2v_r10"] == pytest.approx(1000 / 12)
    assert exact["t2v_mdr"] == 6.5 and exact["t2v_mnr"] == pytest.approx(6.5)  # uniform rank on 1..12
    generator = torch.Generator().manual_seed(0)
    draws = [retrieval_metrics(torch.rand(20, 12, generator=generator), text_to_video) for _ in range(120)]
    for name in ("t2v_r1", "t2v_r5", "t2v_mdr", "v2t_r1", "v2t_r5", "v2t_r10", "v2t_mnr"):
        simulated = sum(d[name] for d in draws) / len(draws)
        assert simulated == pytest.approx(exact[name], rel=0.12, abs=1.0), name


def test_class_noun_agreement_counts_hits_and_the_chance_of_a_random_candidate():
    from stoa_vlp.tasks.visualise import SENTENCE, Match

    matches = [Match(0, "red circle", "circle", 2, 0.9), Match(1, "blue square", SENTENCE, -1, 0.5),
               Match(2, "green circle", "square", 7, 0.1)]
    nouns = ["circle", "square", "circle", "left"]  # 5 candidates with the sentence feature
    hits, chance = class_noun_agreement(matches, nouns)
    assert hits == 1  # only the red circle took a noun of its class
    assert chance == pytest.approx(2 / 5 + 1 / 5 + 2 / 5)


def test_clip_counts_cannot_be_given_with_a_world(tmp_path):
    from stoa_vlp.cli import main

    with pytest.raises(ValueError, match="--world w brings its own clips: --train-clips"):
        main(["demo", "--world", "w", "--val-clips", "0", "--output", str(tmp_path / "demo")])


@pytest.mark.parametrize("setting, problem", [
    ("train.stesp=3", "unknown config key 'train.stesp'"),
    ("model.frames=0", "model.frames must be at least 1, got 0"),
    ("task.beam_size=0", "task.beam_size must be at least 1, got 0"),  # checked by the captioning stage's config
    ("train.epochs=3", "the demo's stages take their lengths from train.steps"),  # else ignored without a word
])
def test_a_demo_that_cannot_start_writes_nothing(tmp_path, setting, problem):
    folder = tmp_path / "demo"
    with pytest.raises(ValueError, match=problem):
        main(["demo", "--output", str(folder), "--set", setting])
    assert not folder.exists()  # no rendered world that a corrected rerun would call "not empty"


def test_a_failed_demo_is_checked_as_pretrain_and_can_be_overwritten(tmp_path, caplog):
    def fail(run):
        raise RuntimeError("stopped after the world")

    folder = tmp_path / "demo"
    settings = DemoSettings(train_clips=1, val_clips=0, test_clips=1, render_workers=1, overrides=["train.steps=20"])
    with pytest.raises(RuntimeError, match="stopped after the world"):
        run_demo(settings, folder, stages=[DEMO_STAGES[0], ("fail", fail)])
    assert "train.warmup_steps=20 is not below train.steps=20" in caplog.text  # as pretrain warns
    assert sorted(path.name for path in folder.iterdir()) == ["demo_metrics.json", "world"]
    with pytest.raises(CheckpointError, match="is not empty; pass --overwrite"):
        run_demo(settings, folder, stages=[])
    reusing = DemoSettings(world=str(folder / "world"), val_clips=0, render_workers=1, overrides=["train.steps=20"])
    with pytest.raises(CheckpointError, match="would delete .* with the --world .* it reuses"):
        run_demo(reusing, folder, stages=[], overwrite=True)
    assert (folder / "world").is_dir()  # before, deleted with the folder it was to be read from
    run_demo(settings, folder, stages=[], overwrite=True)  # the failed demo's folder, replaced
    assert not (folder / "world").exists()
    (folder / "mine.txt").write_text("not a demo's")
    (folder / "demo_metrics.json").unlink()
    with pytest.raises(CheckpointError, match="does not hold a stoa-vlp demo"):
        run_demo(settings, folder, stages=[], overwrite=True)


def test_retrieval_stage_decodes_and_encodes_each_test_clip_once_with_the_same_numbers(tmp_path, monkeypatch):
    # before: one row per (clip, caption), so each clip was decoded once per caption (and encoded once, as
    # extract_features encodes a clip's first row only)
    import stoa_vlp.data.dataset
    import stoa_vlp.tasks.retrieval
    from stoa_vlp.config import load_config
    from stoa_vlp.data.annotations import read_annotations
    from stoa_vlp.data.synth import render_world
    from stoa_vlp.metrics.retrieval import retrieval_metrics
    from stoa_vlp.model import build_model
    from stoa_vlp.tasks.retrieval import contrastive_similarity, extract_features
    from stoa_vlp.demo import DemoRun, retrieval_stage
    from stoa_vlp.train.evaluation import retrieval_loader

    world = render_world(tmp_path / "world", train=0, val=0, test=4, seed=3, size=32)
    config = load_config("tiny", [
        f"data.test={world.annotations}", f"data.video_root={world.videos}", f"data.detections={world.detections}",
        "data.batch_size=3", "data.num_workers=0", "model.frames=2", "model.image_size=32",
        "train.progress=false",
    ])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    encoded, decoded, similarities = [], [], []

    def recording(function, record):  # function, which first appends record(*its arguments) to a list
        return lambda *args, **kwargs: record(*args, **kwargs) or function(*args, **kwargs)

    monkeypatch.setattr(model, "encode_video", recording(
        model.encode_video, lambda frames, *_: encoded.append(len(frames))))
    monkeypatch.setattr(stoa_vlp.data.dataset, "decode_clip", recording(
        stoa_vlp.data.dataset.decode_clip, lambda *_, **kwargs: decoded.append(kwargs["name"])))
    monkeypatch.setattr(stoa_vlp.tasks.retrieval, "retrieval_metrics", recording(
        retrieval_metrics, lambda similarity, *_, **__: similarities.append(similarity)))

    run = DemoRun(DemoSettings(), tmp_path / "demo", config=config, model=model)
    retrieval_stage(run)
    records = read_annotations(world.annotations, split="test")
    assert sum(len(record.captions) for record in records) == 20  # 5 captions per clip
    assert sorted(decoded) == sorted(record.path for record in records) and sum(encoded) == 4  # once per clip

    decoded.clear(), encoded.clear()
    with torch.no_grad():  # the stage's old computation
        videos, texts, text_to_video = extract_features(model, retrieval_loader(config, "test"), "cpu")
        similarity = contrastive_similarity(videos, texts, config.loss.vtc_video_feature)
    assert len(decoded) == 20 and sum(encoded) == 4  # decoded once per caption
    torch.testing.assert_close(similarities[0], similarity, rtol=0, atol=1e-6)
    chance = chance_metrics(text_to_video, 4)
    old = {**retrieval_metrics(similarity, text_to_video), **{f"chance_{k}": v for k, v in chance.items()}}
    assert run.metrics["retrieval"] == old
