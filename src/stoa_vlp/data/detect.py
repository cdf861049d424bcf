"""Run a torchvision object detector over videos and write the detections JSONL (README: Detections format).

The default detector is Faster R-CNN ResNet-50 FPN v2 with COCO's 91 categories; its weights come
from a local file (nothing is downloaded). Frames are sampled at a fixed rate with PyAV (or picked
from a frame folder, whose images were extracted at `frame_rate`), batched across videos, and boxes
are reported in pixels of the original frames.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

from stoa_vlp.data.decode import frame_folder_images, quarter_turns, read_frame_images, stream_origin
from stoa_vlp.data.detections import FrameDetections, VideoDetections
from stoa_vlp.data.jsonl import one_line

log = logging.getLogger(__name__)

# index -> COCO name; "__background__" and the "N/A" gaps are never reported
COCO_CATEGORIES: list[str] = list(FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])
NOT_A_CLASS = {"__background__", "N/A"}


@dataclass
class DetectSettings:
    fps: float = 1.0  # frames sampled per second of video
    batch_size: int = 8  # frames per detector call
    score_threshold: float = 0.3
    max_boxes: int = 50  # per frame
    min_size: int = 800  # the detector's own resize (torchvision GeneralizedRCNNTransform)
    max_size: int = 1333
    proposals: int = 1000  # region proposals per image kept for the box head (torchvision's default)
    frame_rate: float = 1.0  # frames per second at which frame folders were extracted


@dataclass
class DetectReport:
    videos: int = 0
    frames: int = 0
    boxes: int = 0
    failed: list[str] = field(default_factory=list)  # "path: reason"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a .pt/.pth file (a state dict, or a checkpoint holding one under "model") or
    a .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"detector weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # not a torch.save file, or cut short
        raise ValueError(f"{path}: not a readable PyTorch weights file ({type(error).__name__}); "
                         "expected a state dict saved with torch.save, or a .safetensors file") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def build_detector(weights: str | Path, settings: DetectSettings, device: torch.device) -> torch.nn.Module:
    """Faster R-CNN ResNet-50 FPN v2 with the weights of a local file, strictly loaded."""
    model = fasterrcnn_resnet50_fpn_v2(
        weights=None,
        weights_backbone=None,
        num_classes=len(COCO_CATEGORIES),
        box_score_thresh=settings.score_threshold,
        box_detections_per_img=settings.max_boxes,
        min_size=settings.min_size,
        max_size=settings.max_size,
        rpn_pre_nms_top_n_test=settings.proposals,
        rpn_post_nms_top_n_test=settings.proposals,
    )
    try:
        result = model.load_state_dict(load_state_dict(weights), strict=False)
    except RuntimeError as error:  # tensors of other shapes, e.g. a detector of another class count
        raise ValueError(f"{weights}: not Faster R-CNN ResNet-50 FPN v2 weights with {len(COCO_CATEGORIES)} COCO "
                         f"classes ({one_line(error)[:300]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights}: not Faster R-CNN ResNet-50 FPN v2 weights "
            f"({len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:3]}; "
            f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]})"
        )
    return model.eval().to(device)


SampledFrames = tuple[int, int, list[tuple[float, np.ndarray]]]  # width, height, [(time, RGB (H, W, 3) uint8)]


def sample_frames(path: Path, fps: float, frame_rate: float = 1.0) -> SampledFrames:
    """(width, height, [(time, RGB frame (H, W, 3) uint8)]): for each of 0, 1/fps, 2/fps, ... up to
    the last frame's time, the frame nearest to it (each frame at most once). Times are seconds from
    the stream's start, as decode_clip gives them; a frame folder's image i is at i / frame_rate."""
    if path.is_dir():
        return _sample_folder_frames(path, fps, frame_rate)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 25)
        origin, time_base = stream_origin(stream), float(stream.time_base)
        picked: list[tuple[float, np.ndarray]] = []
        previous = None  # (time, frame)
        step = 0
        for index, frame in enumerate(container.decode(stream)):
            stamp = frame.pts if frame.pts is not None else frame.dts
            time = (stamp - origin) * time_base if stamp is not None else index / rate  # the decoder's clock
            while time >= step / fps:
                target = step / fps
                best = previous if previous is not None and target - previous[0] < time - target else (time, frame)
                if not picked or best[0] != picked[-1][0]:
                    upright = np.rot90(best[1].to_ndarray(format="rgb24"), quarter_turns(best[1].rotation))
                    if picked and upright.shape != picked[0][1].shape:  # boxes are in one size of the video
                        raise ValueError(f"frames of different sizes: {picked[0][1].shape[1]}x{picked[0][1].shape[0]} "
                                         f"at the start, {upright.shape[1]}x{upright.shape[0]} at {best[0]:.2f} s")
                    picked.append((best[0], np.ascontiguousarray(upright)))
                step += 1
            previous = (time, frame)
    if not picked:
        raise ValueError("no frames decoded")
    height, width = picked[0][1].shape[:2]  # upright, as decode_clip gives frames and sizes
    return width, height, picked


def _sample_folder_frames(folder: Path, fps: float, frame_rate: float) -> SampledFrames:
    images = frame_folder_images(folder)
    if not images:
        raise ValueError("frame folder holds no images")
    times = np.arange(len(images)) / frame_rate
    targets = np.arange(0.0, times[-1] + 1e-9, 1.0 / fps)  # 0, 1/fps, ... up to the last frame's time
    nearest = np.unique(np.abs(times[None, :] - targets[:, None]).argmin(axis=1))  # the first of a tie
    pixels = read_frame_images(folder, [images[index] for index in nearest])  # (N, H, W, 3)
    height, width = pixels.shape[1:3]
    return width, height, [(float(times[index]), image) for index, image in zip(nearest, pixels)]


@torch.inference_mode()
def _detect_batch(model: torch.nn.Module, images: list[np.ndarray], device: torch.device) -> list[FrameDetections]:
    """Detections of `images` in order. Frames of one size go to the detector together: torchvision
    pads a batch to its largest image, which would change a smaller frame's detections."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(index)
    results: list[FrameDetections | None] = [None] * len(images)
    for indices in by_size.values():
        for index, detections in zip(indices, _detect_same_size(model, [images[i] for i in indices], device)):
            results[index] = detections
    return results


