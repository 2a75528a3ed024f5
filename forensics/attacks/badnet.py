"""BadNet: a small square patch pasted onto the image (Gu et al. 2017; CleanCLIP's noise variant)."""

from __future__ import annotations

import numpy as np
import torch

from forensics.attacks.base import POSITIONS, Attack, Box, patch_box, patch_side, register
from forensics.core.checks import check_choice, check_image, check_int, check_number

PATTERNS = ("checkerboard", "noise")


@register
class BadNet(Attack):
    """Paste a square patch whose side is ``size`` times the shorter image side.

    ``checkerboard`` is the classic fixed trigger: ``cells`` x ``cells`` black/white squares (top-left
    cell white), scaled to the patch with nearest-neighbour. ``noise`` is CleanCLIP's variant:
    per image, each patch pixel is the image's channel mean plus Gaussian noise of std ``noise_std``
    (CleanCLIP uses 1.0, so most pixels saturate), drawn from ``rng`` and clamped to [0, 1].
    ``position`` ``random`` draws the corner from ``rng`` with the patch fully inside the image;
    fixed corners sit ``margin`` pixels from the borders. Only pixels inside the box change. Neither
    pattern needs a fixed random draw, so ``seed`` has no effect here.
    """

    name = "badnet"

    def __init__(
        self,
        seed: int = 0,
        size: float = 0.1,
        pattern: str = "checkerboard",
        position: str = "random",
        margin: int = 0,
        cells: int = 4,
        noise_std: float = 1.0,
    ) -> None:
        who = self.name
        size = check_number(who, "size", size, 0.0, 1.0, lo_open=True)
        pattern = check_choice(who, "pattern", pattern, PATTERNS)
        position = check_choice(who, "position", position, POSITIONS)
        margin = check_int(who, "margin", margin, lo=0)
        cells = check_int(who, "cells", cells, lo=1)
        noise_std = check_number(who, "noise_std", noise_std, 0.0)
        super().__init__(
            seed=seed, size=size, pattern=pattern, position=position, margin=margin, cells=cells, noise_std=noise_std
        )
        self.size, self.pattern, self.position = size, pattern, position
        self.margin, self.cells, self.noise_std = margin, cells, noise_std

    def checkerboard(self, side: int) -> torch.Tensor:
        """The fixed 3 x side x side black/white checkerboard (nearest-neighbour scaled cells)."""
        idx = (torch.arange(side) * self.cells) // side  # which cell each pixel row/column falls in
        board = ((idx[:, None] + idx[None, :]) % 2 == 0).to(torch.float32)
        return board.expand(3, side, side)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Return a copy with the patch pasted, and the patch box."""
        check_image(image, self.name)
        _, h, w = image.shape
        side = patch_side(self.size, h, w)
        x0, y0, x1, y1 = patch_box(h, w, side, self.position, self.margin, rng)
        if self.pattern == "checkerboard":
            patch = self.checkerboard(side)
        else:
            mean = image.detach().to("cpu", torch.float64).mean(dim=(1, 2)).numpy()
            noise = mean[:, None, None] + self.noise_std * rng.standard_normal((3, side, side))
            patch = torch.from_numpy(np.clip(noise, 0.0, 1.0))
        out = image.clone()
        out[:, y0:y1, x0:x1] = patch.to(device=image.device, dtype=image.dtype)
        return out, (x0, y0, x1, y1)
