"""SIG: an additive horizontal sinusoid over the whole image (Barni et al. 2019)."""

from __future__ import annotations

import math

import numpy as np
import torch

from forensics.attacks.base import Attack, Box, check_image, check_number, register


@register
class SIG(Attack):
    """Add ``delta * sin(2*pi*frequency*j/W)`` to every pixel in column ``j`` (all rows, all channels), clamp to [0, 1].

    Deterministic: the signal depends only on the image width, so ``seed`` has no effect.
    """

    name = "sig"

    def __init__(self, seed: int = 0, delta: float = 60.0 / 255.0, frequency: float = 6.0) -> None:
        delta = check_number(self.name, "delta", delta, 0.0, 1.0, lo_open=True)
        frequency = check_number(self.name, "frequency", frequency, 0.0, lo_open=True)
        super().__init__(seed=seed, delta=delta, frequency=frequency)
        self.delta, self.frequency = delta, frequency

    def signal(self, width: int) -> torch.Tensor:
        """The 1-D signal over columns, length ``width`` (float64)."""
        j = torch.arange(width, dtype=torch.float64)
        return self.delta * torch.sin(2.0 * math.pi * self.frequency * j / width)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Return the copy with the sinusoid added and None: the trigger covers the whole image."""
        check_image(image, self.name)
        sig = self.signal(image.shape[2]).to(device=image.device, dtype=image.dtype)
        return (image + sig[None, None, :]).clamp_(0.0, 1.0), None