def _detect_same_size(model: torch.nn.Module, images: list[np.ndarray], device: torch.device) -> list[FrameDetections]:
    tensors = [torch.from_numpy(image).to(device).permute(2, 0, 1).float().div_(255) for image in images]
    results = []
    for output in model(tensors):
        names = [COCO_CATEGORIES[label] for label in output["labels"].tolist()]  # one read, not one per box
        keep = [name not in NOT_A_CLASS for name in names]
        keep_index = torch.tensor(keep, dtype=torch.bool, device=output["labels"].device)
        results.append(
            FrameDetections(
                time=0.0,
                classes=[name for name, kept in zip(names, keep) if kept],
                rects=output["boxes"][keep_index].float().cpu().numpy().reshape(-1, 4),
                confs=output["scores"][keep_index].float().cpu().numpy(),
            )
        )
    return results


def detect_videos(
    videos_to_detect: list[tuple[str, str]],
    model: torch.nn.Module,
    settings: DetectSettings,
    device: torch.device,
    report: DetectReport,
) -> Iterator[VideoDetections]:
    """Detections per readable (video id, video file or frame folder), in input order; unreadable videos are logged and counted.
    Frames of consecutive videos share detector batches."""
    videos: dict[int, VideoDetections | None] = {}  # slot -> detections being filled (None: skipped)
    remaining: dict[int, int] = {}  # slot -> frames still to detect
    pending: list[tuple[int, int, np.ndarray]] = []  # (video slot, frame slot, image)
    next_out = 0

    def run_pending() -> None:
        results = _detect_batch(model, [image for _, _, image in pending], device)
        for (slot, frame_slot, _), result in zip(pending, results):
            frame = videos[slot].frames[frame_slot]
            frame.classes, frame.rects, frame.confs = result.classes, result.rects, result.confs
            remaining[slot] -= 1
        pending.clear()

    def finished() -> Iterator[VideoDetections]:
        nonlocal next_out
        while remaining.get(next_out) == 0:
            video = videos.pop(next_out)
            del remaining[next_out]
            next_out += 1
            if video is not None:
                report.videos += 1
                report.frames += len(video.frames)
                report.boxes += sum(len(frame.classes) for frame in video.frames)
                yield video

    for slot, (video_id, path) in enumerate(videos_to_detect):
        path = Path(path)
        try:
            width, height, frames = sample_frames(path, settings.fps, settings.frame_rate)
        except (av.error.FFmpegError, OSError, ValueError) as error:
            log.warning("skipping %s: %s", path, error)
            report.failed.append(f"{path}: {error}")
            videos[slot], remaining[slot] = None, 0
            yield from finished()
            continue
        empty = [FrameDetections(time, [], np.zeros((0, 4), np.float32), np.zeros(0, np.float32)) for time, _ in frames]
        videos[slot], remaining[slot] = VideoDetections(video_id, width, height, empty), len(frames)
        for frame_slot, (_, image) in enumerate(frames):
            pending.append((slot, frame_slot, image))
            if len(pending) == settings.batch_size:
                run_pending()
                yield from finished()
    if pending:
        run_pending()
    yield from finished()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
