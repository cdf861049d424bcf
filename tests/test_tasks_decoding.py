"""Greedy and beam search over step functions: beam 1 against greedy; stopping early against running to the end;
exhaustive search on a tiny vocabulary."""

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


def table_step(table):
    """A step function reading each prefix's log-probs (over END, 1, 2, 3) from `table`, keyed by its generated
    tokens."""

    def step(prefixes, rows):
        return torch.tensor([table[tuple(prefix[1:])] for prefix in prefixes.tolist()])

    return step


def unstopped_beam_score(step, item, beam_size, max_len, length_penalty):
    """Reference: the best score one item's beam search closes when it runs to max_len without stopping."""
    live, closed = [([], 0.0)], []
    for position in range(1, max_len + 1):
        continuations = [(tokens, value, step(torch.tensor([[START] + tokens]), torch.tensor([item]))[0].tolist())
                         for tokens, value in live]
        candidates = sorted(
            ((value + log_prob, tokens + [token]) for tokens, value, log_probs in continuations
             for token, log_prob in enumerate(log_probs)),
            key=lambda candidate: -candidate[0],
        )[: 2 * beam_size]
        closed += [normalised(value, position, length_penalty)
                   for rank, (value, tokens) in enumerate(candidates) if tokens[-1] == END and rank < beam_size]
        live = [(tokens, value) for value, tokens in candidates if tokens[-1] != END][:beam_size]
    return max(closed + [normalised(value, max_len, length_penalty) for _, value in live])


@pytest.mark.parametrize("length_penalty", [-0.5, 0.0])
def test_beam_one_is_greedy_without_a_positive_length_penalty(length_penalty):
    for seed in range(5):
        step = make_step(seed)
        greedy = greedy_decode(step, 3, START, END, max_len=6)
        beam = beam_search(step, 3, START, END, max_len=6, beam_size=1, length_penalty=length_penalty)
        assert [h.tokens for h in beam] == [h.tokens for h in greedy]
        for item, hypothesis in enumerate(greedy):
            assert hypothesis.log_prob == pytest.approx(sequence_log_prob(step, item, hypothesis.tokens), abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.6, 1.0])
def test_beam_one_scores_at_least_greedy(length_penalty):
    for seed in range(5):
        step = make_step(seed)
        greedy = greedy_decode(step, 3, START, END, max_len=6)
        beam = beam_search(step, 3, START, END, max_len=6, beam_size=1, length_penalty=length_penalty)
        for found, plain in zip(beam, greedy):
            greedy_score = normalised(plain.log_prob, len(plain.tokens), length_penalty)
            assert found.score >= greedy_score - 1e-9
            assert found.tokens == plain.tokens or found.score > greedy_score


def test_beam_one_looks_past_greedy_end_up_to_max_len():
    # greedy ends at once (-0.45); the runner-up [1] (-0.95) can win only at length 3: -0.95/2 < -0.45 < -0.95/3
    step = table_step({
        (): [-0.45, -0.95, -3.0, -3.0], (1,): [-2.0, -0.01, -3.0, -3.0], (1, 1): [-0.01, -3.0, -3.0, -3.0],
    })
    assert greedy_decode(step, 1, START, END, max_len=3)[0].tokens == [END]
    beam = beam_search(step, 1, START, END, max_len=3, beam_size=1, length_penalty=1.0)[0]
    assert beam.tokens == [1, 1, END] and beam.score == pytest.approx(-0.97 / 3)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_goes_on_while_a_live_beam_can_beat_the_closed(length_penalty):
    # the auditor's case: after 2 tokens [END] (-4.4) and [1, END] (-10.8) are closed, but the live [1, 1] (-1.6)
    # goes on to [1, 1, 1] (-1.61); stopping at K closed returned the empty caption [END]
    inf = float("inf")
    step = table_step({
        (): [-4.4, -1.5, -9.8, -inf], (1,): [-9.3, -0.1, -12.5, -inf], (2,): [-1.7, -4.3, -6.5, -inf],
        (1, 1): [-12.9, -0.01, -14.3, -inf], (1, 2): [-4.1, -6.1, -10.9, -inf],
    })
    beam = beam_search(step, 1, START, END, max_len=3, beam_size=2, length_penalty=length_penalty)[0]
    assert beam.tokens == [1, 1, 1] and beam.log_prob == pytest.approx(-1.61)


@pytest.mark.parametrize("length_penalty", [-0.5, 0.0, 0.6, 1.0])
def test_stopping_early_keeps_the_unstopped_result(length_penalty):
    for seed in range(4):
        step = make_step(seed)
        for beam_size in (1, 2, 3):
            found = beam_search(step, 3, START, END, max_len=4, beam_size=beam_size, length_penalty=length_penalty)
            for item in range(3):
                assert found[item].score == pytest.approx(
                    unstopped_beam_score(step, item, beam_size, 4, length_penalty), abs=1e-9)


@pytest.mark.parametrize("length_penalty", [-0.5, 0.0, 0.6, 1.0])
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
