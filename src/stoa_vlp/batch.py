"""The training batch: what the data pipeline produces and the model and objectives consume.

Shapes: B clips, T frames, K boxes per frame, N trajectory categories, L text tokens.
Boxes are (x0, y0, x1, y1) in pixels of the model's input frame (after resize and crop).
Label id 0 is padding everywhere; masks are True where an entry is real.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

TAG_NONE, TAG_NOUN, TAG_VERB = 0, 1, 2


@dataclass
class Batch:
    frames: torch.Tensor  # (B, T, 3, H, W) uint8 RGB, or float CLIP-normalised (the model normalises uint8)
    boxes: torch.Tensor  # (B, T, K, 4) float, input-frame pixels
    box_labels: torch.Tensor  # (B, T, K) long, 0 = padding
    box_mask: torch.Tensor  # (B, T, K) bool
    traj_labels: torch.Tensor  # (B, N) long, top-N categories by summed confidence, 0 = padding
    traj_mask: torch.Tensor  # (B, N) bool
    tokens: torch.Tensor  # (B, L) long, CLIP BPE with start/end tokens, 0-padded
    text_mask: torch.Tensor  # (B, L) bool
    pos_tags: torch.Tensor  # (B, L) long, TAG_NONE / TAG_NOUN / TAG_VERB per BPE token
    video_index: torch.Tensor  # (B,) long, equal for captions of the same video (positives in VTC)
    video_ids: list[str]  # (B,) the dataset's video ids, for logs and error messages

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def map_tensors(self, function) -> "Batch":
        """A copy with `function` applied to every tensor field."""
        return replace(self, **{name: function(tensor) for name, tensor in self.tensors().items()})

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the CUDA caching allocator that every tensor, made on another stream, is used on `stream`:
        their memory is then not reused before the work queued there has read them."""
        for tensor in self.tensors().values():
            tensor.record_stream(stream)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self.map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, which DataLoader(pin_memory=True) asks of a batch type it does not know:
        without this method it passed the Batch on unpinned, so `to(device, non_blocking=True)` could
        not overlap the copy with the step."""
        return self.map_tensors(torch.Tensor.pin_memory)

    def select(self, rows: list[int]) -> "Batch":
        """The batch of `rows` only, in that order."""
        index = torch.tensor(rows, dtype=torch.long)
        picked = self.map_tensors(lambda tensor: tensor[index.to(tensor.device)])
        return replace(picked, video_ids=[self.video_ids[row] for row in rows])

    def __len__(self) -> int:
        return self.tokens.shape[0]
