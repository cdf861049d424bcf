"""DOTA/STASP matching: brute force over assignments, sentence fallback, empty trajectories, one host trip."""

import contextlib
import itertools
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from stoa_vlp.batch import TAG_NONE, TAG_NOUN, TAG_VERB
from stoa_vlp.objectives.matching import (
    AlignmentTask,
    alignment_costs,
    alignment_losses,
    hungarian_on_host,
    text_candidates,
)


def brute_force_best(cost: np.ndarray) -> float:
    """Largest total of a matching of min(rows, columns) pairs, by enumerating all of them."""
    rows, columns = cost.shape
    if rows > columns:
        return brute_force_best(cost.T)
    return max(sum(cost[r, c] for r, c in enumerate(chosen)) for chosen in itertools.permutations(range(columns), rows))


def test_hungarian_equals_brute_force_on_random_padded_instances():
    rng = np.random.default_rng(0)
    costs = np.full((30, 5, 6), np.nan)
    shapes = []
    for group in range(30):
        rows, columns = rng.integers(1, 6), rng.integers(1, 7)
        row_ids = np.sort(rng.choice(5, rows, replace=False))  # valid rows need not come first
        column_ids = np.sort(rng.choice(6, columns, replace=False))
        costs[group][np.ix_(row_ids, column_ids)] = rng.random((rows, columns))
        shapes.append((row_ids, column_ids))
    pairs = hungarian_on_host(costs)
    for group, (row_ids, column_ids) in enumerate(shapes):
        mine = pairs[pairs[:, 0] == group]
        assert len(mine) == min(len(row_ids), len(column_ids))
        assert len(set(mine[:, 1])) == len(mine) and len(set(mine[:, 2])) == len(mine)  # one-to-one
        assert set(mine[:, 1]) <= set(row_ids) and set(mine[:, 2]) <= set(column_ids)
        total = costs[group, mine[:, 1], mine[:, 2]].sum()
        np.testing.assert_allclose(total, brute_force_best(costs[group][np.ix_(row_ids, column_ids)]))


def test_costs_are_row_softmax_over_valid_candidates_with_dot_or_cosine():
    torch.manual_seed(0)
    predictions, targets = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    task = AlignmentTask(predictions, torch.tensor([[True, False]]), targets, torch.tensor([[True, False, True]]))
    dot = alignment_costs(task, "dot")
    expected = torch.softmax(predictions[0, 0] @ targets[0][[0, 2]].T, dim=0)
    torch.testing.assert_close(dot[0, 0, [0, 2]], expected)
    assert dot[0, 0, 1].isnan() and dot[0, 1].isnan().all()
    cosine = alignment_costs(task, "cosine")
    expected = torch.softmax(F.normalize(predictions[0, 0], dim=0) @ F.normalize(targets[0][[0, 2]], dim=1).T, dim=0)
    torch.testing.assert_close(cosine[0, 0, [0, 2]], expected)


def test_costs_are_float32_under_autocast():
    torch.manual_seed(0)
    predictions, targets = 3 * torch.randn(2, 8, 64), 3 * torch.randn(2, 12, 64)  # feature-sized scores
    task = AlignmentTask(predictions, torch.ones(2, 8, dtype=torch.bool), targets, torch.ones(2, 12, dtype=torch.bool))
    expected = alignment_costs(task, "dot")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        costs = alignment_costs(task, "dot")
    assert costs.dtype == torch.float32
    torch.testing.assert_close(costs, expected)  # bf16 products were off by up to 2e-2


def test_candidates_are_tagged_tokens_plus_the_sentence():
    tokens, sentence = torch.randn(2, 4, 3, requires_grad=True), torch.randn(2, 3)
    text_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    tags = torch.tensor([[TAG_NONE, TAG_NOUN, TAG_VERB, TAG_NOUN], [TAG_NONE, TAG_VERB, TAG_VERB, TAG_NONE]])
    candidates, nouns = text_candidates(tokens, sentence, text_mask, tags, TAG_NOUN)
    assert not candidates.requires_grad
    torch.testing.assert_close(candidates[:, 4], sentence)
    assert nouns.tolist() == [[False, True, False, False, True], [False, False, False, False, True]]  # padding ignored


def test_the_start_and_end_tokens_are_never_candidates_whatever_their_tags():
    tokens, sentence = torch.randn(1, 5, 3), torch.randn(1, 3)
    text_mask = torch.tensor([[True, True, True, True, False]])
    _, nouns = text_candidates(tokens, sentence, text_mask, torch.full((1, 5), TAG_NOUN), TAG_NOUN)
    assert nouns.tolist() == [[False, True, True, False, False, True]]  # words 1-2 and the sentence


