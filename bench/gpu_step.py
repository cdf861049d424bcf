"""Pre-training step speed: the full STOA-VLP step against a timm ViT-B/16 baseline, in one run.

On a CUDA device it builds the `base` model, sizes the batch to the card and times (CUDA events,
warm-up, median of at least 10 steps) each variant of VARIANTS chosen by --eager and --compiled:
  - the full pre-training step (all six objectives, bf16 autocast, fused AdamW), eager and compiled,
    and the step without some objectives (what the fusion objectives and the matching cost);
  - the project's video tower alone (forward + backward) on the same frames, the whole video side
    (objects and actions too) and the text tower;
  - timm's `vit_base_patch16_clip_224` (random init) forward + backward on the same frames, eager
    and compiled (the baseline);
  - the tower and the full step with a bf16 residual stream (`model.low_precision_residual`:
    tower-lowp, full-lowp), not timed unless named;
  - `trainer`: the Trainer's own step (`Trainer._train_step`, compiled by the Trainer itself with
    train.compile) on the full model, with what a run does beyond the bare step: the batch copied
    from pinned host memory, the gradient clipped, the update skipped on the device if anything is
    not finite, the step before read by the host (its losses, gradient norm and flags, in one
    transfer) and the LR scheduled; not timed unless named.
The frames are uint8, as the data pipeline gives them, and every variant (timm too) normalises them
on the device inside its step.
Model FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on an eager step without activation
checkpointing (its recomputed forward is work, not model FLOPs), counted once per run for the variants
doing the same work (full, full-lowp and trainer; tower and tower-lowp); MFU is measured against a
bf16 matrix product timed in the same run. --profile prints where the device time of a variant goes
(kernel families and top kernels, torch.profiler) and where the device idles (gaps between
kernels, named by the host ops running meanwhile); with --out also the op table and a gzipped
Chrome trace of the timeline; --sync-check lists the host syncs of an eager full step and of
the second of two eager Trainer steps (`torch.cuda.set_sync_debug_mode`); --compile-mode picks the
torch.compile mode of every compiled variant but `trainer`, which the Trainer compiles in the default
mode (so the two are refused together). The batch is the largest that fits unless --clips fixes it;
the table says which. On the CPU it runs the `tiny` configuration as an eager smoke test: compiled
variants and --sync-check are skipped, and it says so.

    python bench/gpu_step.py                 # CUDA: base model; CPU: tiny smoke test
    python bench/gpu_step.py --clips 16 --compiled '' --profile full --sync-check
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import os
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from stoa_vlp.batch import TAG_NOUN, TAG_VERB, Batch
from stoa_vlp.config import Config, load_config
from stoa_vlp.model import STOAVLP
from stoa_vlp.model.towers import CLIP_MEAN, CLIP_STD
from stoa_vlp.objectives import Pretrainer, matching
from stoa_vlp.train.loop import Trainer

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
        # uint8 and channels last, as the data pipeline collates them (the compiled step guards on strides)
        frames=torch.randint(0, 256, (clips, T, S, S, 3), dtype=torch.uint8, generator=g).permute(0, 1, 4, 2, 3),
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
    """Median time of one call of `fn` over `repeats` calls after `warmup`.

    On CUDA the calls run back to back as in a training loop (no host sync between them; a sync
    inside `fn` stays), each bracketed by CUDA events that are read once all have run.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(repeats):
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


def measure(name, fn, device, items, warmup, repeats, flops: float) -> Timing:
    """Median time of `fn`, which does `flops` model FLOPs per call."""
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
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (reduce-overhead); else a no-op
        with autocast():
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_step(config: Config, model: STOAVLP, batch: Batch, compiled: bool, run_dir: str):
    """One `Trainer._train_step` on `batch` (kept on the host, pinned on CUDA, as the DataLoader gives
    it), with the Trainer's own optimiser, schedule, precision, clipping and (with `compiled`) its
    torch.compile; `run_dir` is never written, since nothing here saves."""
    train = dataclasses.replace(config.train, compile=compiled, device=batch.frames.device.type, grad_accum=1)
    data = dataclasses.replace(config.data, batch_size=len(batch))
    trainer = Trainer(dataclasses.replace(config, train=train, data=data), Pretrainer(model, config.loss),
                      range(len(batch)), None, run_dir)
    host = batch.to("cpu")
    host = host.pin_memory() if torch.cuda.is_available() else host
    queued = None  # each step finishes the one before, as in Trainer.fit

    def step():
        nonlocal queued
        queued = trainer._train_step(iter([host]), queued)

    return step


