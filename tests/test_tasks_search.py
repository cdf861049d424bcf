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


def test_search_refuses_an_empty_query_and_a_top_below_one(tmp_path):
    # the library took "" (an empty query's ranking) and top=-1 (all hits but the last)
    config, model, videos = encoded_videos(3)
    tokenizer = Tokenizer(config.model.text_len)
    index = SearchIndex(["a", "b", "c"], ["/a.mp4", "/b.mp4", "/c.mp4"], videos, {})
    with pytest.raises(ValueError, match="the query is empty"):
        search(model, index, " ", tokenizer, "cpu")
    for top in (0, -1):
        with pytest.raises(ValueError, match=f"top must be at least 1, got {top}"):
            search(model, index, "a red disc", tokenizer, "cpu", top=top)
    with pytest.raises(ValueError, match="rerank_k must be 0 .* got -1"):
        search(model, index, "a red disc", tokenizer, "cpu", rerank_k=-1)


def test_a_query_longer_than_the_text_length_is_said_to_be_cut(tmp_path, caplog):
    config, model, videos = encoded_videos(2)
    index = SearchIndex(["a", "b"], ["/a.mp4", "/b.mp4"], videos, {})
    length = config.model.text_len
    search(model, index, " ".join(["disc"] * (length - 2)), Tokenizer(length), "cpu")
    assert "cut off" not in caplog.text
    search(model, index, " ".join(["disc"] * (length + 3)), Tokenizer(length), "cpu")
    assert (f"the query has {length + 3} tokens, more than the {length - 2} that model.text_len={length} leaves "
            "beside the start and end tokens: its last 5 are cut off") in caplog.text


def indexed_folder(tmp_path):
    """(checkpoint, folder of 3 videos, its index)."""
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    folder = tmp_path / "videos"
    folder.mkdir()
    for seed, video_id in enumerate("abc"):
        write_video(folder / f"{video_id}.mp4", np.random.default_rng(seed).integers(0, 255, (4, 32, 32, 3), np.uint8), fps=4)
    assert main(["index", str(folder), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "index"),
                 "--no-progress"]) == 0
    return checkpoint, folder, tmp_path / "index"


def table_rows(printed: str) -> list[list[str]]:
    """The header and rows of the table in `printed`, as stripped cells."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in printed.splitlines()
            if line.startswith("| ")]


def test_the_search_table_keeps_fusion_scores_and_cosines_apart(tmp_path, capsys):
    # the "score" column held the log fusion score of the re-ranked hits and the cosine of the others,
    # so it was not in order; with --rerank-k 0 the header said "top 0 re-ranked"
    _, _, index = indexed_folder(tmp_path)
    capsys.readouterr()
    assert main(["search", str(index), "a red disc", "--top", "3", "--rerank-k", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 videos; the contrastive top 1 re-ranked by the matching head (fusion), the others by cosine" in printed
    header, *rows = table_rows(printed)
    assert header[:4] == ["rank", "video", "fusion (log)", "cosine"]
    assert rows[0][2] != "" and rows[0][4] != "" and [row[2] for row in rows[1:]] == ["", ""]
    assert [row[4] for row in rows[1:]] == ["", ""]
    cosines = [float(row[3]) for row in rows[1:]]
    assert cosines == sorted(cosines, reverse=True)
    assert main(["search", str(index), "a red disc", "--top", "3", "--rerank-k", "0"]) == 0
    printed = capsys.readouterr().out
    assert "3 videos; ranked by the contrastive cosine, none re-ranked" in printed and "top 0" not in printed
    assert all(row[2] == "" for row in table_rows(printed)[1:])


def test_index_and_search_do_not_read_the_clip_file_the_run_started_from(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    state = json.loads((checkpoint / "state.json").read_text())
    state["config"]["model"]["init_checkpoint"] = str(tmp_path / "clip.pt")  # deleted, or left on another machine
    (checkpoint / "state.json").write_text(json.dumps(state))
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mp4", np.zeros((4, 32, 32, 3), np.uint8), fps=4)
    assert main(["index", str(folder), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "index"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "index"), "a red disc", "--top", "1"]) == 0
    assert table_rows(capsys.readouterr().out)[1][1] == "a"


def test_index_checks_its_output_before_encoding(tmp_path, capsys):
    # it wrote into any folder (a run folder), and a file given as --output failed after every video was encoded
    checkpoint, folder, index = indexed_folder(tmp_path)
    argv = ["index", str(folder), "--checkpoint", str(checkpoint), "--no-progress", "--output"]
    (tmp_path / "a_file").write_text("x")
    assert console_main([*argv, str(tmp_path / "a_file")]) == 2
    assert f"--output {tmp_path / 'a_file'} is a file, not an index folder" in capsys.readouterr().err
    assert console_main([*argv, str(checkpoint)]) == 2  # a checkpoint folder: not an index
    assert f"--output {checkpoint} is not empty and holds no index.json" in capsys.readouterr().err
    assert console_main([*argv, str(index)]) == 2
    assert f"--output {index} holds an index; pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*argv, str(index), "--overwrite"]) == 0
    (tmp_path / "empty").mkdir()
    assert main([*argv, str(tmp_path / "empty")]) == 0
    assert load_index(tmp_path / "empty").video_ids == ["a", "b", "c"]


def expected_hits(model, videos, ids, query, tokenizer, top, rerank_k, video_feature="mean"):
    """(video id, score, cosine, P(matched) or None) of the `top` hits for `query`, computed as search
    did before the index stored clip embeddings: the cosine with every video's frames, an argsort, and
    the matching head over the whole index's features."""
    with torch.no_grad():
        text = encode_texts(model, *tokenizer([query]), "cpu")
        cosine = contrastive_similarity(videos, text, video_feature)[0]
        order = cosine.argsort(descending=True)
        candidates = order[:rerank_k]
        match = match_probability(model, videos, text, torch.zeros(len(candidates), dtype=torch.long), candidates)
    fused = torch.log(torch.softmax(logit_scale_value(model) * cosine[candidates].double(), 0) * match)
    head = [(ids[int(candidates[i])], float(fused[i]), float(cosine[candidates[i]]), float(match[i]))
            for i in fused.argsort(descending=True)]
    tail = [(ids[int(row)], float(cosine[row]), float(cosine[row]), None) for row in order[rerank_k:top]]
    return (head + tail)[:top]


