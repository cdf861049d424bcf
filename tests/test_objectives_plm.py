"""PLM: suffix starts, and the one-pass loss against one fusion pass per prefix length."""

import torch
import torch.nn.functional as F

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.objectives import Pretrainer
from stoa_vlp.objectives.plm import sample_suffix_starts, scored_positions


def test_suffix_start_is_uniform_over_the_word_positions():
    torch.manual_seed(0)
    text_mask = torch.arange(8)[None, :] < torch.tensor([[6]] * 4000 + [[2]] * 10)  # 4 words; no word
    starts = sample_suffix_starts(text_mask)
    counts = torch.bincount(starts[:4000], minlength=6)
    assert counts[0] == 0 and counts[5] == 0  # never the start token, never only the end token
    assert ((counts[1:5] - 1000).abs() < 150).all()
    assert (starts[4000:] == 1).all()  # no word: the end token (position 1) is the only target
    scored = scored_positions(text_mask[[0, 4000]], torch.tensor([3, 1]))
    assert scored.tolist() == [[False, False, False, True, True, True, False, False], [False, True] + [False] * 6]


def prefix_by_prefix_loss(model, video, text, tokens, text_mask, starts):
    """The reference's loop: for each target position t, fuse the text cut to t tokens, predict token t."""
    total, count = 0.0, 0
    for target in range(1, tokens.shape[1]):
        rows = (starts <= target) & (target < text_mask.sum(dim=1))  # captions that score position t
        if not rows.any():
            continue
        fused = model.fuse(video, text.tokens[:, :target], text_mask[:, :target], "prefix")
        logits = model.lm_logits(fused.text[:, target - 1])  # (B, V)
        total = total + F.cross_entropy(logits[rows], tokens[rows, target], reduction="sum")
        count += int(rows.sum())
    return total / count


def test_one_pass_equals_one_fusion_pass_per_prefix():
    # captions of at most 10 words fit 12 tokens: fewer prefix passes
    config = tiny_config("model.text_len=12", "loss.vtc=0", "loss.vtm=0", "loss.mlm=0", "loss.dota=0", "loss.stasp=0")
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    batch = make_batch(config)
    with torch.no_grad():
        torch.manual_seed(4)
        loss = pretrainer(batch)["plm"]
        torch.manual_seed(4)
        starts = sample_suffix_starts(batch.text_mask)  # the same draw
        video, text, _ = pretrainer.encode(batch, None)
        expected = prefix_by_prefix_loss(pretrainer.model, video, text, batch.tokens, batch.text_mask, starts)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
