"""Greedy and beam search over step functions: beam 1 == greedy; exhaustive search on a tiny vocabulary."""

import itertools

import pytest
import torch

from stoa_vlp.tasks.decoding import beam_search, greedy_decode, normalised

START, END, VOCAB = 9, 0, 4


def make_step(seed: int, items: int = 3):
    """A deterministic non-Markov toy model: next-token log-probs depend on the whole prefix and item."""
    generator = torch.Generator().manual_seed(seed)
    embed = torch.randn(10, 8, generator=generator)
    out = torch.randn(8, VOCAB, generator=generator) * 2
    item_bias = torch.randn(items, VOCAB, generator=generator)

    def step(prefixes, rows):
        weights = torch.arange(1, prefixes.shape[1] + 1, dtype=torch.float32)[None, :, None]
        hidden = torch.tanh((embed[prefixes] * weights).sum(dim=1))
        return torch.log_softmax(hidden @ out + item_bias[rows], dim=-1)

    return step


def sequence_log_prob(step, item, tokens):
    prefix = [START]
    total = 0.0
    for token in tokens:
        total += step(torch.tensor([prefix]), torch.tensor([item]))[0, token].item()
        prefix.append(token)
    return total


def all_sequences(max_len):
    for length in range(1, max_len + 1):
        for body in itertools.product(range(1, VOCAB), repeat=length - 1):
            yield list(body) + [END]
            if length == max_len:
                for last in range(1, VOCAB):
                    yield list(body) + [last]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_one_equals_greedy(length_penalty):
    for seed in range(5):
        step = make_step(seed)
        greedy = greedy_decode(step, 3, START, END, max_len=6)
        beam = beam_search(step, 3, START, END, max_len=6, beam_size=1, length_penalty=length_penalty)
        assert [h.tokens for h in beam] == [h.tokens for h in greedy]
        for item, hypothesis in enumerate(greedy):
            assert hypothesis.log_prob == pytest.approx(sequence_log_prob(step, item, hypothesis.tokens), abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_wide_beam_finds_the_best_enumerated_sequence(length_penalty):
    max_len = 4
    for seed in range(3):
        step = make_step(seed)
        found = beam_search(step, 3, START, END, max_len=max_len, beam_size=128, length_penalty=length_penalty)
        for item in range(3):
            scored = [
                (normalised(sequence_log_prob(step, item, seq), len(seq), length_penalty), seq)
                for seq in all_sequences(max_len)
            ]
            best_score, best_seq = max(scored, key=lambda pair: pair[0])
            assert found[item].tokens == best_seq
            assert found[item].score == pytest.approx(best_score, abs=1e-5)


def test_beam_search_beats_greedy_when_greedy_is_trapped():
    # token 1 looks best first but leads to a bad continuation; token 2 then END is better overall
    def step(prefixes, rows):
        last = prefixes[:, -1]
        table = {START: [-5.0, -0.5, -1.0, -5.0], 1: [-2.5, -2.5, -2.5, -2.5], 2: [-0.1, -5.0, -5.0, -5.0]}
        return torch.tensor([table.get(int(t), [0.0, -9.0, -9.0, -9.0]) for t in last])

    greedy = greedy_decode(step, 1, START, END, max_len=2)[0]
    beam = beam_search(step, 1, START, END, max_len=2, beam_size=2, length_penalty=0.0)[0]
    assert greedy.tokens == [1, 0] and greedy.log_prob == pytest.approx(-3.0)
    assert beam.tokens == [2, 0] and beam.log_prob == pytest.approx(-1.1)
