"""Dynamic Object-Text Alignment (DOTA) and Spatial-Temporal Action Set Prediction (STASP).

Both objectives match a set of visual features to a set of text targets with the Hungarian
algorithm and pull matched pairs together with an MSE:
- DOTA: the valid trajectory features (B, N, E) against the noun-tagged tokens of the caption.
- STASP: the M action features (B, M, E) against the verb-tagged tokens.
Decisions (docs/decisions.md, "Pre-training objectives", open points §6.6 and §6.10):
- Targets are the clean caption's projected text-token features, detached. The caption's
  sentence (end-token) feature is always a candidate too, so a caption without nouns (verbs)
  still pulls one trajectory (action) to its sentence feature.
- Cost: the row-softmax over candidates of the trajectory-candidate similarity; the similarity is
  the dot product of the unnormalised features as in the reference ("dot") or the cosine
  ("cosine"), `loss.match_similarity`. `scipy.optimize.linear_sum_assignment(maximize=True)`
  matches min(#rows, #candidates) pairs per sample.
- MSE on the unnormalised features over all matched pairs of the batch, one mean per objective.
- Each sample and objective is matched independently: a clip without any valid trajectory gets no
  DOTA pair but keeps its STASP pairs (the reference's early `continue` skips both). A batch
  without any pair gives a loss of 0 that is still attached to the graph.
- Host traffic: the cost matrices of every sample of both objectives are padded into one tensor
  (NaN where a row or column is invalid) and copied to the host once (`costs_to_host`: on CUDA an
  asynchronous copy into pinned memory, so the caller can queue more device work, e.g. the fusion
  objectives, before `matched_columns` waits for it); the matches come back as one fixed-shape
  (G, R) tensor of matched columns (-1 = unmatched row), asynchronously on CUDA. Both host parts
  are kept out of `torch.compile` graphs (`torch.compiler.disable`), and the MSE is a masked mean
  over all G x R rows, so no shape downstream depends on the pair count (one compiled graph
  instead of a recompilation per pair count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from stoa_vlp.host_copy import start_copy_to_host
from stoa_vlp.objectives.distributed import global_mean
from stoa_vlp.objectives.mlm import word_positions

SIMILARITIES = ("dot", "cosine")


@dataclass
class AlignmentTask:
    """One objective's sets for a batch: rows to match (predictions) and candidate targets."""

    predictions: torch.Tensor  # (B, R, E) trajectory or action features
    prediction_mask: torch.Tensor  # (B, R) bool
    targets: torch.Tensor  # (B, C, E) candidate features, detached
    target_mask: torch.Tensor  # (B, C) bool


def text_candidates(text_tokens: torch.Tensor, sentence: torch.Tensor, text_mask: torch.Tensor,
                    pos_tags: torch.Tensor, tag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached candidates (B, L+1, E): the caption's tokens then its sentence feature; mask (B, L+1)
    True at the word tokens tagged `tag` (never the start, end or padding, whatever their tags) and
    always at the sentence feature."""
    candidates = torch.cat([text_tokens, sentence[:, None]], dim=1).detach()
    tagged = (pos_tags == tag) & word_positions(text_mask)
    return candidates, torch.cat([tagged, torch.ones_like(tagged[:, :1])], dim=1)


def alignment_costs(task: AlignmentTask, similarity: str) -> torch.Tensor:
    """(B, R, C) row-softmax over valid candidates of the similarity; NaN at invalid rows/columns.
    Computed in float32 even under autocast, which would run the product (and on the CPU the
    softmax) in bf16/fp16 and change some matches (4 of 256 pairs in a check)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"loss.match_similarity must be one of {SIMILARITIES}, got {similarity!r}")
    with torch.autocast(task.predictions.device.type, enabled=False):
        predictions, targets = task.predictions.detach().float(), task.targets.float()
        if similarity == "cosine":
            predictions, targets = F.normalize(predictions, dim=-1), F.normalize(targets, dim=-1)
        scores = (predictions @ targets.transpose(1, 2)).masked_fill(~task.target_mask[:, None, :], float("-inf"))
        costs = torch.softmax(scores, dim=-1)
    valid = task.prediction_mask[:, :, None] & task.target_mask[:, None, :]
    return costs.masked_fill(~valid, float("nan"))


