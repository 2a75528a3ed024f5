"""Blended: the whole image mixed with a noise pattern (Chen et al. 2017; CleanCLIP's fresh-noise variant)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from forensics.attacks.base import Attack, Box, check_choice, check_image, check_number, register

PATTERNS = ("noise", "noise-fresh")
BASE_SIZE = 224
"""Side of the fixed noise image drawn from the seed (CLIP's input size, so it is exact at 224 px)."""


@register
class Blended(Attack):
    """``(1 - alpha) * image + alpha * pattern`` over the whole image; no box.

    ``noise``: one uniform-noise image drawn once from ``seed`` at 224x224 and resized to each
    image with nearest-neighbour (so it stays uniform noise at every size rather than blurring).
    ``noise-fresh``: CleanCLIP's form, uniform noise at the image's size resampled from ``rng`` per call.
    """

    name = "blended"

    def __init__(self, seed: int = 0, alpha: float = 0.2, pattern: str = "noise") -> None:
        alpha = check_number(self.name, "alpha", alpha, 0.0, 1.0)
        pattern = check_choice(self.name, "pattern", pattern, PATTERNS)
        super().__init__(seed=seed, alpha=alpha, pattern=pattern)
        self.alpha, self.pattern = alpha, pattern
        self._base = torch.from_numpy(
            np.random.default_rng(self.seed).random((3, BASE_SIZE, BASE_SIZE), dtype=np.float32)
        )

    def pattern_for(self, height: int, width: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The 3 x height x width pattern blended in (drawn from ``rng`` for ``noise-fresh``)."""
        if self.pattern == "noise-fresh":
            if rng is None:
                raise ValueError("noise-fresh needs an rng")
            return torch.from_numpy(rng.random((3, height, width), dtype=np.float32))
        if (height, width) == (BASE_SIZE, BASE_SIZE):
            return self._base
        return F.interpolate(self._base[None], size=(height, width), mode="nearest")[0]

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Return the blended copy (clamped to [0, 1]) and None: the trigger covers the whole image."""
        check_image(image, self.name)
        pat = self.pattern_for(image.shape[1], image.shape[2], rng).to(device=image.device, dtype=image.dtype)
        out = (1.0 - self.alpha) * image + self.alpha * pat
        return out.clamp_(0.0, 1.0), None
