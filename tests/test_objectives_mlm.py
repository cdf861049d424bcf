"""MLM: which tokens get masked, no leak of a masked word, loss at masked positions only."""

import torch
import torch.nn.functional as F

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.objectives import Pretrainer
from stoa_vlp.objectives.mlm import MASK_INPUT_ID, choose_mlm_positions, masked_input_ids, position_logits, word_positions


def test_masks_only_words_at_least_one_per_caption_at_the_configured_rate():
    torch.manual_seed(0)
    lengths = torch.randint(3, 30, (2000,))  # start + end + 1..28 words
    text_mask = torch.arange(32)[None, :] < lengths[:, None]
    masked = choose_mlm_positions(text_mask, 0.15)
    words = word_positions(text_mask)
    assert not (masked & ~words).any()  # never start (0), end (length - 1) or padding
    assert not masked[:, 0].any() and not masked[torch.arange(2000), lengths - 1].any()
    assert masked.any(dim=1).all()
    # per caption of n words: Binomial(n, p) masks, plus one when that draw is empty (probability q = (1 - p)^n)
    n, p = words.sum(dim=1).double(), 0.15
    q = (1 - p) ** n
    mean = n * p + q
    variance = n * p * (1 - p) + q * (1 - q) - 2 * n * p * q  # Cov(Binomial, 1[Binomial = 0]) = -n p q
    assert abs(masked.sum() - mean.sum()) < 4 * variance.sum().sqrt()
    no_words = choose_mlm_positions(torch.tensor([[True, True, False]]), 0.15)
    assert not no_words.any()  # start + end only: nothing to mask


def test_masked_ids_use_the_documented_id():
    tokens = torch.tensor([[49406, 320, 786, 49407]])
    masked = torch.tensor([[False, True, False, False]])
    assert masked_input_ids(tokens, masked).tolist() == [[49406, MASK_INPUT_ID, 786, 49407]]


def masked_logits(pretrainer, batch, positions):
    video, _, masked = pretrainer.encode(batch, positions)
    return position_logits(pretrainer.model, video, masked.tokens, batch.text_mask, positions)[positions]  # (P, V)


def test_changing_the_true_token_at_a_masked_position_does_not_change_the_logits():
    config = tiny_config("loss.vtc=0", "loss.vtm=0", "loss.plm=0", "loss.dota=0", "loss.stasp=0")
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    batch = make_batch(config)
    positions = torch.zeros_like(batch.text_mask)
    positions[:, 2] = True  # the second word of every caption
    changed = make_batch(config)
    changed.tokens[:, 2] = (changed.tokens[:, 2] + 1000) % 49000 + 1
    with torch.no_grad():
        torch.testing.assert_close(masked_logits(pretrainer, changed, positions), masked_logits(pretrainer, batch, positions))
        # the clean caption itself would leak: the causal tower carries word 2 into positions 3..
        video, clean, _ = pretrainer.encode(changed, positions)
        _, reference_clean, _ = pretrainer.encode(batch, positions)
        assert not torch.allclose(clean.tokens[:, 3], reference_clean.tokens[:, 3])


def test_loss_is_the_cross_entropy_at_masked_positions_only():
    config = tiny_config("loss.vtc=0", "loss.vtm=0", "loss.plm=0", "loss.dota=0", "loss.stasp=0")
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    batch = make_batch(config)
    torch.manual_seed(3)
    loss = pretrainer(batch)["mlm"]
    torch.manual_seed(3)
    positions = choose_mlm_positions(batch.text_mask, config.loss.mlm_probability)  # the same draw
    model = pretrainer.model
    video, _, masked = pretrainer.encode(batch, positions)
    fusion_text = torch.where(positions[..., None], model.mask_embedding, masked.tokens)
    all_logits = model.lm_logits(model.fuse(video, fusion_text, batch.text_mask, "bidirectional").text)  # (B, L, V)
    expected = F.cross_entropy(all_logits[positions], batch.tokens[positions])
    torch.testing.assert_close(loss, expected)
    everywhere = F.cross_entropy(all_logits[batch.text_mask], batch.tokens[batch.text_mask])
    assert not torch.isclose(loss, everywhere)
