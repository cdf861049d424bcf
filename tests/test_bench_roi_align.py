"""The RoIAlign benchmark's CPU smoke mode, and its baseline computing the model's function."""

import torch

from _bench import load_bench
from stoa_vlp.config import load_config
from stoa_vlp.model.objects import ObjectTokens


def test_smoke_mode_times_both_methods(capsys):
    results = load_bench("roi_align").main(["--clips", "1"])
    assert [name for name, _ in results] == ["torchvision roi_align (baseline)", "GEMM (model)"]
    assert all(ms > 0 for _, ms in results)
    output = capsys.readouterr().out
    assert "vs baseline" in output and "compiled methods skipped on the CPU" in output


def test_a_failing_method_gets_its_row_and_the_others_still_run(capsys, monkeypatch):
    bench = load_bench("roi_align")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this\nsecond line")

    monkeypatch.setattr(bench, "roi_align", broken)
    results = bench.main(["--clips", "1"])
    assert results[0] == ("torchvision roi_align (baseline)", None)
    assert results[1][0] == "GEMM (model)" and results[1][1] > 0
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].split(None, 3)[3] == "failed with RuntimeError: no kernel for this"
    assert rows[1].startswith("GEMM (model)") and rows[1].endswith("-")  # no baseline to compare with


def test_baseline_is_the_models_function():
    config = load_config("tiny").model
    objects = ObjectTokens(config)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2 * config.frames, objects.grid**2, config.vision_width, generator=generator)
    corner = torch.rand(2, config.frames, config.boxes_per_frame, 2, generator=generator) * config.image_size
    boxes = torch.cat([corner, corner + 8], dim=-1)
    expected = objects.regions(tokens, boxes)
    torch.testing.assert_close(load_bench("roi_align").torchvision_regions(objects, tokens, boxes), expected, atol=1e-5, rtol=1e-5)