def assert_same_hits(hits, expected):
    assert [hit.video_id for hit in hits] == [row[0] for row in expected]
    for hit, (_, score, cosine, match) in zip(hits, expected):
        assert hit.score == pytest.approx(score, abs=1e-5) and hit.cosine == pytest.approx(cosine, abs=1e-5)
        assert (hit.match is None) == (match is None)
        if match is not None:
            assert hit.match == pytest.approx(match, abs=1e-6)


def make_old_index(folder):
    """Make the index in `folder` look built before the clip embeddings were stored."""
    (folder / "clip_embeddings.safetensors").unlink()
    values = json.loads((folder / "index.json").read_text())
    del values["clip_embedding"]
    (folder / "index.json").write_text(json.dumps(values))


@pytest.mark.parametrize("video_feature", ["mean", "sep"])
def test_the_index_stores_each_videos_normalised_clip_embedding(tmp_path, video_feature):
    # search normalised every video's frames and averaged them again for each query
    from safetensors.torch import load_file

    config, model, videos = encoded_videos(5)
    config = load_config("tiny", [f"loss.vtc_video_feature={video_feature}"])
    ids = [f"clip{i}" for i in range(5)]
    save_index(tmp_path / "idx", SearchIndex(ids, ids, videos, {"checkpoint": "/c", "config": config.to_dict()}))
    stored = load_file(str(tmp_path / "idx" / "clip_embeddings.safetensors"))["embeddings"]
    if video_feature == "mean":
        by_hand = videos.frames / videos.frames.norm(dim=-1, keepdim=True)
        by_hand = by_hand.mean(dim=1)
    else:
        by_hand = videos.video
    by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
    assert stored.dtype == torch.float32 and stored.shape == (5, config.model.embed_dim)
    torch.testing.assert_close(stored, by_hand)
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["clip_embedding"] == video_feature
    assert "clip_embedding" not in load_index(tmp_path / "idx").info  # as info was given to save_index


def test_search_scores_as_the_contrastive_similarity_over_every_video(tmp_path, caplog):
    count = 12
    config, model, videos = encoded_videos(count)
    tokenizer = Tokenizer(config.model.text_len)
    ids = [f"clip{i}" for i in range(count)]
    info = {"checkpoint": "/c", "config": config.to_dict()}
    save_index(tmp_path / "idx", SearchIndex(ids, ids, videos, info))
    index = load_index(tmp_path / "idx")
    for top, rerank_k in ((count, 5), (3, 0), (4, 7), (count, count)):
        expected = expected_hits(model, videos, ids, "a red square moves left", tokenizer, top, rerank_k)
        assert_same_hits(search(model, index, "a red square moves left", tokenizer, "cpu", top, rerank_k), expected)
    # another loss.vtc_video_feature than the index's (search --set) still scores with that one
    expected = expected_hits(model, videos, ids, "a disc", tokenizer, 6, 3, "sep")
    assert_same_hits(search(model, index, "a disc", tokenizer, "cpu", 6, 3, video_feature="sep"), expected)

    # an index built before the clip embeddings were stored still loads, says so, and searches the same
    make_old_index(tmp_path / "idx")
    with caplog.at_level("INFO", logger="stoa_vlp.search"):
        old = load_index(tmp_path / "idx")
    assert "holds no clip embeddings" in caplog.text and "makes its searches faster" in caplog.text
    assert old.info == json.loads(json.dumps(info))
    expected = expected_hits(model, videos, ids, "a red square moves left", tokenizer, count, 5)
    assert_same_hits(search(model, old, "a red square moves left", tokenizer, "cpu", count, 5), expected)


def test_a_query_reads_the_stored_clip_embeddings_and_fuses_only_the_top_k(tmp_path, monkeypatch):
    # each query recomputed the clip embedding of every video from its frames, and the command copied
    # every video's features to the device for the matching head, which needs the top-k only
    import stoa_vlp.tasks.search as search_module

    config, model, videos = encoded_videos(8)
    tokenizer = Tokenizer(config.model.text_len)
    ids = [f"clip{i}" for i in range(8)]
    save_index(tmp_path / "idx", SearchIndex(ids, ids, videos, {"checkpoint": "/c", "config": config.to_dict()}))
    index = load_index(tmp_path / "idx")
    expected = [(hit.video_id, hit.cosine) for hit in search(model, index, "a disc", tokenizer, "cpu", 8, 0)]
    index.videos.frames.fill_(float("nan"))  # the cosine pass no longer reads them
    assert [(hit.video_id, hit.cosine) for hit in search(model, index, "a disc", tokenizer, "cpu", 8, 0)] == expected

    fused_rows = []
    real = search_module.match_log_odds

    def recording(model, videos, *args, **kwargs):
        fused_rows.append(videos.video.shape[0])
        return real(model, videos, *args, **kwargs)

    monkeypatch.setattr(search_module, "match_log_odds", recording)
    search(model, load_index(tmp_path / "idx"), "a disc", tokenizer, "cpu", 5, 3)
    assert fused_rows == [3]
