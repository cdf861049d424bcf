"""Autoregressive decoding over a step function: greedy and batched beam search.

A step function maps the prefixes decoded so far to next-token log-probabilities:
    step(prefixes (R, t) long, items (R,) long) -> (R, V) float log-probs
where `items` says which input (video) each row belongs to. Prefixes start with the start token.

Beam search follows fairseq: each step keeps the 2K best continuations of the K live beams; an
end token among the K best closes a hypothesis, whose score is sum(log p) / length**length_penalty
(length = generated tokens, end token included); the rest fill the K beams; at `max_len` the live
beams are closed as they are. The best closed hypothesis by normalised score is returned.

An input is done when no live beam can still end above its best closed hypothesis. Log-probs are
at most 0, so a beam's sum v only falls, and it ends at a length L from the next position up to
`max_len`: its best reachable score is max over those L of v / L**length_penalty, which (v <= 0,
L**length_penalty monotone in L) is at the shortest L for a negative penalty and at `max_len` for a
positive one. The search therefore returns what it would running every input to `max_len`; with a
positive penalty an input stops before that only when its live beams have fallen far behind.

Beam size 1 follows greedy decoding's path until greedy's caption ends (an end token is the best
continuation), then goes on from the runner-up while that could still score higher. With
length_penalty <= 0 it never can, so beam 1 returns greedy's caption; with a positive penalty it
returns greedy's caption or a longer one that scores higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

StepFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (start token excluded, end token included when produced)
    log_prob: float  # sum of the tokens' log-probabilities
    score: float  # log_prob / len(tokens) ** length_penalty


def normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / (max(length, 1) ** length_penalty)


def best_reachable(log_prob: float, shortest: int, longest: int, length_penalty: float) -> float:
    """The highest score a live beam with summed log-prob `log_prob` <= 0 can end with, at a length from
    `shortest` to `longest` (its log-prob can only fall)."""
    return max(normalised(log_prob, shortest, length_penalty), normalised(log_prob, longest, length_penalty))


def settled(closed: list[Hypothesis], live: list[tuple[list[int], float]], position: int, max_len: int,
            length_penalty: float) -> bool:
    """Whether no beam in `live` (after `position` tokens) can end above the best of `closed`."""
    best = max((h.score for h in closed), default=float("-inf"))
    return all(best_reachable(value, position + 1, max_len, length_penalty) <= best for _, value in live)


@torch.no_grad()
def greedy_decode(
    step: StepFunction, num_items: int, start_id: int, end_id: int, max_len: int, device="cpu"
) -> list[Hypothesis]:
    """Arg-max decoding of up to `max_len` tokens per item, stopping at the end token."""
    prefixes = torch.full((num_items, 1), start_id, dtype=torch.long, device=device)
    log_probs = torch.zeros(num_items, dtype=torch.float64)
    live = torch.ones(num_items, dtype=torch.bool)
    lengths = torch.zeros(num_items, dtype=torch.long)
    for _ in range(max_len):
        rows = torch.nonzero(live).flatten()
        if len(rows) == 0:
            break
        scores = step(prefixes[rows.to(device)], rows.to(device)).float().cpu()  # (R, V)
        best, token = scores.max(dim=1)
        next_tokens = torch.full((num_items,), end_id, dtype=torch.long)
        next_tokens[rows] = token
        log_probs[rows] += best.double()
        lengths[rows] += 1
        prefixes = torch.cat([prefixes, next_tokens.to(device)[:, None]], dim=1)
        live[rows[token == end_id]] = False
    return [
        Hypothesis(tokens=prefixes[i, 1 : 1 + lengths[i]].tolist(), log_prob=float(log_probs[i]),
                   score=float(log_probs[i]))
        for i in range(num_items)
    ]


@torch.no_grad()
def beam_search(
    step: StepFunction,
    num_items: int,
    start_id: int,
    end_id: int,
    max_len: int,
    beam_size: int,
    length_penalty: float = 1.0,
    device="cpu",
) -> list[Hypothesis]:
    """Batched beam search; returns the best closed hypothesis of each item (see module docstring)."""
    if beam_size < 1:
        raise ValueError(f"beam size must be >= 1, got {beam_size}")
    beams = [[([], 0.0)] for _ in range(num_items)]  # per item: live (tokens, log_prob)
    closed: list[list[Hypothesis]] = [[] for _ in range(num_items)]
    for position in range(1, max_len + 1):
        rows = [(item, beam) for item in range(num_items) for beam in range(len(beams[item]))]
        if not rows:
            break
        prefixes = torch.tensor([[start_id] + beams[item][beam][0] for item, beam in rows], dtype=torch.long)
        items = torch.tensor([item for item, _ in rows], dtype=torch.long)
        scores = step(prefixes.to(device), items.to(device)).double().cpu()  # (R, V)
        scores += torch.tensor([beams[item][beam][1] for item, beam in rows], dtype=torch.float64)[:, None]
        vocab = scores.shape[1]
        next_beams: list[list[tuple[list[int], float]]] = [[] for _ in range(num_items)]
        row = 0
        for item in range(num_items):
            count = len(beams[item])
            if count == 0:
                continue
            candidates = scores[row : row + count].flatten()
            top_scores, top_index = candidates.topk(min(2 * beam_size, candidates.numel()))
            for rank, (value, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
                if value == float("-inf"):
                    break
                tokens = beams[item][index // vocab][0] + [index % vocab]
                if index % vocab == end_id:
                    if rank < beam_size:
                        closed[item].append(Hypothesis(tokens, value, normalised(value, position, length_penalty)))
                elif len(next_beams[item]) < beam_size:
                    next_beams[item].append((tokens, value))
            row += count
            if position == max_len:
                closed[item].extend(
                    Hypothesis(tokens, value, normalised(value, position, length_penalty))
                    for tokens, value in next_beams[item]
                )
            if position == max_len or settled(closed[item], next_beams[item], position, max_len, length_penalty):
                next_beams[item] = []
        beams = next_beams
    return [max(hypotheses, key=lambda h: h.score) for hypotheses in closed]
