"""Retrieval task: features computed once per video, contrastive metrics, VTM re-ranking of the top-k."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from stoa_vlp.batch import Batch
from stoa_vlp.config import load_config
from stoa_vlp.metrics.retrieval import querybank_normalise, querybank_normalise_blocks, retrieval_metrics
from stoa_vlp.model import build_model
from stoa_vlp.data.annotations import VideoRecord
from stoa_vlp.tasks.retrieval import (
    contrastive_similarity,
    encode_sentences,
    encode_texts,
    encode_videos,
    evaluate_retrieval,
    evaluate_retrieval_records,
    extract_features,
    require_one_clip_per_video,
    rerank_similarities,
    retrieval_metric_names,
)
from stoa_vlp.tokenizer import Tokenizer

CAPTIONS = ["a red square moves left", "a blue circle grows", "a green triangle spins", "two shapes move apart",
            "a yellow square falls", "nothing moves at all"]


def clip_tensors(config, video_id: str):
    """Deterministic frames and boxes for a video id; some clips have no detections."""
    seed = int(video_id.strip("v"))
    generator = torch.Generator().manual_seed(seed)
    m = config.model
    frames = torch.randn(m.frames, 3, m.image_size, m.image_size, generator=generator)
    corner = torch.rand(m.frames, m.boxes_per_frame, 2, generator=generator) * m.image_size / 2
    boxes = torch.cat([corner, corner + m.image_size / 3], dim=-1)
    labels = torch.randint(1, 4, (m.frames, m.boxes_per_frame), generator=generator) * (seed % 3 != 0)
    traj_labels = torch.zeros(m.trajectories, dtype=torch.long)
    present = labels.unique()
    present = present[present > 0][: m.trajectories]
    traj_labels[: len(present)] = present
    return frames, boxes, labels, labels > 0, traj_labels, traj_labels > 0


def make_batch(config, tokenizer, video_ids, captions):
    parts = [clip_tensors(config, video_id) for video_id in video_ids]
    tokens, mask = tokenizer(captions)
    stacked = [torch.stack([p[i] for p in parts]) for i in range(6)]
    return Batch(*stacked, tokens=tokens, text_mask=mask, pos_tags=torch.zeros_like(tokens),
                 video_index=torch.tensor([int(v.strip("v")) for v in video_ids]), video_ids=list(video_ids))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = load_config("tiny")
    model = build_model(config.model).eval()
    tokenizer = Tokenizer(config.model.text_len)
    loader = [
        make_batch(config, tokenizer, ["v1", "v2", "v1"], CAPTIONS[:3]),
        make_batch(config, tokenizer, ["v3", "v2", "v4"], CAPTIONS[3:]),
    ]
    return config, model, tokenizer, loader


def test_extract_features_encodes_each_video_once(setup, monkeypatch):
    config, model, tokenizer, loader = setup
    encoded = []
    original = model.encode_video
    monkeypatch.setattr(model, "encode_video", lambda *a: encoded.append(a[0].shape[0]) or original(*a))
    videos, texts, text_to_video = extract_features(model, loader, "cpu")
    assert sum(encoded) == 4
    assert text_to_video.tolist() == [0, 1, 0, 2, 1, 3]
    assert videos.video.shape == (4, config.model.embed_dim) and texts.sentence.shape[0] == 6
    with torch.no_grad():
        alone = original(*[t.unsqueeze(0) for t in clip_tensors(config, "v3")])
        caption = model.encode_text(*tokenizer(CAPTIONS[4]))
    torch.testing.assert_close(videos.frames[2], alone.frames[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(videos.trajectories[2], alone.trajectories[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(texts.sentence[4], caption.sentence[0], atol=1e-5, rtol=1e-4)


def test_moments_of_one_video_are_separate_clips(setup):
    config, model, tokenizer, _ = setup
    batch = make_batch(config, tokenizer, ["v1", "v1", "v1"], CAPTIONS[:3])
    batch.video_index = torch.tensor([7, 8, 7])  # two moments (records 7 and 8) of video v1, as DiDeMo's
    videos, _, text_to_video = extract_features(model, [batch], "cpu")
    assert videos.video.shape[0] == 2 and text_to_video.tolist() == [0, 1, 0]
    assert encode_videos(model, [batch], "cpu")[0] == ["v1", "v1"]
    with pytest.raises(ValueError, match="captioning needs one clip per video, but 1 videos have several .e.g. v1"):
        require_one_clip_per_video(["v1", "v2", "v1"], "captioning")


def match_probabilities(model, videos, texts) -> torch.Tensor:
    """(texts, videos) P(matched) of every text-video pair, each fused on its own row."""
    num_texts, num_videos = texts.sentence.shape[0], videos.video.shape[0]
    with torch.no_grad():
        t_index = torch.arange(num_texts).repeat_interleave(num_videos)
        v_index = torch.arange(num_videos).repeat(num_texts)
        fused = model.fuse(videos.index_select(v_index), texts.tokens[t_index], texts.mask[t_index], "bidirectional")
        return torch.softmax(model.match_logits(fused), dim=-1)[:, 1].view(num_texts, num_videos)


def brute_force_rerank(similarity, probability, scale: float, k: int) -> torch.Tensor:
    """Each row's top-k by similarity re-scored softmax_k(scale * similarity) * P(matched) (the
    reference code's fusion score) and placed above the row's other entries, which keep their value."""
    out = similarity.double()
    for row in range(similarity.shape[0]):
        top = similarity[row].topk(k).indices
        fused_scores = torch.softmax(scale * similarity[row, top].double(), dim=0) * probability[row, top].double()
        out[row, top] = 10.0 + fused_scores  # any placement above the untouched entries
    return out


def test_evaluate_retrieval_matches_brute_force_reranking(setup, monkeypatch):
    config, model, tokenizer, loader = setup
    videos, texts, text_to_video = extract_features(model, loader, "cpu")
    meanp = F.normalize(F.normalize(videos.frames, dim=-1).mean(dim=1), dim=-1)
    similarity = F.normalize(texts.sentence, dim=-1) @ meanp.t()
    torch.testing.assert_close(contrastive_similarity(videos, texts, "mean"), similarity)
    match = match_probabilities(model, videos, texts)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    k = 2
    fused_pairs = []
    original_fuse = model.fuse
    monkeypatch.setattr(model, "fuse", lambda v, *a, **kw: fused_pairs.append(v.video.shape[0]) or original_fuse(v, *a, **kw))
    metrics = evaluate_retrieval(model, loader, "cpu", rerank_k=k, dual_softmax_scale=100.0)
    assert sum(fused_pairs) == (6 + 4) * k  # only the top-k pairs of each query are fused
    plain = retrieval_metrics(similarity, text_to_video, 100.0)
    t2v = retrieval_metrics(brute_force_rerank(similarity, match, scale, k), text_to_video)
    v2t = retrieval_metrics(brute_force_rerank(similarity.t(), match.t(), scale, k).t(), text_to_video)
    for key, value in plain.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4)
    for key in ("r1", "r5", "r10", "mdr", "mnr"):
        assert metrics[f"t2v_rerank_{key}"] == pytest.approx(t2v[f"t2v_{key}"], abs=1e-4)
        assert metrics[f"v2t_rerank_{key}"] == pytest.approx(v2t[f"v2t_{key}"], abs=1e-4)
    assert metrics["num_texts"] == 6 and metrics["num_videos"] == 4


def test_rerank_orders_each_querys_top_k_by_contrastive_prior_times_match_probability(setup):
    """Each row's order, not just the metrics: here rows 4 and 5 of t2v rank their top-2 one way by
    P(matched) alone and the other way with the softmax_k(scale * similarity) prior."""
    config, model, tokenizer, loader = setup
    videos, texts, _ = extract_features(model, loader, "cpu")
    similarity = contrastive_similarity(videos, texts, "mean")
    match = match_probabilities(model, videos, texts)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    t2v, v2t = rerank_similarities(model, videos, texts, similarity, k=2)
    for ours, sim, probability in ((t2v, similarity, match), (v2t, similarity.t(), match.t())):
        expected = brute_force_rerank(sim, probability, scale, k=2)
        assert torch.equal(ours.argsort(dim=1, descending=True), expected.argsort(dim=1, descending=True))
        untouched = expected < 10.0
        assert torch.equal(ours[untouched], sim.double()[untouched])
    assert not torch.equal(brute_force_rerank(similarity, match, 0.0, k=2).argsort(dim=1), t2v.argsort(dim=1))


def test_progress_bars_go_to_stderr_only_when_asked_and_change_no_number(setup, capsys):
    config, model, tokenizer, loader = setup
    quiet = evaluate_retrieval(model, loader, "cpu", rerank_k=2)
    assert capsys.readouterr().err == ""
    shown = evaluate_retrieval(model, loader, "cpu", rerank_k=2, progress=True)
    bars = capsys.readouterr().err
    assert shown == quiet
    for work in ("encoding videos and captions: 100%", "re-ranking top-2 t2v pairs", "re-ranking top-2 v2t pairs"):
        assert work in bars
    stream = (batch for batch in loader)  # no len(): a bar without a total
    ids, videos = encode_videos(model, stream, "cpu", progress=True)
    assert "encoding videos: " in capsys.readouterr().err
    quiet_ids, quiet_videos = encode_videos(model, loader, "cpu")
    assert ids == quiet_ids and torch.equal(videos.video, quiet_videos.video)


def test_records_path_decodes_each_clip_once_and_agrees(setup):
    config, model, tokenizer, loader = setup
    records = [VideoRecord("v1", "v1.mp4", captions=[CAPTIONS[0], CAPTIONS[2]]),
               VideoRecord("v2", "v2.mp4", captions=[CAPTIONS[1], CAPTIONS[4]]),
               VideoRecord("v3", "v3.mp4", captions=[CAPTIONS[3]]),
               VideoRecord("v4", "v4.mp4", captions=[CAPTIONS[5]])]
    video_rows = [make_batch(config, tokenizer, ["v1", "v2"], CAPTIONS[:2]), make_batch(config, tokenizer, ["v3", "v4"], CAPTIONS[:2])]
    by_records = evaluate_retrieval_records(model, video_rows, records, tokenizer, "cpu", rerank_k=2)
    reordered = [make_batch(config, tokenizer, ["v1", "v1", "v2", "v2"], [CAPTIONS[i] for i in (0, 2, 1, 4)]),
                 make_batch(config, tokenizer, ["v3", "v4"], [CAPTIONS[3], CAPTIONS[5]])]
    by_loader = evaluate_retrieval(model, reordered, "cpu", rerank_k=2)
    assert by_records == pytest.approx(by_loader, abs=1e-4)


def test_querybank_numbers_come_from_the_bank_captions_and_leave_the_plain_ones(setup):
    config, model, tokenizer, _ = setup
    records = [VideoRecord("v1", "v1.mp4", captions=[CAPTIONS[0]]), VideoRecord("v2", "v2.mp4", captions=[CAPTIONS[1]]),
               VideoRecord("v3", "v3.mp4", captions=[CAPTIONS[3]])]
    video_rows = [make_batch(config, tokenizer, ["v1", "v2", "v3"], CAPTIONS[:3])]
    plain = evaluate_retrieval_records(model, video_rows, records, tokenizer, "cpu")
    bank = [CAPTIONS[2], CAPTIONS[4], CAPTIONS[5]]
    with_bank = evaluate_retrieval_records(model, video_rows, records, tokenizer, "cpu", querybank_captions=bank,
                                           qb_norm_beta=20.0)
    assert {k: with_bank[k] for k in plain} == plain
    videos, texts = extract_features(model, video_rows, "cpu")[:2]
    captions = encode_texts(model, *tokenizer([c for r in records for c in r.captions]), "cpu")
    bank_texts = encode_texts(model, *tokenizer(bank), "cpu")
    torch.testing.assert_close(encode_sentences(model, *tokenizer(bank), "cpu", batch_size=2), bank_texts.sentence)
    scores = querybank_normalise(contrastive_similarity(videos, captions, "mean"), contrastive_similarity(videos, bank_texts, "mean"))
    expected = retrieval_metrics(scores, torch.tensor([0, 1, 2]))
    assert {k: with_bank[k.replace("t2v_", "t2v_qb_")] for k in expected if k.startswith("t2v_")} == pytest.approx(
        {k: v for k, v in expected.items() if k.startswith("t2v_")})
    assert not any(k.startswith("v2t_qb") for k in with_bank)


@pytest.mark.parametrize("rerank, dual_softmax, qb_norm", [(False, False, False), (True, True, True), (True, False, True)])
def test_the_listed_metric_names_are_the_recalls_the_evaluation_gives(setup, rerank, dual_softmax, qb_norm):
    """train.best_metric is checked against retrieval_metric_names before a run: they must be exactly
    the evaluation's keys that grow with quality (not MdR, MnR or the counts)."""
    config, model, tokenizer, _ = setup
    records = [VideoRecord("v1", "v1.mp4", captions=[CAPTIONS[0], CAPTIONS[2]]),
               VideoRecord("v2", "v2.mp4", captions=[CAPTIONS[1]]), VideoRecord("v3", "v3.mp4", captions=[CAPTIONS[3]])]
    video_rows = [make_batch(config, tokenizer, ["v1", "v2", "v3"], CAPTIONS[:3])]
    metrics = evaluate_retrieval_records(model, video_rows, records, tokenizer, "cpu", rerank_k=2 if rerank else 0,
                                         dual_softmax_scale=100.0 if dual_softmax else None,
                                         querybank_captions=[CAPTIONS[4], CAPTIONS[5]] if qb_norm else None)
    recalls = {name for name in metrics if not name.startswith("num_") and not name.endswith(("_mdr", "_mnr"))}
    assert recalls == retrieval_metric_names(rerank, dual_softmax, qb_norm)


