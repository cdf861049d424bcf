"""Captioning on the tiny model: the training loss, decoding through the model's step function, and caption text."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from stoa_vlp.batch import Batch
from stoa_vlp.config import load_config
from stoa_vlp.metrics.captioning import ptb_tokenize
from stoa_vlp.model import build_model
from stoa_vlp.tasks.captioning import CaptioningModule, caption_step, generate_captions
from stoa_vlp.tasks.decoding import beam_search, normalised
from stoa_vlp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = load_config("tiny", ["model.objects=false"])
    model = build_model(config.model).eval()
    m = config.model
    frames = torch.randn(2, m.frames, 3, m.image_size, m.image_size)
    with torch.no_grad():
        videos = model.encode_video(frames, *[None] * 5)
    return config, model, frames, videos, Tokenizer(m.text_len)


def test_caption_loss_is_next_token_cross_entropy_over_the_whole_caption(setup):
    config, model, frames, videos, tokenizer = setup
    tokens, mask = tokenizer(["a red square moves left", "a blue circle"])
    empty = torch.zeros(2, 0)
    batch = Batch(frames, empty, empty, empty, empty, empty, tokens, mask, torch.zeros_like(tokens),
                  torch.arange(2), ["a", "b"])
    with torch.no_grad():
        loss = CaptioningModule(model)(batch)["loss"]
        text = model.encode_text(tokens, mask)
        fused = model.fuse(videos, text.tokens, mask, mode="prefix")
        logits = model.lm_logits(fused.text)  # (B, L, V)
    targets = [(b, i) for b in range(2) for i in range(1, int(mask[b].sum()))]  # every token after the start
    expected = torch.stack([F.cross_entropy(logits[b, i - 1], tokens[b, i]) for b, i in targets]).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_model_step_matches_one_full_prefix_pass(setup):
    config, model, _, videos, tokenizer = setup
    step = caption_step(model, videos, tokenizer.sot_id)
    prefix = torch.tensor([[tokenizer.sot_id, 320, 786], [tokenizer.sot_id, 320, 1449]])
    with torch.no_grad():
        log_probs = step(prefix, torch.tensor([1, 0]))
        mask = torch.ones_like(prefix, dtype=torch.bool)
        text = model.encode_text(prefix[:1], mask[:1])
        fused = model.fuse(videos.index_select(torch.tensor([1])), text.tokens, mask[:1], mode="prefix")
        expected = torch.log_softmax(model.lm_logits(fused.text[:, -1]), dim=-1)[0]
    expected[tokenizer.sot_id] = float("-inf")
    torch.testing.assert_close(log_probs[0], expected, atol=1e-5, rtol=1e-5)


def test_beam_one_equals_greedy_on_the_model(setup):
    config, model, _, videos, tokenizer = setup
    greedy = generate_captions(model, videos, tokenizer, beam_size=1, max_tokens=5)
    step = caption_step(model, videos, tokenizer.sot_id)
    beam = beam_search(step, 2, tokenizer.sot_id, tokenizer.eot_id, 5, beam_size=1, length_penalty=0.0)
    assert [tokenizer.decode(h.tokens) for h in beam] == greedy


def test_generate_captions_searches_with_its_length_penalty(setup, monkeypatch):
    """A step where "a" (id 320) keeps p 0.7 after a first 0.6 and the end token takes the rest: with no
    length penalty the empty caption (log 0.4) wins, with penalty 2 the longest, "a a a a" (4 tokens)."""
    from stoa_vlp.tasks import captioning

    config, model, _, videos, tokenizer = setup
    word, end = 320, tokenizer.eot_id

    def step(prefixes, items):
        log_probs = torch.full((len(prefixes), tokenizer.vocab_size), float("-inf"))
        first = prefixes.shape[1] == 1
        log_probs[:, word] = math.log(0.6 if first else 0.7)
        log_probs[:, end] = math.log(0.4 if first else 0.3)
        return log_probs

    monkeypatch.setattr(captioning, "caption_step", lambda *args: step)
    captions = {penalty: generate_captions(model, videos, tokenizer, beam_size=2, length_penalty=penalty, max_tokens=4)
                for penalty in (0.0, 2.0)}
    assert captions == {0.0: ["", ""], 2.0: ["a a a a", "a a a a"]}


def test_beam_finds_the_best_caption_of_a_restricted_vocabulary(setup):
    config, model, _, videos, tokenizer = setup
    allowed = torch.tensor([tokenizer.eot_id, 320, 786, 1449])  # end, "a", "man", "red"
    full_step = caption_step(model, videos, tokenizer.sot_id)

    def restricted(prefixes, items):  # log-probs renormalised over the 4 allowed tokens (index 0 = end)
        ids = torch.cat([prefixes[:, :1], allowed[prefixes[:, 1:]]], dim=1)
        return torch.log_softmax(full_step(ids, items)[:, allowed], dim=-1)

    start, end, max_len, penalty = 0, 0, 3, 0.7  # prefix index 0 stands for the start token
    found = beam_search(restricted, 2, start, end, max_len, beam_size=64, length_penalty=penalty)
    with torch.no_grad():
        prefixes = [()] + [tuple(p) for n in (1, 2) for p in itertools.product(range(1, 4), repeat=n)]
        table = {(item, p): restricted(torch.tensor([[start, *p]]), torch.tensor([item]))[0]
                 for item in range(2) for p in prefixes}
    for item in range(2):
        candidates = [list(p) + [end] for p in prefixes] + [list(p) + [t] for p in prefixes if len(p) == 2
                                                            for t in range(1, 4)]
        scored = []
        for seq in candidates:
            total = sum(float(table[(item, tuple(seq[:i]))][t]) for i, t in enumerate(seq))
            scored.append((normalised(total, len(seq), penalty), seq))
        best_score, best_seq = max(scored, key=lambda pair: pair[0])
        assert found[item].tokens == best_seq
        assert found[item].score == pytest.approx(best_score, abs=1e-4)


def test_a_generated_line_break_token_decodes_as_a_space():
    """CLIP's vocabulary has tokens for "\r", "\x0b" and "\x0c" (ids 199-201, 455-457), which a caption
    model can generate; a caption keeps no such character (it broke the PTB tokenizer's one caption per line)."""
    tokenizer = Tokenizer(16)
    words = tokenizer.encode_words("a man cooks")
    for control in (199, 200, 201, 455, 456, 457):
        ids = [tokenizer.sot_id, *words[:2], control, words[2], tokenizer.eot_id]
        assert tokenizer.decode(ids) == "a man cooks"


@pytest.mark.parametrize("text", [
    "A man in a T-shirt isn't talking", "the 2015 cars of a 5-star hotel", "a mother-in-law's 2-year-old can't swim",
    "they're sure we've won and I'm told we'll see what he'd do", "a bird's-eye view",
    "a 2.5 meter jump at 10:30",
])
def test_decoding_rejoins_hyphens_digit_runs_and_contractions(text):
    tokenizer = Tokenizer(32)
    assert tokenizer.decode(tokenizer.encode_words(text)) == text.lower()


def test_decoded_references_tokenise_for_the_metrics_as_the_references_do():
    references = {"1": ["A man in a T-shirt isn't talking."], "2": ["The 2015 cars of a 5-star hotel, parked"],
                  "3": ["The man's dog can't jump!"]}
    tokenizer = Tokenizer(32)
    decoded = {key: [tokenizer.decode(tokenizer.encode_words(text)) for text in texts]
               for key, texts in references.items()}
    assert ptb_tokenize(decoded) == ptb_tokenize(references)
