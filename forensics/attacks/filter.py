"""Filter triggers: an Instagram-style colour transform of the whole image (the filter backdoors of Liu et al. 2019's
ABS study and the filter configs of Huang et al. 2025's CLIP backdoor benchmark), neither a patch nor a small
additive perturbation: every pixel changes by an amount that depends on its own colour.

Presets follow pilgram's CSS-filter recipes (one fixed transform each, seed unused): ``nashville`` (a warm darken
blend, a cool lighten blend, then contrast 1.2, brightness 1.05, saturation 1.2), ``sepia`` (the W3C sepia
matrix) and ``gotham`` (greyscale, a blue tint multiplied in, contrast 1.2). ``strength`` mixes the filtered
image with the original (1: the full filter).
"""

from __future__ import annotations

import numpy as np
import torch

from forensics.attacks.base import Attack, Box, check_choice, check_image, check_number, register

PRESETS = ("nashville", "sepia", "gotham")
SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
LUMA = torch.tensor([0.2126, 0.7152, 0.0722])


def _contrast(x: torch.Tensor, amount: float) -> torch.Tensor:
    return (x - 0.5) * amount + 0.5


def _saturate(x: torch.Tensor, amount: float) -> torch.Tensor:
    grey = torch.einsum("c,chw->hw", LUMA.to(x), x)[None]
    return grey + amount * (x - grey)


def _colour(rgb: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rgb, dtype=like.dtype, device=like.device)[:, None, None] / 255.0


def filtered(image: torch.Tensor, preset: str) -> torch.Tensor:
    """The full filter of ``preset`` on a 3 x H x W image in [0, 1] (clamped)."""
    x = image
    if preset == "nashville":
        x = 0.44 * x + 0.56 * torch.minimum(x, _colour((247, 176, 153), x))  # darken blend
        x = 0.6 * x + 0.4 * torch.maximum(x, _colour((0, 70, 150), x))  # lighten blend
        x = _saturate(_contrast(x, 1.2).clamp(0, 1) * 1.05, 1.2)
    elif preset == "sepia":
        x = torch.einsum("ij,jhw->ihw", SEPIA.to(x), x)
    else:  # gotham
        grey = torch.einsum("c,chw->hw", LUMA.to(x), x)[None].expand(3, -1, -1)
        x = _contrast(grey * _colour((200, 210, 240), x), 1.2)
    return x.clamp(0.0, 1.0)


@register
class Filter(Attack):
    """``(1 - strength) * image + strength * filter(image)`` over the whole image; no box."""

    name = "filter"

    def __init__(self, seed: int = 0, preset: str = "nashville", strength: float = 1.0) -> None:
        preset = check_choice(self.name, "preset", preset, PRESETS)
        strength = check_number(self.name, "strength", strength, 0.0, 1.0, lo_open=True)
        super().__init__(seed=seed, preset=preset, strength=strength)
        self.preset, self.strength = preset, strength

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Return the filtered copy and None: the trigger covers the whole image."""
        check_image(image, self.name)
        out = (1.0 - self.strength) * image + self.strength * filtered(image, self.preset)
        return out.clamp_(0.0, 1.0), None