def hungarian_on_host(costs: np.ndarray) -> np.ndarray:
    """Max-weight matching of each (R, C) matrix of `costs` (G, R, C), NaN marking invalid entries.

    Returns the matched pairs (P, 3) int64 as (group, row, column), ordered by group, then row. A row
    is valid when it has a finite entry, a column when it has one in some row.
    One boolean selection takes every group's valid submatrix out at once, row-major, group after
    group; each group's matrix is then a reshaped slice, so per group there is only the solver call
    (about a microsecond), not the masks and fancy indexing that cost several times more.
    """
    finite = np.isfinite(costs)
    row_valid, column_valid = finite.any(axis=2), finite.any(axis=1)  # (G, R), (G, C)
    row_counts, column_counts = row_valid.sum(axis=1), column_valid.sum(axis=1)  # (G,)
    values = costs[row_valid[:, :, None] & column_valid[:, None, :]]  # the valid submatrices, flattened
    ends = np.cumsum(row_counts * column_counts).tolist()
    solved_groups, rows, columns = [], [], []
    for group, (rows_here, columns_here, end) in enumerate(zip(row_counts.tolist(), column_counts.tolist(), ends)):
        if rows_here and columns_here:
            matrix = values[end - rows_here * columns_here : end].reshape(rows_here, columns_here)
            row, column = linear_sum_assignment(matrix, maximize=True)
            solved_groups.append(group)
            rows.append(row)
            columns.append(column)
    if not solved_groups:
        return np.zeros((0, 3), dtype=np.int64)
    group = np.repeat(solved_groups, [len(row) for row in rows])
    # k-th valid row (column) of group g -> its index in the full matrix
    row_index, column_index = np.nonzero(row_valid)[1], np.nonzero(column_valid)[1]
    first_row, first_column = np.cumsum(row_counts) - row_counts, np.cumsum(column_counts) - column_counts
    return np.stack([
        group,
        row_index[first_row[group] + np.concatenate(rows)],
        column_index[first_column[group] + np.concatenate(columns)],
    ], axis=1).astype(np.int64)


def _pad_rows(tensor: torch.Tensor, rows: int, value) -> torch.Tensor:
    """Pad dim 1 of `tensor` to `rows` entries with `value`."""
    missing = rows - tensor.shape[1]
    if missing == 0:
        return tensor
    padding = tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), value)
    return torch.cat([tensor, padding], dim=1)


# copies to the host still in flight: pinned host tensor's address -> CUDA event recorded after the copy
_copies_in_flight: dict[int, torch.cuda.Event] = {}


@torch.compiler.disable
def costs_to_host(costs: torch.Tensor) -> torch.Tensor:
    """Start the one transfer of the (G, R, C) costs to the host; returns the host tensor (float32).

    On CUDA the copy goes asynchronously into pinned memory: the host tensor must not be read before
    `matched_columns` has waited for it. Elsewhere this is a plain copy.
    """
    host, done = start_copy_to_host(costs.detach().float())
    if done is not None:
        _copies_in_flight[host.data_ptr()] = done
    return host


@torch.compiler.disable
def matched_columns(host_costs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(G, R, C) host costs from `costs_to_host` (NaN = invalid) -> (G, R) long on `device`: each row's
    matched column, -1 if none. Waits for the copy (the step's one wait for the device), solves on the
    host and sends the matches back (asynchronously on CUDA)."""
    done = _copies_in_flight.pop(host_costs.data_ptr(), None)
    if done is not None:
        done.synchronize()
    host_pairs = hungarian_on_host(host_costs.numpy())  # (P, 3) group, row, column
    columns = np.full(host_costs.shape[:2], -1, dtype=np.int64)
    columns[host_pairs[:, 0], host_pairs[:, 1]] = host_pairs[:, 2]
    columns = torch.from_numpy(columns)
    if device.type == "cuda":
        return columns.pin_memory().to(device, non_blocking=True)
    return columns.to(device)


def stacked_costs(tasks: list[AlignmentTask], similarity: str) -> torch.Tensor:
    """(G, R, C) costs of every task, G = len(tasks) * B: group g is sample g % B of task g // B."""
    rows = max(task.predictions.shape[1] for task in tasks)
    return torch.cat([_pad_rows(alignment_costs(task, similarity), rows, float("nan")) for task in tasks])


def matched_losses(tasks: list[AlignmentTask], columns: torch.Tensor) -> list[torch.Tensor]:
    """The MSE over the matched pairs of each task (of every rank, `global_mean`), given the (G, R)
    matched columns of `stacked_costs`.

    A task without any matched pair gives 0, still attached to the graph.
    """
    batch = tasks[0].predictions.shape[0]
    rows = columns.shape[1]
    matched = columns >= 0
    predictions = torch.cat([_pad_rows(task.predictions, rows, 0.0) for task in tasks]).float()  # (G, R, E)
    targets = torch.cat([task.targets for task in tasks]).float()  # (G, C, E)
    matched_targets = torch.gather(
        targets, 1, columns.clamp(min=0)[..., None].expand(-1, -1, targets.shape[-1])
    )  # (G, R, E): the target of each row's match (column 0 for unmatched rows, weighted out)
    squared_errors = torch.where(matched, (predictions - matched_targets).pow(2).mean(dim=-1), 0.0)  # (G, R)
    losses = []
    for index in range(len(tasks)):
        task_rows = slice(index * batch, (index + 1) * batch)
        pairs = matched[task_rows].sum().to(squared_errors.dtype)
        losses.append(global_mean(squared_errors[task_rows].sum(), pairs))
    return losses


def alignment_losses(tasks: list[AlignmentTask], similarity: str) -> list[torch.Tensor]:
    """The MSE over Hungarian-matched pairs for each task, with one host round trip for all of them."""
    host_costs = costs_to_host(stacked_costs(tasks, similarity))
    return matched_losses(tasks, matched_columns(host_costs, tasks[0].predictions.device))