def test_querybank_captions_are_the_training_captions_read_once(tmp_path, monkeypatch):
    from stoa_vlp.tasks import pipeline

    train = tmp_path / "train.jsonl"
    rows = [{"video_id": "a", "video": "a.mp4", "caption": "a red disc"},
            {"video_id": "b", "video": "b.mp4", "caption": ["a blue square", "a square moves"]}]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config("tiny", ["task.name=retrieval", f"data.train={train}", "task.qb_norm=true"])
    reads = []
    read = pipeline.read_annotations
    monkeypatch.setattr(pipeline, "read_annotations", lambda *args, **kwargs: reads.append(args) or read(*args, **kwargs))
    runner = pipeline.TaskRunner(config, "cpu")
    assert runner.querybank_captions == ["a red disc", "a blue square", "a square moves"]
    assert runner.querybank_captions is runner.querybank_captions
    assert len(reads) == 1


def test_querybank_captions_do_not_look_for_the_training_videos(tmp_path):
    from stoa_vlp.tasks import pipeline

    # evaluation needs none of them: raw and prepared copies under the training file's folder are no error
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"video_id": "a", "video": "a.mp4", "caption": "a red disc"}) + "\n")
    for folder in ("raw", "prepared"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.mp4").write_bytes(b"x")
    config = load_config("tiny", ["task.name=retrieval", f"data.train={train}", "task.qb_norm=true"])
    assert pipeline.TaskRunner(config, "cpu").querybank_captions == ["a red disc"]


def test_querybank_captions_are_read_as_training_reads_them(tmp_path):
    from stoa_vlp.tasks import pipeline

    # an empty training caption is left out with a warning by training: it failed the strict read QB-Norm used
    train = tmp_path / "train.jsonl"
    rows = [{"video_id": "a", "video": "a.mp4", "caption": "a red disc"}, {"video_id": "b", "video": "b.mp4", "caption": " "}]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config("tiny", ["task.name=retrieval", f"data.train={train}", "task.qb_norm=true"])
    assert pipeline.TaskRunner(config, "cpu").querybank_captions == ["a red disc"]


def test_contrastive_similarity_is_float32_under_autocast():
    """bf16 cosines in [0.25, 0.5) are 0.002 apart: under autocast half the queries of 1,000 videos
    tied with another video, and ties count against the model."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(0)
    videos = SimpleNamespace(frames=torch.randn(50, 4, 16, generator=generator), video=torch.randn(50, 16, generator=generator))
    texts = SimpleNamespace(sentence=torch.randn(80, 16, generator=generator))
    exact = contrastive_similarity(videos, texts, "mean")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contrastive_similarity(videos, texts, "mean")
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0, atol=1e-6)


def test_querybank_similarity_is_computed_a_block_of_bank_rows_at_a_time_with_the_same_metrics(setup, monkeypatch):
    # before: the whole (bank, videos) similarity was computed on the device, then normalised a chunk at a time
    import stoa_vlp.tasks.retrieval
    from stoa_vlp.tasks.retrieval import (
        embedding_similarity, retrieval_metrics_of_features, sentence_similarity_blocks,
    )

    config, model, tokenizer, _ = setup
    video_rows = [make_batch(config, tokenizer, ["v1", "v2", "v3", "v4"], CAPTIONS[:4])]
    videos, texts, text_to_video = extract_features(model, video_rows, "cpu")  # 4 videos, one caption each
    bank = encode_sentences(model, *tokenizer(CAPTIONS + CAPTIONS[:1]), "cpu")  # 7 bank captions
    similarity = contrastive_similarity(videos, texts, "mean")
    bank_texts = dataclasses.replace(texts, sentence=bank)
    old_bank_similarity = contrastive_similarity(videos, bank_texts, "mean")  # (7, 4), whole
    old_scores = querybank_normalise(similarity, old_bank_similarity, beta=20.0)
    assert not torch.equal(old_scores, similarity.double())  # some query is normalised
    old = retrieval_metrics(similarity, text_to_video)
    old.update({k.replace("t2v_", "t2v_qb_"): v for k, v in
                retrieval_metrics(old_scores, text_to_video, directions=("t2v",)).items()})

    computed = []
    monkeypatch.setattr(stoa_vlp.tasks.retrieval, "embedding_similarity",
                        lambda *args: computed.append(embedding_similarity(*args)) or computed[-1])
    metrics = retrieval_metrics_of_features(model, videos, texts, text_to_video, querybank=bank, querybank_block=3)
    assert {k: v for k, v in metrics.items() if not k.startswith("num_")} == old
    assert [tuple(scores.shape) for scores in computed] == [(4, 4), (3, 4), (3, 4), (1, 4)]  # not (7, 4)
    # the scores differ only by float32 rounding: a matmul of 3 rows may round a cosine unlike one of 7 rows
    blocks = list(sentence_similarity_blocks(videos, bank, "mean", 3))
    torch.testing.assert_close(torch.cat(blocks), old_bank_similarity, rtol=0, atol=1e-6)
    scores = querybank_normalise_blocks(similarity, blocks, beta=20.0)
    torch.testing.assert_close(scores, old_scores, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="block_rows must be at least 1, got 0"):
        next(sentence_similarity_blocks(videos, bank, "mean", 0))
