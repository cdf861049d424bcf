"""VTM: hard-negative draws (never a positive, follow softmax, reproducible) and the fusion pairs."""

from unittest import mock

import torch
import torch.nn.functional as F

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.objectives import Pretrainer
from stoa_vlp.objectives.vtm import sample_hard_negatives, vtm_loss


def test_never_draws_a_positive():
    torch.manual_seed(0)
    video_index = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = video_index[:, None] == video_index[None, :]
    similarity = 10 * torch.randn(8, 8)
    similarity[positives] += 100  # positives are by far the most similar, and still never drawn
    rows = torch.arange(8).repeat(200)  # 200 draws per row
    index, has_negative = sample_hard_negatives(similarity[rows], positives[rows])
    assert has_negative.all()
    assert not positives[rows, index].any()


def test_a_race_time_of_zero_never_draws_a_positive(monkeypatch):
    """An exponential draw of exactly 0 (possible in torch's sampler) makes a positive's weight 0 / 0."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, rate=1.0: self.zero_())
    positives = torch.tensor([[True, False, False], [False, True, False]])
    index, has_negative = sample_hard_negatives(torch.zeros(2, 3), positives)
    assert has_negative.all() and not positives[torch.arange(2), index].any()


def test_a_dominant_negative_is_drawn_almost_always():
    torch.manual_seed(1)
    positives = torch.eye(5, dtype=torch.bool)
    similarity = torch.zeros(5, 5)
    similarity[0, 3] = 8.0  # softmax weight e^8 against 3 others of weight 1: p = 0.9990
    rows = torch.tensor([0] * 2000 + [1] * 2000)  # 2000 independent draws for rows 0 and 1
    draws, _ = sample_hard_negatives(similarity[rows], positives[rows])
    assert (draws[:2000] == 3).float().mean() > 0.99
    counts = torch.bincount(draws[2000:], minlength=5)  # row 1: four equal candidates, each ~1/4
    assert counts[1] == 0 and (counts[[0, 2, 3, 4]] > 400).all()


def test_rows_without_any_negative_are_flagged_and_draws_are_reproducible():
    positives = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    similarity = torch.randn(3, 3)
    torch.manual_seed(2)
    index, has_negative = sample_hard_negatives(similarity, positives)
    assert has_negative.tolist() == [True, False, True]
    assert index[0] == 2 and index[2] == 0
    torch.manual_seed(2)
    assert torch.equal(sample_hard_negatives(similarity, positives)[0], index)


def test_fusion_sees_positives_then_caption_and_video_negatives_with_their_labels():
    config = tiny_config()
    model = tiny_model(config)
    batch = make_batch(config)
    video, text = model(batch)
    calls = {}
    real_fuse = model.fuse

    def recording_fuse(video_rows, text_tokens, text_mask, mode):
        calls.update(video=video_rows, text_tokens=text_tokens, mode=mode)
        return real_fuse(video_rows, text_tokens, text_mask, mode)

    negative_video = (torch.tensor([2, 3, 0, 1]), torch.tensor([True, False, True, True]))
    negative_text = (torch.tensor([3, 2, 3, 0]), torch.tensor([True, True, False, True]))
    with mock.patch.object(model, "fuse", side_effect=recording_fuse):
        loss = vtm_loss(model, video, text, video, text, negative_video, negative_text)
    assert calls["mode"] == "bidirectional"
    # positives 0..3, then captions 0..3 with videos 2, 3, 0, 1, then videos 0..3 with captions 3, 2, 3, 0
    video_rows, text_rows = [0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 3, 0]
    assert torch.equal(calls["video"].frames, video.frames[video_rows])
    assert torch.equal(calls["video"].traj_mask, video.traj_mask[video_rows])
    assert torch.equal(calls["text_tokens"], text.tokens[text_rows])
    # pairs whose negative is not valid (caption 1's video, video 2's caption) weigh nothing
    scored = [0, 1, 2, 3, 4, 6, 7, 8, 9, 11]
    logits = model.match_logits(real_fuse(calls["video"], calls["text_tokens"], text.mask[text_rows], "bidirectional"))
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(loss, F.cross_entropy(logits[scored], labels[scored]))


def test_one_video_batch_scores_positives_only():
    config = tiny_config("loss.vtc=0", "loss.mlm=0", "loss.plm=0", "loss.dota=0", "loss.stasp=0")
    model = tiny_model(config)
    batch = make_batch(config, video_index=(5, 5, 5))  # three captions of one video: no negative exists
    losses = Pretrainer(model, config.loss)(batch)
    video, text = model(batch)
    expected = F.cross_entropy(
        model.match_logits(model.fuse(video, text.tokens, text.mask, "bidirectional")), torch.ones(3, dtype=torch.long)
    )
    torch.testing.assert_close(losses["vtm"], expected)
