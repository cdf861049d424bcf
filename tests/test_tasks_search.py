"""Search index round trip and ranking: contrastive order, then fusion re-ranking of the top-k only."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from stoa_vlp.cli import console_main, main
from stoa_vlp.config import load_config
from stoa_vlp.data.skips import WARNINGS_PER_REASON
from stoa_vlp.data.synth import write_video
from stoa_vlp.model import VideoFeatures, build_model
from stoa_vlp.model.checkpoint import save_pretrained
from stoa_vlp.tasks.retrieval import contrastive_similarity, encode_texts, logit_scale_value, match_probability
from stoa_vlp.tasks.search import SearchIndex, load_index, save_index, search
from stoa_vlp.tokenizer import Tokenizer


def encoded_videos(count: int):
    """(tiny config, its model, `count` random videos encoded by it)."""
    torch.manual_seed(0)
    config = load_config("tiny")
    model = build_model(config.model).eval()
    m = config.model
    frames = torch.randn(count, m.frames, 3, m.image_size, m.image_size)
    boxes = torch.tensor([2.0, 2.0, 40.0, 40.0]).expand(count, m.frames, m.boxes_per_frame, 4).clone()
    labels = torch.ones(count, m.frames, m.boxes_per_frame, dtype=torch.long)
    traj = torch.zeros(count, m.trajectories, dtype=torch.long)
    traj[:, 0] = 1
    with torch.no_grad():
        return config, model, model.encode_video(frames, boxes, labels, labels > 0, traj, traj > 0)


def test_index_round_trip_and_ranking(tmp_path):
    count = 6
    config, model, videos = encoded_videos(count)
    tokenizer = Tokenizer(config.model.text_len)
    ids = [f"clip{i}" for i in range(count)]
    info = {"checkpoint": "/runs/ret/checkpoints/step_00000001", "config": config.to_dict()}
    save_index(tmp_path / "idx", SearchIndex(ids, [f"/videos/{i}.mp4" for i in ids], videos, info))
    index = load_index(tmp_path / "idx")
    assert index.video_ids == ids and index.info == json.loads(json.dumps(info))
    torch.testing.assert_close(index.videos.trajectories, videos.trajectories)

    hits = search(model, index, "a red square moves left", tokenizer, "cpu", top=5, rerank_k=3)
    with torch.no_grad():
        text = encode_texts(model, *tokenizer(["a red square moves left"]), "cpu")
        cosine = contrastive_similarity(videos, text, "mean")[0]
        top3 = cosine.argsort(descending=True)[:3]
        match = match_probability(model, videos, text, torch.zeros(3, dtype=torch.long), top3)
    fused = torch.softmax(logit_scale_value(model) * cosine[top3], 0) * match
    expected_head = [ids[int(top3[i])] for i in fused.argsort(descending=True)]
    expected_tail = [ids[int(i)] for i in cosine.argsort(descending=True)[3:5]]
    assert [h.video_id for h in hits] == expected_head + expected_tail
    assert [h.match is None for h in hits] == [False] * 3 + [True] * 2
    assert hits[3].cosine == pytest.approx(float(cosine.sort(descending=True).values[3]), abs=1e-5)


def test_a_video_with_nan_features_comes_last(tmp_path):
    # torch's argsort takes NaN for the largest value: such a video came first, and in the re-ranked
    # top-k its NaN made every fused score NaN
    config, model, videos = encoded_videos(4)
    for field in dataclasses.fields(videos):
        values = getattr(videos, field.name)
        if values.is_floating_point():
            values[0] = float("nan")
    ids = [f"clip{i}" for i in range(4)]
    index = SearchIndex(ids, [f"/videos/{i}.mp4" for i in ids], videos, {})
    for rerank_k in (0, 4):
        hits = search(model, index, "a red square", Tokenizer(config.model.text_len), "cpu", top=4, rerank_k=rerank_k)
        assert [hit.video_id for hit in hits][-1] == "clip0"


def test_load_index_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing index.json"):
        load_index(tmp_path)


def small_index(folder):
    """An index of two videos with made-up features; (folder, the values of its index.json)."""
    videos = VideoFeatures(**{field.name: torch.zeros(2, 3) for field in dataclasses.fields(VideoFeatures)})
    info = {"checkpoint": "/runs/ret/checkpoints/step_00000001", "config": {}}
    save_index(folder, SearchIndex(["a", "b"], ["/v/a.mp4", "/v/b.mp4"], videos, info))
    return folder, json.loads((folder / "index.json").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda values: values.pop("video_ids"), 'no "video_ids"'),
        (lambda values: values.pop("config"), 'no "config"'),
        (lambda values: values.pop("checkpoint"), 'no "checkpoint"'),
        (lambda values: values.update(video_ids=2), '"video_ids" must be an array, got an integer'),
        (lambda values: values.update(config=None), '"config" must be an object, got null'),
    ],
)
def test_an_index_json_without_its_keys_is_an_error_naming_it(tmp_path, change, message):
    folder, values = small_index(tmp_path / "idx")
    change(values)
    (folder / "index.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"{folder / 'index.json'}: {message}"):
        load_index(folder)


def test_an_unreadable_index_is_an_error_naming_the_file(tmp_path):
    folder, _ = small_index(tmp_path / "idx")
    (folder / "index.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="index.json: expected a JSON object, got an array"):
        load_index(folder)
    (folder / "index.json").write_text("{'video_ids': []}")
    with pytest.raises(ValueError, match="index.json: malformed JSON at line 1, column 2"):
        load_index(folder)
    folder, _ = small_index(tmp_path / "idx2")
    features = folder / "features.safetensors"
    features.write_bytes(features.read_bytes()[:40])
    with pytest.raises(ValueError, match="features.safetensors: not a readable safetensors file"):
        load_index(folder)


def tiny_checkpoint(folder):
    """A checkpoint folder as `index` reads one (model.safetensors, state.json) of an untrained tiny model."""
    config = load_config("tiny", ["train.device=cpu", "model.image_size=32"])
    torch.manual_seed(0)
    save_pretrained(build_model(config.model), folder)
    (folder / "state.json").write_text(json.dumps({"config": config.to_dict()}))
    return folder


def test_index_leaves_out_unreadable_videos_and_counts_them(tmp_path, caplog, capsys):
    # it stopped at the first one, writing no index, while prepare and detect skip and count them
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    folder = tmp_path / "raw"
    folder.mkdir()
    for video_id in ("a", "z"):
        write_video(folder / f"{video_id}.mp4", np.zeros((4, 32, 32, 3), np.uint8), fps=4)
    broken = [folder / f"broken{number:02d}.mp4" for number in range(WARNINGS_PER_REASON + 2)]
    for path in broken:
        path.write_bytes(b"not a video")
    argv = ["index", str(folder), "--checkpoint", str(checkpoint), "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "index")]) == 0
    index = load_index(tmp_path / "index")
    assert index.video_ids == ["a", "z"] and index.paths == [str(folder / "a.mp4"), str(folder / "z.mp4")]
    assert f"{len(broken)} unreadable videos skipped (see the warnings above)" in capsys.readouterr().out
    named = [path for path in broken if f"{path}: not a readable video" in caplog.text]
    assert named == broken[:WARNINGS_PER_REASON]  # the first ones by name, the others only counted
    for video_id in ("a", "z"):
        (folder / f"{video_id}.mp4").write_bytes(b"cut short")
    assert console_main([*argv, "--output", str(tmp_path / "none")]) == 2
    assert (f"stoa-vlp index: error: {folder}: none of its {len(broken) + 2} videos could be read"
            in capsys.readouterr().err)
    assert not (tmp_path / "none").exists()
