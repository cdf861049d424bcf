"""Pre-training step speed: the full STOA-VLP step against a timm ViT-B/16 baseline, in one run.

On a CUDA device it builds the `base` model, sizes the batch to the card and times (CUDA events,
warm-up, median of at least 10 steps):
  - the full pre-training step (all six objectives, bf16 autocast, fused AdamW), eager and compiled;
  - the project's video tower alone (forward + backward) on the same frames, eager and compiled;
  - timm's `vit_base_patch16_clip_224` (random init) forward + backward on the same frames, eager
    and compiled (the baseline);
  - the Hungarian matching with its host transfer, as a share of the step.
Model FLOPs come from `torch.utils.flop_counter.FlopCounterMode`; MFU is measured against a bf16
matrix product timed in the same run. On the CPU it runs the `tiny` configuration as a smoke test.

    python bench/gpu_step.py                 # CUDA: base model; CPU: tiny smoke test
    python bench/gpu_step.py --clips 16 --no-compile
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from stoa_vlp.batch import TAG_NOUN, TAG_VERB, Batch
from stoa_vlp.config import Config, load_config
from stoa_vlp.model import STOAVLP
from stoa_vlp.objectives import Pretrainer

SOT, EOT = 49406, 49407


def synthetic_batch(config: Config, clips: int, device: torch.device, seed: int = 0) -> Batch:
    """A random batch with the shapes and padding patterns of real data (half the boxes present)."""
    m = config.model
    g = torch.Generator().manual_seed(seed)
    T, K, N, L, S = m.frames, m.boxes_per_frame, m.trajectories, m.text_len, m.image_size
    corner = torch.rand(clips, T, K, 2, generator=g) * (S * 0.6)
    size = torch.rand(clips, T, K, 2, generator=g) * (S * 0.4) + 4
    boxes = torch.cat([corner, corner + size], dim=-1)
    box_mask = torch.rand(clips, T, K, generator=g) < 0.5
    classes = min(N, m.num_object_classes - 1)
    box_labels = torch.randint(1, classes + 1, (clips, T, K), generator=g) * box_mask
    traj_labels = torch.arange(1, N + 1).clamp(max=classes).expand(clips, N).clone()
    traj_mask = torch.arange(N).expand(clips, N) < classes
    traj_labels = traj_labels * traj_mask
    lengths = torch.randint(L // 2, L + 1, (clips,), generator=g)
    positions = torch.arange(L).expand(clips, L)
    tokens = torch.randint(1, 49000, (clips, L), generator=g)
    tokens[:, 0] = SOT
    tokens[positions == (lengths - 1).unsqueeze(1)] = EOT
    text_mask = positions < lengths.unsqueeze(1)
    tokens = tokens * text_mask
    tags = torch.randint(0, 3, (clips, L), generator=g)
    tags = torch.where(tags == 1, TAG_NOUN, torch.where(tags == 2, TAG_VERB, 0))
    tags = tags * text_mask * (positions > 0) * (tokens != EOT)
    batch = Batch(
        frames=torch.randn(clips, T, 3, S, S, generator=g),
        boxes=boxes,
        box_labels=box_labels,
        box_mask=box_mask,
        traj_labels=traj_labels,
        traj_mask=traj_mask,
        tokens=tokens,
        text_mask=text_mask,
        pos_tags=tags,
        video_index=torch.arange(clips),
        video_ids=[f"clip{i}" for i in range(clips)],
    )
    return batch.to(device)


@dataclass
class Timing:
    name: str
    seconds: float  # median per call
    flops: float  # model FLOPs per call
    items: int  # clips per call
    peak_bytes: int


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device) -> float:
    """Measured bf16 matrix-product rate (FLOP/s) on random data."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / seconds