def print_table(timings: list[Timing], peak: float, frames: int, batch_line: str) -> None:
    """The table of `timings`, under `batch_line`: the clips per step and how they were chosen."""
    print(f"batch: {batch_line}")
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


def tower_loss(model: STOAVLP, batch: Batch) -> torch.Tensor:
    """The CLIP video tower alone (ViT with its joint blocks): what timm's ViT is compared against."""
    return model.visual(batch.frames).frames.float().square().mean()


def encoder_loss(model: STOAVLP, batch: Batch) -> torch.Tensor:
    """The whole video side: tower, object tokens, trajectories and actions, every output in the loss."""
    video = model.encode_video(
        batch.frames, batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask
    )
    return sum(part.float().square().mean() for part in (video.frames, video.trajectories, video.actions))


def text_loss(model: STOAVLP, batch: Batch) -> torch.Tensor:
    """The text tower on the clean and the masked caption stacked (2B captions), as the step runs it."""
    tokens = torch.cat([batch.tokens, batch.tokens])
    return model.encode_text(tokens, torch.cat([batch.text_mask, batch.text_mask])).tokens.float().square().mean()


@dataclass(frozen=True)
class Variant:
    label: str  # table label
    run: object  # a loss of (model, batch); a dict of loss-weight overrides for the Pretrainer; None = timm
    model: tuple = ()  # model-config overrides, (name, value) pairs
    # the variant whose model FLOPs this one does too: variants naming the same one share the first count
    # of the run; "" = its own. A bf16 residual stream changes dtypes, not products, and the Trainer's
    # step does the full step's work (tests/test_bench_gpu_step.py checks both)
    flops_of: str = ""


LOW_PRECISION = (("low_precision_residual", True),)
VARIANTS = {
    "timm": Variant("timm vit_base_patch16_clip_224", None),
    "tower": Variant("STOA video tower (ViT + joint blocks)", tower_loss),
    "tower-lowp": Variant("STOA video tower, bf16 residual", tower_loss, LOW_PRECISION, flops_of="tower"),
    "encoder": Variant("STOA video side (+ objects, actions)", encoder_loss),
    "text": Variant("STOA text tower (2B captions)", text_loss),
    "no-fusion": Variant("step without VTM/MLM/PLM", {"vtm": 0.0, "mlm": 0.0, "plm": 0.0}),
    "no-align": Variant("step without DOTA/STASP", {"dota": 0.0, "stasp": 0.0}),
    "full": Variant("STOA-VLP full step (6 objectives)", {}),
    "full-lowp": Variant("full step, bf16 residual", {}, LOW_PRECISION, flops_of="full"),
    "trainer": Variant("Trainer step (host batch, loss reads, clip)", "trainer", flops_of="full"),
}
BATCH_SIZES = (96, 64, 48, 32, 16, 8, 4)  # tried in this order when --clips is 0
EAGER_DEFAULT = "timm,tower,encoder,text,no-fusion,no-align,full"
COMPILED_DEFAULT = "timm,tower,full"


def variant_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    return names


def kernel_summary(profiler, steps: int, wall_seconds: float, top: int) -> str:
    """Device time by kernel family and the top kernels, from a torch.profiler run of `steps` steps."""
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return "no device kernels recorded (CPU run)\n"
    # checked in this order: Inductor's kernels are named after the ops they fuse ("..._attention_..."),
    # and the memory-efficient attention kernels are CUTLASS ones (fmha_cutlass...)
    families = {"triton (compiled)": ("triton",), "attention": ("flash", "fmha", "attention", "sdpa"),
                "gemm": ("gemm", "xmma", "cutlass", "nvjet", "cublas")}
    per_family: dict[str, float] = {}
    per_kernel: dict[str, list[float]] = {}
    for event in kernels:
        micros = event.time_range.elapsed_us()
        lower = event.name.lower()
        family = next((f for f, keys in families.items() if any(k in lower for k in keys)), "other")
        family = "triton (compiled)" if lower.startswith("triton") else family
        per_family[family] = per_family.get(family, 0.0) + micros
        per_kernel.setdefault(event.name, []).append(micros)
    busy = sum(per_family.values()) / 1e3 / steps
    lines = [f"per step: wall {wall_seconds * 1e3 / steps:.1f} ms, device busy {busy:.1f} ms, "
             f"{len(kernels) / steps:.0f} kernels"]
    for family, micros in sorted(per_family.items(), key=lambda item: -item[1]):
        lines.append(f"  {family:20s} {micros / 1e3 / steps:8.1f} ms/step")
    lines.append(f"top {top} kernels (ms/step, calls/step):")
    ranked = sorted(per_kernel.items(), key=lambda item: -sum(item[1]))[:top]
    for name, times in ranked:
        lines.append(f"  {sum(times) / 1e3 / steps:8.2f} {len(times) // steps:5d}  {name[:110]}")
    return "\n".join(lines) + "\n"


