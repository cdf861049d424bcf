"""The matching benchmark's baseline gives the model's pairs, and its smoke run prints its table."""

import numpy as np
import pytest

from _bench import load_bench
from stoa_vlp.objectives.matching import hungarian_on_host


def test_hungarian_gives_the_pairs_of_each_cut_out_submatrix():
    bench = load_bench("matching")
    rng = np.random.default_rng(1)
    for trial in range(200):
        groups, rows, columns = rng.integers(1, 6), rng.integers(1, 22), rng.integers(1, 34)
        costs = rng.random((groups, rows, columns)).astype(np.float32)
        for group in range(groups):  # any pattern of valid rows and columns, empty groups included
            costs[group][rng.random(rows) < rng.random()] = np.nan
            costs[group][:, rng.random(columns) < rng.random()] = np.nan
        np.testing.assert_array_equal(hungarian_on_host(costs), bench.plain_hungarian(costs), err_msg=f"trial {trial}")


def test_smoke_run_prints_both_methods(capsys):
    rows = load_bench("matching").main(["--clips", "4", "--repeat", "1"])
    assert [name for name, _ in rows] == ["hungarian_on_host (model)", "per-group cut-out (baseline)"]
    printed = capsys.readouterr().out
    assert printed.startswith("8 groups of 20 x 33") and "| per-group cut-out (baseline) |" in printed


def test_a_nan_inside_a_valid_submatrix_is_refused_like_the_baseline():
    bench = load_bench("matching")
    costs = np.random.default_rng(2).random((2, 3, 4))
    costs[1, 1, 2] = np.nan  # row 1 and column 2 keep other finite entries: still valid
    for solve in (hungarian_on_host, bench.plain_hungarian):
        with pytest.raises(ValueError, match="invalid numeric entries"):
            solve(costs)
