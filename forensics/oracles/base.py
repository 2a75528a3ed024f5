"""The oracle interface, the registry, and small helpers shared by every oracle.

An oracle says where the objects in an image are: ``segment(image)`` returns a list of
:class:`Region` (a boolean mask, its bounding box, a score and optionally a label), best first.
EftCLIP crops each region and asks the suspect CLIP again; a whole-image prediction that no region
grounds is a trigger candidate. Images may be float tensors 3xHxW in [0, 1], PIL images, or
HxWx3 numpy arrays (uint8, or float in [0, 1]); regions always live on the image's own pixel grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from forensics.core.errors import ForensicsError
from forensics.core.images import Box, to_rgb
from forensics.core.registry import Registry

ORACLES: Registry = Registry("oracle")
"""Registered oracle classes by name; filled by ``@ORACLES.register`` when the oracle modules import."""
register = ORACLES.register


@dataclass
class Region:
    """One object region on the image's pixel grid.

    mask: HxW bool, True on the region. box: (x0, y0, x1, y1) of the mask, end exclusive
    ((0, 0, 0, 0) when the mask is empty). score: the oracle's confidence, higher is better (its
    meaning depends on the oracle; see its docstring). label: a class name when the oracle knows one.
    """

    mask: np.ndarray
    box: Box
    score: float
    label: str | None = None

    @property
    def area(self) -> int:
        """Number of pixels in the mask."""
        return int(np.count_nonzero(self.mask))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no mask) for reports and the UI."""
        return {"box": list(self.box), "score": float(self.score), "label": self.label, "area": self.area}


class Oracle(ABC):
    """Segments an image into object regions.

    Subclasses set ``name`` (the registry key) and ``needs_weights`` (True when the oracle needs a
    model checkpoint, so benchmarks and the UI can pick weight-free ones), implement
    :meth:`segment`, and report their settings through :meth:`settings`.
    """

    name: ClassVar[str]
    needs_weights: ClassVar[bool] = False

    @abstractmethod
    def segment(self, image: Any) -> list[Region]:
        """Object regions of ``image``, sorted by score (descending). May be empty; never fails on a blank image."""

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings of this instance (overridden by oracles that have any)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """``{"name", "needs_weights", "settings"}`` for reports and the UI (which oracle is active, how set)."""
        return {"name": self.name, "needs_weights": bool(self.needs_weights), "settings": self.settings()}

    def __repr__(self) -> str:
        s = self.settings()
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in s.items())})"


# ----------------------------------------------------------------------------------------------
# helpers


def mask_box(mask: np.ndarray) -> Box:
    """Bounding box (x0, y0, x1, y1), end exclusive, of the True pixels; (0, 0, 0, 0) if there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return (0, 0, 0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def region_from_mask(mask: Any, score: float, label: str | None = None) -> Region:
    """A :class:`Region` from a 2-D mask (anything numpy can read; nonzero = inside), with its box computed."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ForensicsError(f"a region mask must be 2-D (HxW), got shape {m.shape}")
    m = np.ascontiguousarray(m != 0)
    return Region(mask=m, box=mask_box(m), score=float(score), label=label)


def sort_regions(regions: list[Region]) -> list[Region]:
    """Regions by score, best first (stable for ties, so larger-first orderings upstream survive)."""
    return sorted(regions, key=lambda r: -r.score)


def union_mask(regions: list[Region], shape: tuple[int, int] | None = None) -> np.ndarray:
    """The union of the regions' masks (HxW bool); ``shape`` is needed when ``regions`` may be empty."""
    if not regions:
        if shape is None:
            raise ForensicsError("union_mask: no regions and no shape given")
        return np.zeros(shape, bool)
    out = np.zeros(regions[0].mask.shape, bool)
    for r in regions:
        out |= r.mask
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ForensicsError(f"mask_iou: shapes differ, {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b)) / union


def to_numpy_rgb(image: Any) -> np.ndarray:
    """Any supported image as a contiguous HxWx3 uint8 RGB array.

    Accepts a float torch tensor 3xHxW (or 1x3xHxW) in [0, 1] (values are clamped and rounded), a
    uint8 tensor of the same shape, a PIL image of any mode, or a numpy array HxWx3 / HxW (uint8, or
    float in [0, 1]). Anything else raises ForensicsError.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the project
        torch = None
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach().to("cpu")
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3) or t.shape[1] < 1 or t.shape[2] < 1:
            raise ForensicsError(f"expected an image tensor of shape 3xHxW, got {tuple(image.shape)}")
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        if t.is_floating_point():
            t = t.to(torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise ForensicsError(f"expected a float image in [0,1] or uint8, got dtype {t.dtype}")
        return np.ascontiguousarray(t.permute(1, 2, 0).numpy())
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8))
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
            raise ForensicsError(f"expected an HxWx3 image array, got shape {image.shape}")
        a = a[..., :3]
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        if np.issubdtype(a.dtype, np.floating):
            return np.ascontiguousarray(np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0).astype(np.uint8))
        if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
            return np.ascontiguousarray(np.clip(a, 0, 255).astype(np.uint8))
        raise ForensicsError(f"expected a uint8 or float image array, got dtype {a.dtype}")
    raise ForensicsError(f"expected an image (3xHxW tensor, PIL image or HxWx3 array), got {type(image).__name__}")
