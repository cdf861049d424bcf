"""RoIAlign of the object tokens: the model's GEMM form against torchvision's `roi_align`, same run.

Times forward + backward of the regions of one `base` pre-training step (by default 96 clips x 12
frames, K=10 boxes per frame, 768 channels on the 14x14 patch grid, half the boxes real) under bf16
autocast, eager and compiled, for:
  - `ObjectTokens.regions` (the model): one batched matrix product per frame with bilinear weights;
  - the baseline, the model's earlier code: patch tokens to a (B*T, W, g, g) float32 map, then
    torchvision's `roi_align` (aligned, sampling ratio 2), whose backward scatters with atomic adds.
Both compute the same function (tests/test_model_behaviour.py). Each method's row is printed once it
is timed; a method that fails (a compile error, say) gets a row saying why, and the others still run.
On the CPU it runs a few frames, eager, as a smoke test.

    python bench/roi_align.py               # CUDA: base shapes; CPU: smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.ops import roi_align

from stoa_vlp.config import load_config
from stoa_vlp.model.objects import ROI_OUTPUT_SIZE, ROI_SAMPLES, ObjectTokens

sys.path.insert(0, str(Path(__file__).parent))
from gpu_step import median_seconds  # noqa: E402  (the same timing as the step benchmark)


def torchvision_regions(objects: ObjectTokens, patch_tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The baseline: (B*T, g*g, W), (B, T, K, 4) -> (B*T*K, s*s, W) through torchvision's roi_align."""
    frames, _, width = patch_tokens.shape
    patch_map = patch_tokens.transpose(1, 2).reshape(frames, width, objects.grid, objects.grid)
    frame_index = torch.arange(frames, device=boxes.device, dtype=torch.float32).repeat_interleave(boxes.shape[2])
    rois = torch.cat([frame_index[:, None], boxes.reshape(-1, 4).float()], dim=1)
    regions = roi_align(patch_map.float(), rois, ROI_OUTPUT_SIZE, spatial_scale=objects.spatial_scale,
                        sampling_ratio=ROI_SAMPLES, aligned=True)
    return regions.to(patch_tokens.dtype).flatten(2).transpose(1, 2)


def main(argv: list[str] | None = None) -> list[tuple[str, float | None]]:
    """(method, ms) in the order timed, the baseline first; ms is None where the method failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=0, help="clips (0: 96 on CUDA, 2 on the CPU)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    config = load_config("base").model
    clips = args.clips or (96 if on_gpu else 2)
    frames, slots, size = clips * config.frames, config.boxes_per_frame, config.image_size
    objects = ObjectTokens(config).to(device)
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(clips, config.frames, slots, 2, generator=generator) * size * 0.6
    boxes = torch.cat([corner, corner + torch.rand(corner.shape, generator=generator) * size * 0.4 + 4], dim=-1)
    boxes = boxes * (torch.rand(clips, config.frames, slots, 1, generator=generator) < 0.5)  # padded: empty boxes
    boxes = boxes.to(device)
    patch_tokens = torch.randn(frames, objects.grid**2, config.vision_width, device=device, requires_grad=True)
    grad_out = torch.randn(frames * slots, ROI_OUTPUT_SIZE**2, config.vision_width, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(regions_of):
        def run():
            with autocast:
                regions = regions_of(patch_tokens, boxes)
            (regions.float() * grad_out).sum().backward()
            patch_tokens.grad = None

        return run

    methods = {
        "torchvision roi_align (baseline)": lambda tokens, boxes: torchvision_regions(objects, tokens, boxes),
        "GEMM (model)": objects.regions,
    }
    if on_gpu and not args.no_compile:
        methods.update({f"{name}, compiled": torch.compile(fn) for name, fn in list(methods.items())})
    device_name = torch.cuda.get_device_name(device) if on_gpu else "CPU (smoke test)"
    print(f"device: {device_name}; torch {torch.__version__}; "
          f"{clips} clips x {config.frames} frames x {slots} boxes, {config.vision_width} channels, "
          f"{objects.grid}x{objects.grid} grid; bf16 autocast; forward + backward", flush=True)
    if not on_gpu:
        print("compiled methods skipped on the CPU (the smoke test is eager only)", flush=True)
    warmup, repeats = (3, 20) if on_gpu else (1, 3)
    print(f"{'method':42s} {'ms':>9s} {'vs baseline':>12s}", flush=True)
    results: list[tuple[str, float | None]] = []
    for name, fn in methods.items():
        try:
            ms = 1e3 * median_seconds(step(fn), device, warmup, repeats)
        except Exception as error:  # report and go on: one failing method must not hide the others
            results.append((name, None))
            why = str(error).partition("\n")[0][:300]
            print(f"{name:42s} failed with {type(error).__name__}: {why}", flush=True)
            continue
        results.append((name, ms))
        baseline = results[0][1]
        ratio = f"{baseline / ms:11.2f}x" if baseline else f"{'-':>12s}"
        print(f"{name:42s} {ms:9.3f} {ratio}", flush=True)
    return results


if __name__ == "__main__":
    main()
