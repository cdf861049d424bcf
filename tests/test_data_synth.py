"""The synthetic world: determinism, temporal order, real H.264 files, consistent annotations."""

import json
import math
import re

import av
import numpy as np
import pytest

from stoa_vlp.batch import TAG_NOUN, TAG_VERB
from stoa_vlp.cli import main
from stoa_vlp.data.detections import read_detections
from stoa_vlp.data.synth import (
    CANONICAL,
    COLOURS,
    ClipSpec,
    DetectionNoise,
    Pose,
    WorldObject,
    canonical_caption,
    make_captions,
    make_choice,
    make_questions,
    noisy_detections,
    render_frames,
    render_world,
    reverse_clip,
    sample_clip,
    true_boxes,
    world_paths,
    write_video,
)
from stoa_vlp.data.tags import load_spacy, tag_pieces
from stoa_vlp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return render_world(root, train=6, val=3, test=3, seed=7, seconds=2.0, fps=8)


def _clip(*objects, frames=12, size=64):
    return ClipSpec("v", "train", size, size, frames, 8.0, (90.0, 90.0, 90.0), 3, tuple(objects))


def _colour_mask(frame, colour):
    return np.abs(frame.astype(int) - np.array(COLOURS[colour])).sum(axis=-1) < 60


def test_same_seed_same_files_other_seed_other_files(world, tmp_path):
    again = render_world(tmp_path / "again", train=6, val=3, test=3, seed=7, seconds=2.0, fps=8, workers=2)
    other = render_world(tmp_path / "other", train=6, val=3, test=3, seed=8, seconds=2.0, fps=8)
    names = sorted(p.relative_to(world.root) for p in world.root.rglob("*") if p.is_file())
    assert len(names) == 12 + 8
    for name in names:
        assert (world.root / name).read_bytes() == (again.root / name).read_bytes(), name
    assert (world.root / "MSRVTT_data.json").read_bytes() != (other.root / "MSRVTT_data.json").read_bytes()
    assert (world.videos / "video0.mp4").read_bytes() != (other.videos / "video0.mp4").read_bytes()


def test_reversed_clip_is_the_same_frames_backwards():
    rng = np.random.default_rng(0)
    checked = set()
    for index in range(40):
        clip = sample_clip(rng, f"video{index}", "train", size=64, frames=10)
        backwards = reverse_clip(clip)
        np.testing.assert_array_equal(render_frames(backwards), render_frames(clip)[::-1])
        np.testing.assert_allclose(true_boxes(backwards), true_boxes(clip)[::-1], atol=1e-9)
        for forward, reverse in zip(clip.objects, backwards.objects):
            checked.add((forward.action, reverse.action))
    # the reversed clip's captions must say the opposite
    for pair in [("left", "right"), ("right", "left"), ("up", "down"), ("grow", "shrink"), ("shrink", "grow")]:
        assert pair in checked
    assert ("still", "still") in checked


def test_rendered_motion_matches_the_action():
    left = WorldObject("circle", "red", "left", Pose(48, 20, 6, 0), Pose(16, 20, 6, 0))
    grow = WorldObject("square", "blue", "grow", Pose(32, 46, 4, 0.3), Pose(32, 46, 10, 0.3))
    frames = render_frames(_clip(left, grow))
    red_x = [np.nonzero(_colour_mask(f, "red"))[1].mean() for f in frames]
    blue_area = [_colour_mask(f, "blue").sum() for f in frames]
    assert np.all(np.diff(red_x) < 0)
    assert np.all(np.diff(blue_area) > 0)
    assert red_x[0] == pytest.approx(48 - 0.5, abs=0.6) and red_x[-1] == pytest.approx(16 - 0.5, abs=0.6)
    # circle area ~ pi r^2, square (half side 0.85 r) ~ (1.7 r)^2
    assert _colour_mask(frames[0], "red").sum() == pytest.approx(math.pi * 36, rel=0.15)
    assert blue_area[-1] == pytest.approx(17.0**2, rel=0.15)