def idle_gaps(spans: list[tuple[float, float]], min_gap: float) -> list[tuple[float, float]]:
    """The stretches of at least `min_gap` between the first start and the last end of `spans`
    ((start, end) pairs, e.g. kernels on any stream) that no span covers, in time order."""
    gaps, covered_until = [], None
    for start, end in sorted(spans):
        if covered_until is not None and start - covered_until >= min_gap:
            gaps.append((covered_until, start))
        covered_until = end if covered_until is None else max(covered_until, end)
    return gaps


def ops_running_at(starts: np.ndarray, ends: np.ndarray, names: list[str], moment: float) -> list[str]:
    """Names of the host ops whose span holds `moment`, outermost first."""
    holding = np.flatnonzero((starts <= moment) & (ends >= moment))
    return [names[i] for i in sorted(holding, key=lambda i: (starts[i], -ends[i]))]


def idle_summary(events, steps: int, min_gap_us: float = 20.0, top: int = 12) -> str:
    """Where the device idles: gaps between kernels (any stream) of at least `min_gap_us`, each named
    by the host ops running in its middle (what the CPU was doing while the GPU waited)."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    gaps = idle_gaps([(e.time_range.start, e.time_range.end) for e in device], min_gap_us)
    starts = np.array([e.time_range.start for e in host], dtype=np.float64)
    ends = np.array([e.time_range.end for e in host], dtype=np.float64)
    names = [e.name for e in host]
    total = sum(end - start for start, end in gaps)
    lines = [f"device idle: {total / 1e3 / steps:.1f} ms/step in gaps of at least {min_gap_us:.0f} us "
             f"({len(gaps) / steps:.0f} per step)"]
    by_op: dict[str, float] = {}
    largest = sorted(gaps, key=lambda gap: gap[0] - gap[1])
    for start, end in largest:
        running = ops_running_at(starts, ends, names, (start + end) / 2)
        innermost = running[-1] if running else "(no host op)"
        by_op[innermost] = by_op.get(innermost, 0.0) + end - start
    lines.append("  idle by the innermost host op running (ms/step):")
    for name, micros in sorted(by_op.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"    {micros / 1e3 / steps:7.2f}  {name[:100]}")
    lines.append("  largest gaps (ms; host ops, outermost first):")
    for start, end in largest[:top]:
        running = ops_running_at(starts, ends, names, (start + end) / 2)
        lines.append(f"    {(end - start) / 1e3:7.2f}  {' > '.join(name[:40] for name in running[-4:]) or '(no host op)'}")
    return "\n".join(lines) + "\n"


def profile_step(step, device: torch.device, steps: int = 3, top: int = 30, trace: str = "") -> tuple[str, str]:
    """(kernel summary, op table) of `steps` calls of `step` under torch.profiler; with `trace`, the
    timeline is also written there as a gzipped Chrome trace (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as profiler:
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - begin
    if trace:
        plain = trace.removesuffix(".gz")
        profiler.export_chrome_trace(plain)
        with open(plain, "rb") as raw, gzip.open(trace, "wb") as packed:
            shutil.copyfileobj(raw, packed)
        os.remove(plain)
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_key, row_limit=60, max_name_column_width=90)
    summary = kernel_summary(profiler, steps, wall, top)
    if device.type == "cuda":
        summary += idle_summary(profiler.events(), steps)
    return summary, table


