"""`explain_clip` matches trajectories to nouns and actions to verbs as DOTA/STASP do, and `render` draws
each box in its trajectory's colour where the model sees it."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.batch import TAG_NOUN, TAG_VERB
from stoa_vlp.data.detections import LabelVocab
from stoa_vlp.model.towers import CLIP_MEAN, CLIP_STD
from stoa_vlp.tasks.visualise import (
    SENTENCE,
    explain_clip,
    heat_overlay,
    input_frames,
    render,
    token_words,
    trajectory_colour,
)
from stoa_vlp.tokenizer import Tokenizer

VOCAB = LabelVocab(["disc", "square", "star"])  # ids 2, 3, 4; make_batch draws labels 1..3


def expected_matches(rows, row_mask, tokens, sentence, candidate_mask):
    """(row, column) pairs: Hungarian on the row-softmax of dot products, by brute force over valid entries."""
    candidates = torch.cat([tokens, sentence[None]])  # (L+1, E)
    scores = (rows.float() @ candidates.float().T).masked_fill(~candidate_mask[None], float("-inf")).softmax(dim=-1)
    valid_rows = row_mask.nonzero().flatten().numpy()
    valid_columns = candidate_mask.nonzero().flatten().numpy()
    r, c = linear_sum_assignment(scores.numpy()[np.ix_(valid_rows, valid_columns)], maximize=True)
    return sorted(zip(valid_rows[r].tolist(), valid_columns[c].tolist()))


@pytest.mark.parametrize("tagged", [True, False])
def test_matches_are_the_hungarian_matches_of_dota_and_stasp(tagged):
    config = tiny_config()
    model = tiny_model(config).eval()
    batch = make_batch(config, video_index=(0,), no_detections=())
    tokenizer = Tokenizer(config.model.text_len)
    explanation = explain_clip(model, batch, "caption", tokenizer, VOCAB, batch.pos_tags if tagged else None)
    with torch.no_grad():
        video, text = model(batch)
    length = int(batch.text_mask[0].sum())
    words = torch.zeros(config.model.text_len + 1, dtype=torch.bool)
    words[1 : length - 1] = True  # every word token: not start, not end, not padding
    sentence = torch.zeros_like(words)
    sentence[-1] = True
    nouns = torch.cat([batch.pos_tags[0] == TAG_NOUN, torch.zeros(1, dtype=torch.bool)]) if tagged else words
    verbs = torch.cat([batch.pos_tags[0] == TAG_VERB, torch.zeros(1, dtype=torch.bool)]) if tagged else words
    objects = expected_matches(video.trajectories[0], batch.traj_mask[0], text.tokens[0], text.sentence[0],
                               nouns | sentence)
    actions = expected_matches(video.actions[0], torch.ones(video.actions.shape[1], dtype=torch.bool),
                               text.tokens[0], text.sentence[0], verbs | sentence)
    column = {SENTENCE: config.model.text_len}
    assert [(m.row, column.get(m.word, m.position)) for m in explanation.objects] == objects
    assert [(m.row, column.get(m.word, m.position)) for m in explanation.actions] == actions
    assert len(objects) == int(batch.traj_mask.sum()) and len(actions) == video.actions.shape[1]
    for match in explanation.objects:
        assert match.name == VOCAB.name(int(batch.traj_labels[0, match.row]))
        target = text.sentence[0] if match.position < 0 else text.tokens[0, match.position]
        if match.position >= 0:
            assert match.word == token_words(batch.tokens[0].tolist(), tokenizer)[match.position]
        expected_cosine = torch.nn.functional.cosine_similarity(video.trajectories[0, match.row], target, dim=0)
        assert match.cosine == pytest.approx(float(expected_cosine), abs=1e-5)
    assert explanation.tagged is tagged
    assert len(explanation.boxes) == int(batch.box_mask.sum())
    assert 0.0 <= explanation.match_probability <= 1.0


def test_input_frames_undo_the_clip_normalisation():
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    normalised = (image.float() / 255 - mean) / std
    assert torch.equal(input_frames(normalised), image)
    assert torch.equal(input_frames(image), image)  # the data pipeline's uint8 frames, as they are


def test_render_draws_each_box_in_its_trajectory_colour(tmp_path):
    config = tiny_config()  # 4 frames of 64 px
    model = tiny_model(config)
    batch = make_batch(config, video_index=(0,), no_detections=())
    batch.frames = (torch.zeros_like(batch.frames) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
        CLIP_STD).view(3, 1, 1)  # black frames
    batch.box_mask[:] = False
    batch.box_mask[0, 2, 0] = True  # one box, on frame 2, of the first trajectory's class
    batch.box_labels[0, 2, 0] = batch.traj_labels[0, 0]
    batch.boxes[0, 2, 0] = torch.tensor([4.0, 6.0, 20.0, 26.0])
    explanation = explain_clip(model, batch, "caption", Tokenizer(config.model.text_len), VOCAB, batch.pos_tags)
    assert [(box.frame, box.rect, box.trajectory) for box in explanation.boxes] == [(2, (4.0, 6.0, 20.0, 26.0), 0)]
    path = tmp_path / "clip.png"
    render(explanation, path, min_frame_size=128)
    image = np.asarray(Image.open(path).convert("RGB"))
    size, scale, padding = 64 * 2, 2, 4  # 64 px frames enlarged 2x; one row of 4 frames, then one per action query
    queries = config.model.action_queries
    assert image.shape[1] >= 4 * size + 5 * padding and image.shape[0] > (1 + queries) * (size + padding)
    top, left = padding, padding + 2 * (size + padding)  # frame 2: first row, third column
    colour = tuple(int(trajectory_colour(0)[i : i + 2], 16) for i in (1, 3, 5))
    assert tuple(image[top + 16 * scale, left + 4 * scale]) == colour  # the box's left edge, halfway down
    assert tuple(image[top + 16 * scale, left + 12 * scale]) == (0, 0, 0)  # inside the box: the black frame
    assert tuple(image[top + 16 * scale, padding + 4 * scale]) == (0, 0, 0)  # frame 0 has no box
    heat = explanation.action_attention[0, 0]  # query 0 on frame 0: its row is the second one
    hottest = divmod(int(heat.argmax()), heat.shape[1])  # (patch row, patch column)
    patch = size // heat.shape[0]
    y, x = padding + size + padding + hottest[0] * patch + patch // 2, padding + hottest[1] * patch + patch // 2
    assert tuple(image[y, x]) == (round(0.7 * 255), 0, 0)  # black frame, full strength red at the hottest patch


def test_action_attention_is_the_encoders_spatial_attention():
    config = tiny_config()
    model = tiny_model(config).eval()
    batch = make_batch(config, video_index=(0,), no_detections=())
    explanation = explain_clip(model, batch, "caption", Tokenizer(config.model.text_len), VOCAB, batch.pos_tags)
    with torch.no_grad():
        tower = model.visual(batch.frames)
        objects = model.object_tokens(tower.object_tap, batch.boxes, batch.box_labels, batch.box_mask)
        weights, _ = model.action_encoder.spatial_attention(tower.action_tap, objects, batch.box_mask)
    patches = tower.action_tap.shape[2] - 1
    grid = int(patches**0.5)
    frames, queries = config.model.frames, config.model.action_queries
    assert explanation.action_attention.shape == (frames, queries, grid, grid)
    torch.testing.assert_close(explanation.action_attention.flatten(2), weights[0, :, :, :patches])
    torch.testing.assert_close(torch.tensor(explanation.action_object_share), weights[0, :, :, patches:].sum(-1).mean(0))
    total = explanation.action_attention.flatten(2).sum(-1) + weights[0, :, :, patches:].sum(-1)
    torch.testing.assert_close(total, torch.ones(frames, queries))  # a distribution over patches and objects


def test_heat_overlay_tints_in_proportion_to_the_heat():
    frame = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    heat = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    tinted = heat_overlay(frame, heat, strength=0.5)
    assert tinted[:, 0, 0].tolist() == [100, 100, 100]  # no heat: untouched
    assert tinted[:, 3, 0].tolist() == [178, 50, 50]  # the maximum: halfway to red (100 * 0.5 + 255 * 0.5)
    assert tinted[:, 0, 3].tolist() == [139, 75, 75]  # heat 0.5 of the maximum: a quarter of the way


def test_token_words_are_whole_words_across_bpe_pieces():
    tokenizer = Tokenizer(8)
    tokens, _ = tokenizer("the circle shrinks quickly")
    pieces = [tokenizer.bpe.decoder[token] for token in tokens[0].tolist()]
    assert pieces[3:5] == ["shrin", "ks</w>"]  # one word, two BPE pieces
    assert token_words(tokens[0].tolist(), tokenizer) == ["", "the", "circle", "shrinks", "shrinks", "quickly", "", ""]
    cut, _ = Tokenizer(5)("the circle shrinks")  # [start, the, circle, shrin, end]: cut inside the word
    assert token_words(cut[0].tolist(), Tokenizer(5)) == ["", "the", "circle", "shrin", ""]


def test_without_spacy_pipeline_every_word_is_a_candidate_and_a_warning_says_so(monkeypatch, caplog):
    from stoa_vlp.commands import visualise
    from stoa_vlp.data import tags

    found = visualise.caption_tags("the dog chases a ball", Tokenizer(8), "en_core_web_sm")  # installed (dev extras)
    assert found.tolist() == [[0, 0, TAG_NOUN, TAG_VERB, 0, TAG_NOUN, 0, 0]]

    def missing(name):
        raise OSError(f"spaCy pipeline '{name}' is not installed")

    monkeypatch.setattr(tags, "load_spacy", missing)
    assert visualise.caption_tags("the dog chases a ball", Tokenizer(8), "en_core_web_sm") is None
    assert "no noun/verb tags (spaCy pipeline 'en_core_web_sm' is not installed)" in caplog.text
