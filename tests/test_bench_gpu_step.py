"""The GPU benchmark's CPU smoke mode: builds the tiny model, times every variant, prints the table."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def load_bench():
    path = Path(__file__).parent.parent / "bench" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_prints_every_variant(capsys):
    bench = load_bench()
    bench.main(["--profile", "full"])
    output = capsys.readouterr().out
    table = output.split("\n\n")[-1]
    rows = [line for line in table.splitlines() if line and not line.startswith(("what", "-"))]
    names = [row[:44].strip() for row in rows]
    assert names == [label for label, _ in bench.VARIANTS.values()]
    for row in rows:
        ms_per_step, clips_per_second, _, gflop = (float(v) for v in row[44:].split()[:4])
        assert ms_per_step > 0 and gflop > 0
        assert abs(clips_per_second - 2 / (ms_per_step / 1e3)) < 0.01 * clips_per_second + 0.1
    assert "Hungarian matching on the host: median" in output  # timed on the steps with DOTA/STASP
    assert "profile of STOA-VLP full step" in output


def test_unknown_variants_are_rejected():
    with pytest.raises(SystemExit, match="unknown variant"):
        load_bench().main(["--eager", "full,fast"])


def test_synthetic_batch_is_well_formed():
    bench = load_bench()
    from stoa_vlp.config import load_config

    config = load_config("tiny")
    batch = bench.synthetic_batch(config, 3, torch.device("cpu"))
    assert batch.frames.shape == (3, 4, 3, 64, 64)
    assert torch.all(batch.box_labels[~batch.box_mask] == 0) and torch.all(batch.box_labels[batch.box_mask] > 0)
    assert torch.all(batch.boxes[..., 2:] > batch.boxes[..., :2])
    ends = (batch.tokens == bench.EOT).int().argmax(1)
    assert torch.all(batch.text_mask.sum(1) == ends + 1)
    assert torch.all(batch.pos_tags[~batch.text_mask] == 0) and torch.all(batch.pos_tags[:, 0] == 0)


def test_profile_files_hold_the_op_table_and_a_chrome_trace(tmp_path):
    load_bench().main(["--eager", "full", "--profile", "full", "--out", str(tmp_path)])
    assert "Self CPU" in (tmp_path / "profile-full.txt").read_text()
    with gzip.open(tmp_path / "trace-full.json.gz", "rt") as file:
        trace = json.load(file)
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