def test_no_nouns_or_verbs_pulls_one_row_to_the_sentence_feature():
    torch.manual_seed(1)
    predictions = torch.randn(1, 3, 4, requires_grad=True)
    tokens, sentence = torch.randn(1, 5, 4), torch.randn(1, 4)
    text_mask = torch.ones(1, 5, dtype=torch.bool)
    targets, target_mask = text_candidates(tokens, sentence, text_mask, torch.zeros(1, 5, dtype=torch.long), TAG_VERB)
    task = AlignmentTask(predictions, torch.ones(1, 3, dtype=torch.bool), targets, target_mask)
    (loss,) = alignment_losses([task], "dot")
    # one pair: the row whose softmax over the single candidate is largest; all are 1, so any row
    errors = [F.mse_loss(predictions[0, row], sentence[0]) for row in range(3)]
    assert any(torch.isclose(loss, error) for error in errors)
    loss.backward()
    assert (predictions.grad.abs().sum(dim=-1) > 0).sum() == 1


def test_empty_trajectories_keep_the_action_loss_and_one_host_transfer():
    torch.manual_seed(2)
    batch = 3
    tokens, sentence = torch.randn(batch, 6, 4), torch.randn(batch, 4)
    text_mask = torch.ones(batch, 6, dtype=torch.bool)
    tags = torch.tensor([[0, 1, 2, 1, 2, 0]] * batch)
    trajectories = torch.randn(batch, 3, 4, requires_grad=True)
    traj_mask = torch.tensor([[False, False, False], [True, False, True], [False, False, False]])
    actions = torch.randn(batch, 2, 4, requires_grad=True)
    nouns = text_candidates(tokens, sentence, text_mask, tags, TAG_NOUN)
    verbs = text_candidates(tokens, sentence, text_mask, tags, TAG_VERB)
    tasks = [
        AlignmentTask(trajectories, traj_mask, *nouns),
        AlignmentTask(actions, torch.ones(batch, 2, dtype=torch.bool), *verbs),
    ]
    host_calls = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            host_calls.append(name)
            return real(self, *args, **kwargs)

        return method

    with contextlib.ExitStack() as patches:
        for name in ("cpu", "numpy", "tolist", "item"):
            patches.enter_context(mock.patch.object(torch.Tensor, name, counting(name)))
        dota, stasp = alignment_losses(tasks, "dot")
    assert host_calls == ["cpu", "numpy"]  # one transfer of all cost matrices of both objectives

    # reference: per sample, the best assignment by brute force, MSE over all pairs of the batch
    def reference(predictions, valid_rows, candidates, valid_columns):
        errors = []
        for sample in range(batch):
            rows = valid_rows[sample].nonzero().squeeze(1)
            columns = valid_columns[sample].nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            scores = torch.softmax(predictions[sample, rows] @ candidates[sample, columns].T, dim=1)
            assignments = itertools.permutations(range(len(columns)), len(rows))  # rows <= columns here
            best = max(assignments, key=lambda chosen: sum(scores[r, c] for r, c in enumerate(chosen)))
            for r, c in enumerate(best):
                errors.append(((predictions[sample, rows[r]] - candidates[sample, columns[c]]) ** 2).mean())
        return torch.stack(errors).mean()

    torch.testing.assert_close(dota, reference(trajectories, traj_mask, *nouns))
    torch.testing.assert_close(stasp, reference(actions, torch.ones(batch, 2, dtype=torch.bool), *verbs))
    (dota + stasp).backward()
    assert trajectories.grad[0].abs().sum() == 0 and trajectories.grad[2].abs().sum() == 0
    assert (actions.grad.abs().sum(dim=(1, 2)) > 0).all()  # every sample, with or without trajectories


def test_a_batch_without_any_trajectory_gives_zero_attached_to_the_graph():
    trajectories = torch.randn(2, 3, 4, requires_grad=True)
    candidates, candidate_mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    (loss,) = alignment_losses(
        [AlignmentTask(trajectories, torch.zeros(2, 3, dtype=torch.bool), candidates, candidate_mask)], "cosine"
    )
    assert loss == 0 and loss.requires_grad
    empty = torch.zeros(2, 0, 4, requires_grad=True)  # objects off: no rows at all
    task = AlignmentTask(empty, torch.zeros(2, 0, dtype=torch.bool), candidates, candidate_mask)
    (loss,) = alignment_losses([task], "dot")
    assert loss == 0