def measure(name, fn, device, items, warmup, repeats, flops: float | None = None) -> Timing:
    """Median time of `fn`; its FLOPs are counted on this call unless given (compiled variants reuse eager counts)."""
    flops = count_flops(fn) if flops is None else flops
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(fn, device, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return Timing(name, seconds, flops, items, peak)


def make_train_step(loss_of, parameters, autocast):
    """One optimiser step: forward under autocast, backward, fused AdamW (on CUDA)."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=parameters[0]["params"][0].is_cuda)

    def step():
        with autocast():
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def print_table(timings: list[Timing], peak: float, frames: int) -> None:
    header = (
        f"{'what':44s} {'ms/step':>9s} {'clips/s':>9s} {'frames/s':>9s} {'GFLOP':>10s} "
        f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s}"
    )
    print(header)
    print("-" * len(header))
    for t in timings:
        achieved = t.flops / t.seconds
        print(
            f"{t.name:44s} {t.seconds * 1e3:9.1f} {t.items / t.seconds:9.1f} "
            f"{t.items * frames / t.seconds:9.1f} {t.flops / 1e9:10.1f} "
            f"{achieved / 1e12:8.1f} {achieved / peak:6.1%} {t.peak_bytes / 2**30:8.1f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=0, help="clips per step (0: largest of 64, 32, 16, ... that fits)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.joint_blocks=0")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    config = load_config("base" if on_gpu else "tiny", args.set)
    warmup, repeats = (3, max(args.repeats, 10)) if on_gpu else (0, 1)
    compile_too = on_gpu and not args.no_compile
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else nullcontext
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    peak = matmul_peak(device)
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'CPU (tiny smoke test)'}; "
          f"torch {torch.__version__}; measured bf16 matmul {peak / 1e12:.1f} TFLOP/s", flush=True)

    def pretrain_step(clips: int, compiled: bool, loss_overrides: dict[str, float]):
        torch.manual_seed(0)
        batch = synthetic_batch(config, clips, device)
        model = STOAVLP(config.model).to(device)
        loss_config = dataclasses.replace(config.loss, **loss_overrides)
        pretrainer = Pretrainer(model, loss_config).to(device)
        runner = torch.compile(pretrainer) if compiled else pretrainer
        return make_train_step(lambda: runner(batch)["loss"], model.param_groups(1e-5, 0.01, 0.2), autocast)

    def tower_step(clips: int, compiled: bool):
        torch.manual_seed(0)
        batch = synthetic_batch(config, clips, device)
        model = STOAVLP(config.model).to(device)
        encode = torch.compile(model.encode_video) if compiled else model.encode_video
        boxes = (batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return make_train_step(
            lambda: encode(batch.frames, *boxes).frames.float().square().mean(), [{"params": trainable}], autocast
        )

    def timm_step(clips: int, compiled: bool):
        import timm

        torch.manual_seed(0)
        frames = synthetic_batch(config, clips, device).frames.flatten(0, 1)  # (B*T, 3, H, W)
        shape = {} if on_gpu else dict(img_size=config.model.image_size, depth=2, embed_dim=64, num_heads=2)
        vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, **shape).to(device)
        runner = torch.compile(vit) if compiled else vit
        return make_train_step(
            lambda: runner(frames).float().square().mean(), [{"params": list(vit.parameters())}], autocast
        )

    clips = args.clips or (2 if not on_gpu else 0)
    candidates = [clips] if clips else [48, 32, 16, 8, 4]
    for clips in candidates:
        try:
            pretrain_step(clips, False, {})()
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{clips} clips per step do not fit; trying fewer", flush=True)
    print(f"config: {'base' if on_gpu else 'tiny'} {args.set}; {clips} clips x {config.model.frames} frames per step",
          flush=True)

    # (name, builder, also compiled?)
    variants = [
        ("timm vit_base_patch16_clip_224", lambda c: timm_step(clips, c), True),
        ("STOA video encoder", lambda c: tower_step(clips, c), True),
        ("STOA-VLP step without DOTA/STASP", lambda c: pretrain_step(clips, c, {"dota": 0.0, "stasp": 0.0}), False),
        ("STOA-VLP full step (6 objectives)", lambda c: pretrain_step(clips, c, {}), True),
    ]
    timings: list[Timing] = []
    eager_flops: dict[str, float] = {}
    for compiled in (False, True) if compile_too else (False,):
        for name, build, compile_it in variants:
            if compiled and not compile_it:
                continue
            label = name + (" (compiled)" if compiled else "")
            try:
                timings.append(measure(label, build(compiled), device, clips, warmup, repeats, eager_flops.get(name)))
                eager_flops.setdefault(name, timings[-1].flops)
            except Exception as error:  # report and go on: one failing variant must not hide the others
                print(f"{label}: failed with {type(error).__name__}: {error}", flush=True)
                continue
            print(f"{label}: {timings[-1].seconds * 1e3:.1f} ms/step", flush=True)
            if on_gpu:
                torch.cuda.empty_cache()
    print()
    print_table(timings, peak, config.model.frames)


if __name__ == "__main__":
    main()
