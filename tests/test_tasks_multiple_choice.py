"""Multiple-choice: file reading and option scoring against brute-force model calls."""

import json

import pytest
import torch
import torch.nn.functional as F

from stoa_vlp.batch import Batch
from stoa_vlp.config import load_config
from stoa_vlp.model import build_model
from stoa_vlp.tasks.multiple_choice import Choice, chose_answer, evaluate_multiple_choice, option_scores, read_choices
from stoa_vlp.tasks.retrieval import encode_videos
from stoa_vlp.tokenizer import Tokenizer

OPTIONS = [["a red square moves left", "a blue circle grows", "a green triangle spins"],
           ["two shapes move apart", "a yellow square falls", "nothing moves"]]


def test_read_choices_accepts_clip_name_and_checks_answers(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"clip_name": "video9", "options": ["a", "b"], "answer": 1}) + "\n")
    assert read_choices(path) == [Choice("video9", ["a", "b"], 1)]
    path.write_text(json.dumps({"video_id": "v", "options": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:1: answer must be an option index"):
        read_choices(path)
    path.write_text(json.dumps({"video_id": "v", "options": ["a", "b"], "answer": 0}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:2: malformed JSON"):
        read_choices(path)
    with pytest.raises(FileNotFoundError, match=r"absent.jsonl: multiple-choice file does not exist"):
        read_choices(tmp_path / "absent.jsonl")


def test_read_choices_of_clipbert_string_answers_and_jsfusion_csv(tmp_path):
    path = tmp_path / "msrvtt_mc_test.jsonl"
    row = {"qid": 7, "clip_name": "video7010", "answer": "2", "options": ["a", "b", "c", "d", "e"]}
    path.write_text(json.dumps(row) + "\n")
    assert read_choices(path) == [Choice("video7010", ["a", "b", "c", "d", "e"], 2)]
    path.write_text(json.dumps({**row, "answer": True}) + "\n")
    with pytest.raises(ValueError, match=r"msrvtt_mc_test.jsonl:1: answer must be an option index"):
        read_choices(path)

    table = tmp_path / "MSR_MC_test.csv"
    header = "key\tvid_key\ta1\ta2\ta3\ta4\ta5\tanswer\n"
    table.write_text(header + "MC1\tmsr7010\tone\ttwo\tthree\tfour\tfive\t3\nMC2\tmsr9\tp\tq\tr\ts\tt\t0\n")
    assert read_choices(table) == [Choice("video7010", ["one", "two", "three", "four", "five"], 3),
                                   Choice("video9", ["p", "q", "r", "s", "t"], 0)]
    table.write_text(header + "MC1\tmsr7010\tone\ttwo\tthree\tfour\tfive\t5\n")
    with pytest.raises(ValueError, match=r"MSR_MC_test.csv:2: answer must be an option index in 0..4, got 5"):
        read_choices(table)
    table.write_bytes(header.encode() + b"MC1\tmsr7010\tone\ttwo\tthree\tfour\tcaf\xe9\t3\n")  # Latin-1
    with pytest.raises(ValueError, match=r"MSR_MC_test.csv:2: not UTF-8 text"):
        read_choices(table)
    table.write_text("key,vid_key,a1,a2,a3,a4,a5,answer\n")
    with pytest.raises(ValueError, match=r"MSR_MC_test.csv: not a JSFusion MC file: no column\(s\) vid_key"):
        read_choices(table)
    with pytest.raises(FileNotFoundError, match=r"absent.csv: multiple-choice file does not exist"):
        read_choices(tmp_path / "absent.csv")


def two_videos():
    """(tiny model without objects, its tokenizer, a loader of videos v0 and v1, their frames)."""
    torch.manual_seed(0)
    config = load_config("tiny", ["model.objects=false"])
    model = build_model(config.model).eval()
    tokenizer = Tokenizer(config.model.text_len)
    m = config.model
    frames = torch.randn(2, m.frames, 3, m.image_size, m.image_size)
    tokens, mask = tokenizer(["x", "y"])
    empty = torch.zeros(2, 0)
    loader = [Batch(frames, empty, empty, empty, empty, empty, tokens, mask, torch.zeros_like(tokens),
                    torch.arange(2), ["v0", "v1"])]
    return model, tokenizer, loader, frames


def test_multiple_choice_scores_match_brute_force():
    model, tokenizer, loader, frames = two_videos()
    with torch.no_grad():
        videos = model.encode_video(frames, *[None] * 5)
        vtm_pick, vtc_pick = [], []
        for item in range(2):
            texts = model.encode_text(*tokenizer(OPTIONS[item]))
            video = videos.index_select(torch.tensor([item] * 3))
            fused = model.fuse(video, texts.tokens, texts.mask, mode="bidirectional")
            vtm_pick.append(int(torch.softmax(model.match_logits(fused), -1)[:, 1].argmax()))
            meanp = F.normalize(F.normalize(video.frames, dim=-1).mean(1), dim=-1)
            vtc_pick.append(int((F.normalize(texts.sentence, dim=-1) * meanp).sum(-1).argmax()))
    choices = [Choice("v1", OPTIONS[1], vtm_pick[1]), Choice("v0", OPTIONS[0], vtm_pick[0])]  # order differs
    metrics = evaluate_multiple_choice(model, loader, choices, tokenizer, "cpu", scoring="vtm")
    assert metrics["accuracy_vtm"] == 100.0 and metrics["accuracy"] == 100.0
    expected_vtc = 100.0 * sum(vtc_pick[i] == vtm_pick[i] for i in range(2)) / 2
    assert metrics["accuracy_vtc"] == expected_vtc and metrics["num_items"] == 2.0
    vtc_metrics = evaluate_multiple_choice(model, loader, choices, tokenizer, "cpu", scoring="vtc")
    assert vtc_metrics["accuracy"] == expected_vtc


def test_each_option_is_scored_against_its_own_items_video():
    """Both score vectors of every item, against the model called on that item's video and options alone."""
    model, tokenizer, loader, frames = two_videos()
    choices = [Choice("v1", OPTIONS[1], 0), Choice("v0", OPTIONS[0], 0)]
    with torch.no_grad():
        _, videos = encode_videos(model, loader, "cpu")
        scores = option_scores(model, videos, [1, 0], choices, tokenizer, "cpu")
        for item, (row, options) in enumerate([(1, OPTIONS[1]), (0, OPTIONS[0])]):
            video = model.encode_video(frames[row : row + 1].expand(3, -1, -1, -1, -1), *[None] * 5)
            texts = model.encode_text(*tokenizer(options))
            logits = model.match_logits(model.fuse(video, texts.tokens, texts.mask, mode="bidirectional"))
            meanp = F.normalize(F.normalize(video.frames, dim=-1).mean(1), dim=-1)
            torch.testing.assert_close(scores["vtm"][item], (logits[:, 1] - logits[:, 0]).double(), atol=1e-4, rtol=0)
            torch.testing.assert_close(scores["vtc"][item].float(), (F.normalize(texts.sentence, dim=-1) * meanp).sum(-1),
                                       atol=1e-5, rtol=0)


def test_a_tie_counts_against_the_model():
    assert chose_answer(torch.tensor([0.1, 0.7, 0.3]), 1)
    assert not chose_answer(torch.tensor([0.7, 0.7, 0.3]), 0) and not chose_answer(torch.tensor([0.7, 0.7, 0.3]), 1)
    assert not chose_answer(torch.tensor([0.1, 0.7, 0.3]), 2)


def test_nan_is_the_lowest_score():
    nan = float("nan")
    assert chose_answer(torch.tensor([0.1, 0.7, nan]), 1)
    assert not chose_answer(torch.tensor([0.1, nan, 0.3]), 1)
    assert not chose_answer(torch.tensor([nan, nan]), 0)


def test_a_confident_matching_head_is_scored_by_log_odds_not_a_rounded_probability():
    model, tokenizer, loader, frames = two_videos()
    with torch.no_grad():
        videos = model.encode_video(frames, *[None] * 5)
        log_odds = []
        for item in range(2):
            texts = model.encode_text(*tokenizer(OPTIONS[item]))
            fused = model.fuse(videos.index_select(torch.tensor([item] * 3)), texts.tokens, texts.mask, "bidirectional")
            logits = model.match_logits(fused).double()
            log_odds.append(logits[:, 1] - logits[:, 0])
        # every option's log-odds above 30: P(matched) is 1.0 in float32 for all of them
        model.match_head.bias[1] += 30.0 - min(float(item.min()) for item in log_odds)
    preferred = [int(item.argmax()) for item in log_odds]
    assert preferred != [0, 0]  # the first option would win any tie
    choices = [Choice("v0", OPTIONS[0], preferred[0]), Choice("v1", OPTIONS[1], preferred[1])]
    assert evaluate_multiple_choice(model, loader, choices, tokenizer, "cpu", scoring="vtm")["accuracy_vtm"] == 100.0