def sync_report(step) -> list[str]:
    """Where one call of `step` synchronises with the device: `torch.cuda.set_sync_debug_mode` warnings."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
            if "called a synchronizing" in str(w.message)]


class HostMatchingClock:
    """Records the host time of every Hungarian matching call (`matching.hungarian_on_host`) while installed."""

    def __init__(self):
        self.seconds: list[float] = []
        self.solve = matching.hungarian_on_host

    def timed(self, costs):
        begin = time.perf_counter()
        pairs = self.solve(costs)
        self.seconds.append(time.perf_counter() - begin)
        return pairs

    def __enter__(self):
        self.seconds.clear()
        matching.hungarian_on_host = self.timed
        return self

    def __exit__(self, *exc):
        matching.hungarian_on_host = self.solve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=0,
                        help="clips per step (0: the largest of 96, 64, 48, ... whose eager full step fits)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager", default=EAGER_DEFAULT, help=f"variants timed eagerly, of {list(VARIANTS)}")
    parser.add_argument("--compiled", default=COMPILED_DEFAULT, help="variants timed under torch.compile ('' = none)")
    parser.add_argument("--no-compile", action="store_true", help="same as --compiled ''")
    parser.add_argument("--profile", default="", help="variants to profile (eager, and compiled when timed so)")
    parser.add_argument("--sync-check", action="store_true", help="list the host syncs of an eager full step and Trainer step")
    parser.add_argument("--out", default="", help="folder for the profiler op tables and timelines (.json.gz)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="keep SDPA off its cuDNN backend")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.joint_blocks=0")
    args = parser.parse_args(argv)
    eager_names, profiled = variant_names(args.eager), variant_names(args.profile)
    compiled_names = [] if args.no_compile else variant_names(args.compiled)
    if "trainer" in compiled_names and args.compile_mode != "default":
        raise SystemExit(f"--compiled trainer times the Trainer's own torch.compile, in the default mode: it "
                         f"cannot be timed with --compile-mode {args.compile_mode}; time trainer in another call")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    config = load_config("base" if on_gpu else "tiny", args.set)
    warmup, repeats = (3, max(args.repeats, 10)) if on_gpu else (0, 1)
    if compiled_names and not on_gpu:
        print(f"compiled variants dropped on the CPU (the smoke test times eager steps only): "
              f"{', '.join(compiled_names)}; this run checks nothing of them", flush=True)
        compiled_names = []
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else nullcontext
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(not args.no_cudnn_attention)

    peak = matmul_peak(device)
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'CPU (tiny smoke test)'}; "
          f"torch {torch.__version__}; measured bf16 matmul {peak / 1e12:.1f} TFLOP/s", flush=True)

    def build(name: str, clips: int, compiled: bool, counting: bool = False):
        """A zero-argument training step of variant `name`; `counting`: for FLOP counting, without
        activation checkpointing."""
        torch.manual_seed(0)
        batch = synthetic_batch(config, clips, device)
        if name == "timm":
            import timm

            frames = batch.frames.flatten(0, 1)  # (B*T, 3, H, W) uint8
            shape = {} if on_gpu else dict(img_size=config.model.image_size, depth=2, embed_dim=64, num_heads=2)
            vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, **shape).to(device)
            mean, std = (torch.tensor(values, device=device).view(3, 1, 1) for values in (CLIP_MEAN, CLIP_STD))

            def timm_forward(pixels: torch.Tensor) -> torch.Tensor:
                """timm's ViT on the frames normalised on the device, as the video tower does it."""
                return vit(pixels.to(torch.float32).mul(1.0 / 255).sub(mean).div(std))

            runner = torch.compile(timm_forward, mode=args.compile_mode) if compiled else timm_forward
            return make_train_step(
                lambda: runner(frames).float().square().mean(), [{"params": list(vit.parameters())}], autocast
            )
        variant = VARIANTS[name]
        model_config = dataclasses.replace(config.model, **dict(variant.model))
        if counting:
            model_config = dataclasses.replace(model_config, grad_checkpointing=False)
        model = STOAVLP(model_config).to(device)
        what = variant.run
        if what == "trainer":
            return trainer_step(dataclasses.replace(config, model=model_config), model, batch, compiled, args.out or ".")
        if isinstance(what, dict):
            pretrainer = Pretrainer(model, dataclasses.replace(config.loss, **what)).to(device)
            runner = torch.compile(pretrainer, mode=args.compile_mode) if compiled else pretrainer
            return make_train_step(lambda: runner(batch)["loss"], model.param_groups(1e-5, 0.01, 0.2), autocast)
        loss = torch.compile(what, mode=args.compile_mode) if compiled else what
        trainable = [p for p in model.parameters() if p.requires_grad]
        return make_train_step(lambda: loss(model, batch), [{"params": trainable}], autocast)

    if args.clips:
        candidates, chosen = [args.clips], "fixed by --clips"
    elif on_gpu:
        candidates, chosen = BATCH_SIZES, f"chosen automatically: the largest of {BATCH_SIZES} that fits"
    else:
        candidates, chosen = [2], "the CPU smoke test's"
    for clips in candidates:
        try:
            build("full", clips, False)()
            break
        except torch.OutOfMemoryError:
            print(f"{clips} clips per step do not fit (eager full step out of memory)", flush=True)
        gc.collect()  # the failed step's activations, held by the exception's traceback until here
        torch.cuda.empty_cache()
    else:
        raise SystemExit(f"no batch of {list(candidates)} clips fits: the eager full step ran out of memory")
    batch_line = f"{clips} clips x {config.model.frames} frames per step ({chosen})"
    print(f"config: {'base' if on_gpu else 'tiny'} {args.set}; {batch_line}; "
          f"SDPA cuDNN backend {'off' if args.no_cudnn_attention else 'allowed'}", flush=True)

    if args.sync_check and not on_gpu:
        print("--sync-check skipped on the CPU: it lists CUDA host syncs (torch.cuda.set_sync_debug_mode)",
              flush=True)
    if args.sync_check and on_gpu:
        for name in ("full", "trainer"):
            step = build(name, clips, False)
            step()  # a Trainer step reads the one before it: the second step is checked
            syncs = sync_report(step)
            print(f"host syncs in an eager {name} step: {len(syncs)}", *syncs, sep="\n  ", flush=True)
            step = None

    timings: list[Timing] = []
    # model FLOPs per step by the variant named in `flops_of` (or the variant itself), with the one counted
    counts: dict[str, tuple[str, float]] = {}
    for compiled, names in ((False, eager_names), (True, compiled_names)):
        for name in names:
            step = None  # the last variant's model and optimiser go before the next is built
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            label = VARIANTS[name].label + (", compiled" if compiled else "")
            began = time.perf_counter()
            work = VARIANTS[name].flops_of or name
            if work in counts and counts[work][0] != name:
                print(f"{label}: FLOPs as counted on the {counts[work][0]} step in this run (same model work)",
                      flush=True)
            try:
                if work not in counts and (compiled or config.model.grad_checkpointing):
                    counts[work] = name, count_flops(build(name, clips, False, counting=True))
                    if on_gpu:
                        torch.cuda.empty_cache()
                step = build(name, clips, compiled)
                if work not in counts:
                    counts[work] = name, count_flops(step)
                with HostMatchingClock() as clock:
                    done = measure(label, step, device, clips, warmup, repeats, counts[work][1])
                timings.append(done)
                print(f"{label}: {done.seconds * 1e3:.1f} ms/step, MFU {done.flops / done.seconds / peak:.1%}, "
                      f"{done.flops / 1e12:.1f} TFLOP/step, peak {done.peak_bytes / 2**30:.1f} GiB "
                      f"({time.perf_counter() - began:.0f} s to build and time)", flush=True)
                if clock.seconds:
                    host = statistics.median(clock.seconds)
                    print(f"  Hungarian matching on the host: median {host * 1e3:.2f} ms per call, "
                          f"{host / done.seconds:.1%} of the step", flush=True)
                if name in profiled:
                    tag = name + ("-compiled" if compiled else "")
                    trace = f"{args.out}/trace-{tag}.json.gz" if args.out else ""
                    summary, table = profile_step(step, device, trace=trace)
                    print(f"profile of {label}:\n{summary}", flush=True)
                    if args.out:
                        with open(f"{args.out}/profile-{tag}.txt", "w") as file:
                            file.write(summary + "\n" + table)
            except Exception as error:  # report and go on: one failing variant must not hide the others
                print(f"{label}: failed with {type(error).__name__}: {error}", flush=True)
            if on_gpu:
                torch.cuda.empty_cache()
    if not (eager_names or compiled_names):
        print("no variant to time", flush=True)
    print()
    print_table(timings, peak, config.model.frames, batch_line)


if __name__ == "__main__":
    main()
