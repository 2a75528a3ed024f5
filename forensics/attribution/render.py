"""Summaries and pictures of attribution maps: mass inside a mask, colour maps, overlays (as captum's visualization)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from forensics.core.errors import ForensicsError


def mass_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's (positive) attribution mass inside a bool mask: N values in [0, 1], 0 for a zero map.

    ``maps`` is N x S x S (or S x S); ``masks`` the same shape or one S x S mask for all.
    """
    maps = maps.detach().float()
    single = maps.dim() == 2
    if single:
        maps = maps.unsqueeze(0)
    masks = torch.as_tensor(masks, device=maps.device).bool()
    try:
        masks = masks.expand_as(maps)
    except RuntimeError:
        raise ForensicsError(
            f"mask of shape {tuple(masks.shape)} does not fit maps of shape {tuple(maps.shape)}"
        ) from None
    mass = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    total = mass.flatten(1).sum(1)
    inside = (mass * masks).flatten(1).sum(1)
    share = torch.where(total > 0, inside / total.clamp_min(torch.finfo(mass.dtype).tiny), torch.zeros_like(total))
    return share.clamp(0, 1)


def _colourise(heatmap: torch.Tensor, cmap: str, size: tuple[int, int] | None = None) -> np.ndarray:
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ForensicsError(f"unknown colour map {cmap!r} (any matplotlib colormap name, e.g. jet, viridis)") from None
    hm = torch.nan_to_num(heatmap.detach().float().cpu(), nan=0.0).squeeze()
    if hm.dim() != 2:
        raise ForensicsError(f"a heatmap is S x S, got shape {tuple(heatmap.shape)}")
    if size is not None and tuple(hm.shape) != tuple(size):
        hm = F.interpolate(hm[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return colormap(hm.clamp(0, 1).numpy())[..., :3]


def heatmap_to_image(heatmap: torch.Tensor, cmap: str = "jet", size: int | None = None) -> Image.Image:
    """An S x S heatmap in [0, 1] as an RGB picture in a matplotlib colour map (optionally resized to ``size``)."""
    rgb = _colourise(heatmap, cmap, (size, size) if size else None)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def overlay(image01: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """Blend a coloured heatmap over a 3 x S x S [0, 1] image: ``(1 - alpha) * image + alpha * colour``."""
    image = image01.detach().float().cpu()
    if image.dim() != 3 or image.shape[0] != 3:
        raise ForensicsError(f"overlay needs a 3 x S x S image, got shape {tuple(image01.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ForensicsError(f"alpha must be in [0, 1], got {alpha}")
    base = image.clamp(0, 1).permute(1, 2, 0).numpy()
    colour = _colourise(heatmap, cmap, tuple(image.shape[-2:]))
    blend = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray((blend * 255).round().clip(0, 255).astype(np.uint8))
