"""Validation during pre-training: the contrastive feature it ranks by and its cap on the videos."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from stoa_vlp.config import load_config
from stoa_vlp.data.annotations import read_annotations
from stoa_vlp.data.synth import render_world
from stoa_vlp.model import build_model
from stoa_vlp.tasks.retrieval import evaluate_retrieval
from stoa_vlp.train.evaluation import RetrievalEvaluator, retrieval_loader


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return render_world(tmp_path_factory.mktemp("world"), train=0, val=5, test=0, seed=3, size=32)


def tiny(world, *overrides):
    return load_config("tiny", [
        f"data.val={world.annotations}", f"data.video_root={world.videos}", f"data.detections={world.detections}",
        "data.batch_size=3", "model.frames=2", "model.image_size=32", *overrides,
    ])


def test_validation_ranks_by_the_configured_video_feature(world, monkeypatch):
    import stoa_vlp.tasks.retrieval

    asked = []
    evaluate = stoa_vlp.tasks.retrieval.evaluate_retrieval_records
    monkeypatch.setattr(stoa_vlp.tasks.retrieval, "evaluate_retrieval_records",
                        lambda *args, **kwargs: asked.append(kwargs["video_feature"]) or evaluate(*args, **kwargs))
    config = tiny(world, "loss.vtc_video_feature=sep")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    RetrievalEvaluator(config, "val", torch.device("cpu"))(model)
    assert asked == ["sep"]


def test_validation_reads_its_annotation_file_once(world, monkeypatch):
    # before: once to check it before training, once more to build the loader at the first validation
    import stoa_vlp.data.annotations
    import stoa_vlp.data.dataset

    reads = []
    read = stoa_vlp.data.annotations.read_annotations

    def counting(path, *args, **kwargs):
        reads.append(path)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(stoa_vlp.data.annotations, "read_annotations", counting)
    monkeypatch.setattr(stoa_vlp.data.dataset, "read_annotations", counting)
    config = tiny(world)
    torch.manual_seed(0)
    evaluator = RetrievalEvaluator(config, "val", torch.device("cpu"))
    metrics = evaluator(build_model(config.model).eval())
    assert reads == [str(world.annotations)] and metrics["num_videos"] == 5


@pytest.mark.parametrize("max_videos", [0, 3])
def test_validation_decodes_each_video_once_and_keeps_the_per_caption_metrics(world, monkeypatch, max_videos):
    import stoa_vlp.data.dataset

    decoded = []
    decode = stoa_vlp.data.dataset.decode_clip
    monkeypatch.setattr(stoa_vlp.data.dataset, "decode_clip",
                        lambda source, *args, **kwargs: decoded.append(kwargs["name"]) or decode(source, *args, **kwargs))
    config = tiny(world, "loss.vtc_video_feature=sep")
    records = read_annotations(world.annotations, split="val")
    assert all(len(record.captions) > 1 for record in records)  # several captions per video
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    metrics = RetrievalEvaluator(config, "val", torch.device("cpu"), max_videos=max_videos)(model)
    videos = records[:max_videos] if max_videos else records
    assert sorted(decoded) == sorted(record.path for record in videos)  # once per video, not per caption
    # the per-caption loader (one decode per caption) gives the same metrics
    old = evaluate_retrieval(model, retrieval_loader(config, "val", max_videos), "cpu", video_feature="sep")
    assert metrics.keys() == old.keys()
    assert metrics == pytest.approx(old, abs=1e-5)
    assert metrics["num_texts"] == sum(len(record.captions) for record in videos)
    assert metrics["num_videos"] == len(videos)


def test_a_stream_is_capped_at_its_first_videos(world, tmp_path):
    shard = tmp_path / "val.tar"
    records = read_annotations(world.annotations, split="val")
    with tarfile.open(shard, "w") as archive:
        for record in records:
            for name, data in ((f"{record.video_id}.mp4", open(record.path, "rb").read()),
                               (f"{record.video_id}.json", json.dumps({"caption": record.captions[0]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    config = tiny(world, f"data.val={shard}")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    batches = list(retrieval_loader(config, "val", max_videos=4))  # batches of 3: the second one is cut
    assert [batch.video_ids for batch in batches] == [[r.video_id for r in records[:3]], [records[3].video_id]]
    assert batches[1].frames.shape[0] == batches[1].tokens.shape[0] == batches[1].video_index.shape[0] == 1
    metrics = RetrievalEvaluator(config, "val", torch.device("cpu"), max_videos=4)(model)
    assert metrics["num_videos"] == metrics["num_texts"] == 4.0


def test_a_capped_stream_validates_the_same_videos_whatever_the_worker_count(world, tmp_path):
    records = read_annotations(world.annotations, split="val")
    for number, part in enumerate((records[:3], records[3:])):  # two shards: workers would take one each
        with tarfile.open(tmp_path / f"val{number}.tar", "w") as archive:
            for record in part:
                for name, data in ((f"{record.video_id}.mp4", open(record.path, "rb").read()),
                                   (f"{record.video_id}.txt", record.captions[0].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    seen = []
    for workers in (0, 2):
        config = tiny(world, f"data.val={tmp_path}", f"data.num_workers={workers}", "data.batch_size=2")
        seen.append([video_id for batch in retrieval_loader(config, "val", max_videos=3) for video_id in batch.video_ids])
    assert seen[0] == seen[1] == [record.video_id for record in records[:3]]


def test_validation_refuses_a_clip_listed_twice(world, tmp_path):
    data = json.loads(open(world.annotations).read())
    first = next(video for video in data["videos"] if video["split"] == "validate")
    data["videos"].append(dict(first))  # MSR-VTT's list of videos naming one twice
    path = tmp_path / "MSRVTT_data.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"but 1 clips are listed more than once \\(e.g. {first['video_id']}\\)"):
        retrieval_loader(tiny(world, f"data.val={path}"), "val")
