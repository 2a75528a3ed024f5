"""One projected gradient step, as every trigger optimiser here takes it (optimised patches, universal patches,
inverted mask + pattern triggers): descend, then clamp the optimised pixels back into [0, 1]."""

from __future__ import annotations

import torch


def clamped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, *pixels: torch.Tensor) -> None:
    """``zero_grad``, ``backward``, ``step``, then clamp each tensor in ``pixels`` to [0, 1] in place."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for tensor in pixels:
            tensor.clamp_(0.0, 1.0)
