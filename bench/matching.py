"""Host Hungarian matching of one pre-training step: `matching.hungarian_on_host` against the plain
per-group version, same run, same costs.

The costs have the shapes and validity patterns of one `base` step (`gpu_step.synthetic_batch`): for
DOTA, B groups of N=20 trajectory rows (the clip's valid trajectories) by L+1 candidates (the noun
tokens and the sentence feature); for STASP, B groups of M=4 action rows (padded to 20) by the verb
tokens and the sentence feature; random values elsewhere, NaN where invalid. Both methods return the
same pairs (checked here and in tests/test_bench_matching.py). The baseline is the earlier code:
per group, the valid rows and columns found with masks and cut out with fancy indexing, then solved.

    python bench/matching.py                # 96 clips, the base config
    python bench/matching.py --clips 256
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from stoa_vlp.batch import TAG_NOUN, TAG_VERB
from stoa_vlp.config import load_config
from stoa_vlp.objectives.matching import hungarian_on_host

sys.path.insert(0, str(Path(__file__).parent))
from gpu_step import synthetic_batch  # noqa: E402  (the GPU benchmark's batch, so the same patterns)


def plain_hungarian(costs: np.ndarray) -> np.ndarray:
    """The baseline: each group's valid submatrix cut out and solved, its pairs mapped back."""
    pairs = []
    for group, matrix in enumerate(costs):
        rows = np.flatnonzero(np.isfinite(matrix).any(axis=1))
        columns = np.flatnonzero(np.isfinite(matrix).any(axis=0))
        if rows.size and columns.size:
            row, column = linear_sum_assignment(matrix[np.ix_(rows, columns)], maximize=True)
            pairs.append(np.stack([np.full_like(row, group), rows[row], columns[column]], axis=1))
    return np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 3), dtype=np.int64)


def step_costs(clips: int, seed: int = 0) -> np.ndarray:
    """(2 * clips, N, L + 1) float32 costs with one base step's valid rows and columns, NaN elsewhere."""
    config = load_config("base")
    model = config.model
    batch = synthetic_batch(config, clips, "cpu", seed)
    rng = np.random.default_rng(seed)
    sentence = np.ones((clips, 1), dtype=bool)
    noun_columns = np.concatenate([(batch.pos_tags == TAG_NOUN).numpy(), sentence], axis=1)
    verb_columns = np.concatenate([(batch.pos_tags == TAG_VERB).numpy(), sentence], axis=1)
    trajectory_rows = batch.traj_mask.numpy()
    action_rows = np.arange(model.trajectories)[None, :].repeat(clips, axis=0) < model.action_queries
    rows = np.concatenate([trajectory_rows, action_rows])  # (G, N)
    columns = np.concatenate([noun_columns, verb_columns])  # (G, L + 1)
    costs = rng.random(rows.shape + columns.shape[1:]).astype(np.float32)
    return np.where(rows[:, :, None] & columns[:, None, :], costs, np.float32(np.nan))


def best_milliseconds(solve, costs: np.ndarray, number: int, repeat: int) -> float:
    return min(timeit.repeat(lambda: solve(costs), number=number, repeat=repeat)) / number * 1e3


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=96, help="clips per step (groups = 2 x clips)")
    parser.add_argument("--repeat", type=int, default=7, help="timing rounds; the best counts")
    args = parser.parse_args(argv)
    costs = step_costs(args.clips)
    if not np.array_equal(hungarian_on_host(costs), plain_hungarian(costs)):
        raise AssertionError("hungarian_on_host and the baseline disagree")
    rows = [("hungarian_on_host (model)", best_milliseconds(hungarian_on_host, costs, 10, args.repeat)),
            ("per-group cut-out (baseline)", best_milliseconds(plain_hungarian, costs, 10, args.repeat))]
    valid = np.isfinite(costs)
    print(f"{len(costs)} groups of {costs.shape[1]} x {costs.shape[2]}; valid rows per group "
          f"{valid.any(axis=2).sum(axis=1).mean():.1f}, valid columns {valid.any(axis=1).sum(axis=1).mean():.1f}")
    print("| method | ms per step | vs baseline |\n|---|---:|---:|")
    for name, milliseconds in rows:
        print(f"| {name} | {milliseconds:.2f} | {rows[1][1] / milliseconds:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