def test_true_boxes_cover_the_drawn_pixels():
    rotate = WorldObject("triangle", "green", "rotate", Pose(20, 20, 9, 0.0), Pose(20, 20, 9, 1.0))
    down = WorldObject("square", "yellow", "down", Pose(46, 12, 7, 0.5), Pose(46, 50, 7, 0.5))
    clip = _clip(rotate, down)
    frames, boxes = render_frames(clip), true_boxes(clip)
    for frame, frame_boxes in zip(frames, boxes):
        for colour, box in zip(["green", "yellow"], frame_boxes):
            ys, xs = np.nonzero(_colour_mask(frame, colour))
            extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            np.testing.assert_allclose(extent, box, atol=1.5)  # a sharp corner covers few full pixels


def test_videos_are_h264_with_the_rendered_frames(world):
    spec = json.loads(world.world.read_text())
    assert spec["settings"]["frames"] == 16
    with av.open(str(world.videos / "video0.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded, times = [], []
        for frame in container.decode(stream):
            decoded.append((frame.to_ndarray(format="rgb24"), frame.key_frame))
            times.append(frame.time)
    assert len(decoded) == 16
    detected = read_detections(world.detections)["video0"]
    assert times == pytest.approx([frame.time for frame in detected.frames])  # boxes are matched by time
    assert sum(key for _, key in decoded) >= 2  # keyframe every 8 frames
    clip = sample_clip(np.random.default_rng([7, 0, 0]), "video0", "train", 64, 16, 8.0, 3)
    rendered = render_frames(clip)
    for (image, _), expected in zip(decoded, rendered):
        assert image.shape == (64, 64, 3)
        assert np.abs(image.astype(int) - expected).mean() < 3.0


def test_fractional_frame_rate_keeps_frame_times(tmp_path):
    write_video(tmp_path / "v.mp4", np.zeros((5, 16, 16, 3), dtype=np.uint8), fps=7.5)
    with av.open(str(tmp_path / "v.mp4")) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert times == pytest.approx([i / 7.5 for i in range(5)], abs=1e-3)


def test_annotations_name_every_object_and_split(world):
    data = json.loads(world.annotations.read_text())
    splits = [v["split"] for v in data["videos"]]
    assert splits == ["train"] * 6 + ["validate"] * 3 + ["test"] * 3
    truth = {c["video_id"]: c["objects"] for c in json.loads(world.world.read_text())["clips"]}
    by_video = {}
    for sentence in data["sentences"]:
        by_video.setdefault(sentence["video_id"], []).append(sentence["caption"])
    assert [s["sen_id"] for s in data["sentences"]] == list(range(len(data["sentences"])))
    for video_id, captions in by_video.items():
        assert len(captions) == len(set(captions)) == 5
        for caption in captions:
            for obj in truth[video_id]:
                assert f"{obj['colour']} {obj['shape']}" in caption
        actions = [o["action"] for o in truth[video_id]]
        assert len(actions) == len(set(actions))


def test_captions_tag_each_shape_as_a_noun_and_each_action_as_a_verb():
    """DOTA's nouns and STASP's verbs come from spaCy's tags (data.tags), so the captions are worded the
    way the small English tagger reads right. With "moves left", "shrinks" or "spins" after a shape, it
    tagged the verb a noun in about a quarter of the actions and lost the shape's noun tag in a tenth."""
    tokenizer, nlp, rng = Tokenizer(77), load_spacy("en_core_web_sm"), np.random.default_rng(0)
    captioned = [(clip, caption) for clip in (sample_clip(rng, f"video{i}", "train") for i in range(150))
                 for caption in make_captions(clip, rng, 2)]
    nouns = verbs = actions = 0
    for (clip, caption), tags in zip(captioned, tag_pieces([c for _, c in captioned], tokenizer, nlp)):
        words = [tokenizer.bpe.decoder[piece].removesuffix("</w>") for piece in tokenizer.encode_words(caption)]
        assert len(words) == len(tags)  # each word of these captions is one BPE piece
        for obj in clip.objects:
            shape = next(i + 1 for i in range(len(words) - 1) if words[i : i + 2] == [obj.colour, obj.shape])
            verb = next(i for i in range(shape + 1, len(words)) if words[i] not in ("is", "does", "not"))
            nouns += tags[shape] == TAG_NOUN
            verbs += tags[verb] == TAG_VERB
            actions += 1
    assert actions > 400
    assert nouns / actions >= 0.99 and verbs / actions >= 0.98, (nouns, verbs, actions)


def test_detections_without_noise_are_the_true_boxes(world):
    clip = sample_clip(np.random.default_rng(3), "video5", "train", 64, 12, 8.0, 3)
    exact = noisy_detections(clip, np.random.default_rng(0), DetectionNoise.none())
    boxes = true_boxes(clip)
    for index, frame in enumerate(exact.frames):
        assert frame.time == pytest.approx(index / 8.0)
        assert frame.classes == [o.name for o in clip.objects]
        np.testing.assert_allclose(frame.rects, boxes[index], atol=1e-4)
        assert np.all(frame.confs == 1.0)
    shapes = noisy_detections(clip, np.random.default_rng(0), DetectionNoise.none(), detection_classes="shape")
    assert shapes.frames[0].classes == [o.shape for o in clip.objects]


def test_detections_noise_misses_and_adds_boxes():
    clip = sample_clip(np.random.default_rng(4), "v", "train", 64, 400, 8.0, 1)
    noise = DetectionNoise(jitter=0.1, miss_rate=0.3, false_positives=0.5, true_conf=(0.6, 0.9))
    video = noisy_detections(clip, np.random.default_rng(1), noise)
    true_name = clip.objects[0].name
    hits = sum(true_name in f.classes and f.confs[f.classes.index(true_name)] >= 0.6 for f in video.frames)
    spurious = sum(int((f.confs < 0.5).sum()) for f in video.frames)
    assert 0.6 < hits / 400 < 0.8
    assert 0.35 < spurious / 400 < 0.65
    for frame in video.frames:
        assert np.all(frame.rects[:, :2] >= 0) and np.all(frame.rects[:, 2:] <= 64)


def test_detections_file_matches_annotations(world):
    videos = read_detections(world.detections)
    data = json.loads(world.annotations.read_text())
    assert sorted(videos) == sorted(v["video_id"] for v in data["videos"])
    names = {f"{c} {s}" for c in COLOURS for s in ("circle", "square", "triangle")}
    for video in videos.values():
        assert (video.width, video.height) == (64, 64)
        assert len(video.frames) == 16
        assert all(set(frame.classes) <= names for frame in video.frames)


def test_questions_are_answered_by_the_world(world):
    truth = {c["video_id"]: c["objects"] for c in json.loads(world.world.read_text())["clips"]}
    rows = [json.loads(line) for split in ("train", "val", "test") for line in world.qa[split].read_text().splitlines()]
    assert len(rows) == 12 * 4
    types = set()
    for row in rows:
        assert set(row) == {"video_id", "question", "answer", "answer_type"}
        objects = truth[row["video_id"]]
        types.add(row["answer_type"])
        if row["answer_type"] == "colour":
            (obj,) = [o for o in objects if f"that {CANONICAL[o['action']]}?" in row["question"]]
            assert row["answer"] == obj["colour"]
        elif row["answer_type"] == "shape":
            (obj,) = [o for o in objects if row["question"] == f"what shape {CANONICAL[o['action']]}?"]
            assert row["answer"] == obj["shape"]
        elif row["answer_type"] == "direction":
            (obj,) = [o for o in objects if f"the {o['colour']} {o['shape']} move" in row["question"]]
            assert row["answer"] == obj["action"]
        elif row["answer_type"] == "count":
            assert row["answer"] == ["one", "two", "three"][len(objects) - 1]
        else:
            assert row["answer"] in {"move", "grow", "shrink", "rotate", "stay", "yes", "no"}
    assert {"colour", "shape", "action"} <= types


def test_multiple_choice_has_one_true_option(world):
    truth = {c["video_id"]: c["objects"] for c in json.loads(world.world.read_text())["clips"]}
    for split, ids in (("val", world.video_ids["val"]), ("test", world.video_ids["test"])):
        items = [json.loads(line) for line in world.mc[split].read_text().splitlines()]
        assert [item["video_id"] for item in items] == ids
        for item in items:
            objects = truth[item["video_id"]]
            correct = canonical_caption([(o["colour"], o["shape"], o["action"]) for o in objects])
            assert len(item["options"]) == len(set(item["options"])) == 5
            assert item["options"][item["answer"]] == correct
            assert item["options"].count(correct) == 1


def test_false_options_change_actions_or_looks():
    red = WorldObject("circle", "red", "left", Pose(48, 20, 6, 0), Pose(16, 20, 6, 0))
    blue = WorldObject("square", "blue", "grow", Pose(32, 46, 4, 0), Pose(32, 46, 10, 0))
    truth = "a red circle is moving left while a blue square is growing"
    looks = re.compile(r"a red circle .* while a blue square .*")
    false = set()
    for seed in range(40):
        item = make_choice(_clip(red, blue), np.random.default_rng(seed))
        assert item["options"][item["answer"]] == truth
        false.update(option for option in item["options"] if option != truth)
    same_looks = {option for option in false if looks.fullmatch(option)}
    assert same_looks and false - same_looks  # some tell the clip apart only by its actions, some by looks
    assert canonical_caption([("red", "circle", "right"), ("blue", "square", "shrink")]) in same_looks  # both reversed


def sampled_clips(count: int) -> list[ClipSpec]:
    rng = np.random.default_rng(0)
    return [sample_clip(rng, f"v{i}", "test") for i in range(count)]


def test_the_true_option_does_not_stand_out_by_its_words():
    # a solver that never sees the video: the option whose facts the other options repeat most
    hits = 0
    clips = sampled_clips(400)
    for index, clip in enumerate(clips):
        item = make_choice(clip, np.random.default_rng(index))
        facts = [set(re.split(r", | while | and (?=a )", option)) for option in item["options"]]
        shared = [sum(len(mine & theirs) for theirs in facts if theirs is not mine) for mine in facts]
        best = [k for k, value in enumerate(shared) if value == max(shared)]
        hits += best == [item["answer"]]
    assert hits / len(clips) < 0.3  # 5 options: chance is 0.2 (true options used to share the most: 0.9)


def test_a_yes_no_question_s_verb_does_not_give_its_answer():
    answers: dict[str, list[str]] = {}
    for index, clip in enumerate(sampled_clips(400)):
        for row in make_questions(clip, np.random.default_rng(index), count=100):
            if row["answer_type"] == "yesno":
                verb = row["question"].split(" ", 4)[-1]  # "does the red circle move left?" -> "move left?"
                answers.setdefault(verb, []).append(row["answer"])
    for verb, given in answers.items():
        assert 0.35 < given.count("yes") / len(given) < 0.65, (verb, len(given))


def test_synth_command(tmp_path):
    out = tmp_path / "world"
    argv = ["synth", str(out), "--train", "2", "--val", "1", "--test", "1", "--no-noise", "--workers", "1"]
    argv += ["--size", "32", "--seconds", "1", "--fps", "4", "--max-objects", "1", "--detection-classes", "shape"]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["video0.mp4", "video1.mp4", "video2.mp4", "video3.mp4"]
    videos = read_detections(out / "detections.jsonl")
    for video in videos.values():
        assert (video.width, video.height) == (32, 32) and len(video.frames) == 4
        assert all(len(f.classes) == 1 and f.classes[0] in ("circle", "square", "triangle") for f in video.frames)
        assert all(np.all(f.confs == 1.0) for f in video.frames)
    # a world of fewer than 5 clips still gets 5-way multiple-choice items (distractors are perturbations)
    for split, video_id in (("val", "video2"), ("test", "video3")):
        items = [json.loads(line) for line in (out / f"mc_{split}.jsonl").read_text().splitlines()]
        assert [item["video_id"] for item in items] == [video_id]
        assert len(set(items[0]["options"])) == 5 and 0 <= items[0]["answer"] < 5


def test_world_paths_of_a_rendered_world(world, tmp_path):
    assert world_paths(world.root) == world
    assert world.video_ids == {"train": [f"video{i}" for i in range(6)], "val": ["video6", "video7", "video8"],
                               "test": ["video9", "video10", "video11"]}
    with pytest.raises(FileNotFoundError, match="no world.json"):
        world_paths(tmp_path)


def test_no_false_option_looks_like_the_clip():
    still = WorldObject("circle", "blue", "still", Pose(20, 20, 6, 0), Pose(20, 20, 6, 0))
    right = WorldObject("square", "yellow", "right", Pose(16, 46, 6, 0), Pose(48, 46, 6, 0))
    clip = _clip(still, right)
    looks_true = canonical_caption([("blue", "circle", "rotate"), ("yellow", "square", "right")])  # a circle spins unseen
    options = {option for seed in range(300) for option in make_choice(clip, np.random.default_rng(seed))["options"]}
    assert "a blue circle is not moving while a yellow square is moving right" in options  # the truth, in canonical words
    assert looks_true not in options
