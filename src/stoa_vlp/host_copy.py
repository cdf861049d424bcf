"""Copies from the device to the host that do not make the host wait for the device."""

from __future__ import annotations

import torch


def start_copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(host tensor, event): on CUDA, a pinned copy queued behind the work that computes `tensor`, and
    the event recorded after it; the host tensor must not be read before the event has completed.
    Elsewhere a plain copy (no event)."""
    if tensor.device.type != "cuda":
        return tensor.cpu(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensor.device))  # the copy's stream, whatever the current device
    return host, done
