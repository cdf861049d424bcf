"""The GPU benchmark's CPU smoke mode: builds the tiny model, times every variant, prints the table."""

import gzip
import json
from types import SimpleNamespace

import pytest
import torch

from _bench import load_bench


def table_rows(output: str) -> list[str]:
    """The rows of the table the benchmark prints last (after its line of dashes)."""
    return output.split("\n\n")[-1].split("-\n")[-1].splitlines()


def test_smoke_mode_prints_every_variant(capsys):
    bench = load_bench("gpu_step")
    bench.main(["--eager", ",".join(bench.VARIANTS), "--profile", "full"])
    output = capsys.readouterr().out
    assert output.split("\n\n")[-1].startswith("batch: 2 clips x 4 frames per step (the CPU smoke test's)\n")
    rows = table_rows(output)
    names = [row[:44].strip() for row in rows]
    assert names == [variant.label for variant in bench.VARIANTS.values()]
    for row in rows:
        ms_per_step, clips_per_second, _, gflop = (float(v) for v in row[44:].split()[:4])
        assert ms_per_step > 0 and gflop > 0
        # 2 clips per step; both figures are printed to 0.1, so the step took ms_per_step +- 0.05 ms
        fastest, slowest = 2e3 / (ms_per_step - 0.05), 2e3 / (ms_per_step + 0.05)
        assert slowest - 0.05 <= clips_per_second <= fastest + 0.05
    assert "Hungarian matching on the host: median" in output  # timed on the steps with DOTA/STASP
    assert "profile of STOA-VLP full step" in output
    for label, counted in (("full step, bf16 residual", "full"), ("Trainer step (host batch, loss reads, clip)", "full"),
                           ("STOA video tower, bf16 residual", "tower")):
        assert f"{label}: FLOPs as counted on the {counted} step in this run (same model work)" in output


def test_unknown_variants_are_rejected():
    with pytest.raises(SystemExit, match="unknown variant"):
        load_bench("gpu_step").main(["--eager", "full,fast"])


def test_the_trainer_is_not_timed_in_a_compile_mode_it_does_not_use():
    bench = load_bench("gpu_step")
    with pytest.raises(SystemExit, match="Trainer's own torch.compile, in the default mode"):
        bench.main(["--compiled", "full,trainer", "--compile-mode", "reduce-overhead"])


def test_a_cpu_run_of_the_gpu_plan_says_what_it_skips(capsys):
    load_bench("gpu_step").main(["--eager", "", "--compiled", "full,full-lowp,trainer", "--profile", "full-lowp",
                                 "--sync-check"])
    output = capsys.readouterr().out
    assert ("compiled variants dropped on the CPU (the smoke test times eager steps only): full, full-lowp, trainer; "
            "this run checks nothing of them") in output
    assert "--sync-check skipped on the CPU" in output and "no variant to time" in output
    assert table_rows(output) == []


def test_a_batch_that_does_not_fit_is_an_error(capsys, monkeypatch):
    bench = load_bench("gpu_step")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "synthetic_batch", out_of_memory)
    with pytest.raises(SystemExit, match=r"no batch of \[3\] clips fits: the eager full step ran out of memory"):
        bench.main(["--clips", "3", "--eager", "full"])
    assert "3 clips per step do not fit" in capsys.readouterr().out


def test_synthetic_batch_is_well_formed():
    bench = load_bench("gpu_step")
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
    load_bench("gpu_step").main(["--eager", "full", "--profile", "full", "--out", str(tmp_path)])
    assert "Self CPU" in (tmp_path / "profile-full.txt").read_text()
    with gzip.open(tmp_path / "trace-full.json.gz", "rt") as file:
        trace = json.load(file)
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


def test_idle_gaps_merge_overlapping_kernels_and_skip_short_gaps():
    bench = load_bench("gpu_step")
    spans = [(50, 60), (0, 10), (5, 30), (32, 40), (100, 120), (110, 115)]
    assert bench.idle_gaps(spans, min_gap=5) == [(40, 50), (60, 100)]
    assert bench.idle_gaps(spans, min_gap=1) == [(30, 32), (40, 50), (60, 100)]


def test_idle_summary_names_what_the_host_did_while_the_device_waited():
    bench = load_bench("gpu_step")

    def event(name, start, end, device):
        kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=kind)

    events = [
        event("gemm", 0, 100, True), event("Memcpy DtoH", 100, 110, True), event("gemm", 510, 600, True),
        event("gemm", 640, 700, True),
        event("step", 0, 700, False), event("matched_columns", 105, 505, False),
        event("hungarian", 200, 480, False), event("optimizer", 605, 650, False),
    ]
    summary = bench.idle_summary(events, steps=1, min_gap_us=20)
    assert "device idle: 0.4 ms/step" in summary  # 400 us + 40 us
    lines = summary.splitlines()
    assert lines[2].split() == ["0.40", "hungarian"] and lines[3].split() == ["0.04", "optimizer"]
    assert "step > matched_columns > hungarian" in summary


def test_kernel_families_put_attention_and_fused_kernels_where_they_belong():
    """Memory-efficient attention kernels are CUTLASS ones and Inductor names kernels after the ops
    they fuse; both used to land in the wrong family (gemm, attention)."""
    bench = load_bench("gpu_step")
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32": 4.0, "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": 2.0,
             "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": 3.0, "cudnn_generated_fort_native_sdpa_sm90": 1.0,
             "triton_poi_fused__scaled_dot_product_efficient_attention_0": 0.5, "elementwise_kernel": 0.2}
    events = [SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA,
                              time_range=SimpleNamespace(elapsed_us=lambda ms=ms: ms * 1e3)) for name, ms in names.items()]
    summary = bench.kernel_summary(SimpleNamespace(events=lambda: events), steps=1, wall_seconds=0.02, top=3)
    families = {line.split()[0]: float(line.split()[-2]) for line in summary.splitlines()[1:5]}
    assert families == {"attention": 6.0, "gemm": 4.0, "triton": 0.5, "other": 0.2}


def test_variants_sharing_a_flop_count_do_the_same_work_and_checkpointing_adds_none(capsys):
    """Each variant counted in a run of its own: the counts a run shares (`Variant.flops_of`) are equal, and
    activation checkpointing's recomputed forward is left out."""
    bench = load_bench("gpu_step")
    flops = {}
    for checkpointing in ("false", "true"):
        for name in ("full", "full-lowp", "trainer", "tower", "tower-lowp"):
            bench.main(["--eager", name, "--compiled", "", "--set", f"model.grad_checkpointing={checkpointing}"])
            output = capsys.readouterr().out
            assert "FLOPs as counted on" not in output
            flops[name, checkpointing] = float(table_rows(output)[0][44:].split()[3])
    assert len({flops[name, checkpointing] for name in ("full", "full-lowp", "trainer")
                for checkpointing in ("false", "true")}) == 1
    assert flops["tower", "false"] == flops["tower-lowp", "false"] == flops["tower-lowp", "true"] > 0
