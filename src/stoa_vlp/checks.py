"""Checks of tensor inputs that never make the host wait for the device.

`require(condition, message)`: a ValueError with `message` when the 0-d bool `condition` is false on
the CPU; on an accelerator an asynchronous device assert with the same message (reading the value
would be a host sync every step); nothing while torch.compile traces (a data-dependent branch would
break the graph).
"""

from __future__ import annotations

import torch


def require(condition: torch.Tensor, message: str) -> None:
    if torch.compiler.is_compiling():
        return
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)
