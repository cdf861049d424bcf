"""The fusion passes of several objectives run as one batch.

VTM (3B bidirectional pairs), MLM (B bidirectional rows) and PLM (B prefix rows) all run the fusion
encoder over sequences of the same layout. Each objective describes its rows as `FusionRows`;
`fuse_together` stacks them, runs the encoder once with the mode chosen per row, and hands each
objective its slice of the output. One pass of 5B rows instead of five passes: fewer and larger
kernels, the same result per row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from stoa_vlp.model.stoa import FusionOutput, VideoFeatures
from stoa_vlp.objectives.distributed import map_tensor_fields


@dataclass
class FusionRows:
    video: VideoFeatures  # R rows
    text_tokens: torch.Tensor  # (R, L, E) fusion inputs at the text positions
    text_mask: torch.Tensor  # (R, L) bool
    prefix: bool  # prefix-LM mode (text sees only earlier text) instead of bidirectional


def concat_rows(parts: list):
    """Concatenate feature dataclasses of the same type along their batch dimension."""
    first = parts[0]
    names = [f.name for f in dataclasses.fields(first) if isinstance(getattr(first, f.name), torch.Tensor)]
    return dataclasses.replace(first, **{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


def fuse_rows(model, rows: FusionRows) -> FusionOutput:
    """One objective's rows through `model.fuse` on their own."""
    mode = "prefix" if rows.prefix else "bidirectional"
    return model.fuse(rows.video, rows.text_tokens, rows.text_mask, mode=mode)


def fuse_together(model, requests: list[FusionRows]) -> list[FusionOutput]:
    """One `model.fuse` call over the rows of every request; the output rows of each request, in order."""
    if len(requests) == 1:
        return [fuse_rows(model, requests[0])]
    prefix = torch.cat([rows.text_mask.new_full(rows.text_mask.shape[:1], rows.prefix) for rows in requests])
    fused = model.fuse(
        concat_rows([rows.video for rows in requests]),
        torch.cat([rows.text_tokens for rows in requests]),
        torch.cat([rows.text_mask for rows in requests]),
        mode=prefix,
    )
    outputs, start = [], 0
    for rows in requests:
        end = start + rows.text_mask.shape[0]
        outputs.append(map_tensor_fields(lambda tensor: tensor[start:end], fused))
        start = end
    return outputs
