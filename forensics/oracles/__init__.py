"""Segmentation oracles: where the objects in an image are, as a list of :class:`Region`.

Build oracles by name (``build_oracle("fallback")``, ``build_oracle("sam", checkpoint="sam_vit_b_01ec64.pth")``)
and list them with :func:`list_oracles`. Registered oracles:

- ``sam``: segment-anything, automatic or prompted by boxes/points (needs a checkpoint or a built model);
- ``fallback``: weight-free GrabCut foreground, the default when no SAM checkpoint is given;
- ``background``, ``superpixel``: other weight-free oracles, measured worse on the demo set;
- ``ground-truth``: regions from a known object mask (teaching, and measuring the others).
"""

from __future__ import annotations

from typing import Any

from forensics.oracles.base import (
    ORACLES,
    Oracle,
    Region,
    mask_box,
    mask_iou,
    region_from_mask,
    register,
    sort_regions,
    to_numpy_rgb,
    union_mask,
)
from forensics.oracles.fallback import BackgroundModelOracle, GrabCutOracle, SuperpixelOracle
from forensics.oracles.ground_truth import GroundTruthOracle, image_key
from forensics.oracles.sam import SamOracle, load_sam

__all__ = [
    "ORACLES",
    "Oracle",
    "Region",
    "BackgroundModelOracle",
    "GrabCutOracle",
    "GroundTruthOracle",
    "SamOracle",
    "SuperpixelOracle",
    "build_oracle",
    "default_oracle",
    "image_key",
    "list_oracles",
    "load_sam",
    "mask_box",
    "mask_iou",
    "region_from_mask",
    "register",
    "sort_regions",
    "to_numpy_rgb",
    "union_mask",
]


def list_oracles(weight_free: bool | None = None) -> list[str]:
    """Names of the registered oracles, sorted; ``weight_free=True`` keeps those needing no checkpoint
    (ground truth included: it needs masks instead), ``False`` those that need one."""
    if weight_free is None:
        return ORACLES.names()
    return ORACLES.names(lambda cls: (not cls.needs_weights) == weight_free)


def build_oracle(name: str, **kwargs: Any) -> Oracle:
    """Build a registered oracle from its name and keyword settings; unknown names or settings raise ForensicsError."""
    return ORACLES.build(name, **kwargs)


def default_oracle(sam_checkpoint: str | None = None, **kwargs: Any) -> Oracle:
    """SAM when a checkpoint path is given, else the weight-free fallback (the UI says which one is active)."""
    if sam_checkpoint:
        return build_oracle("sam", checkpoint=sam_checkpoint, **kwargs)
    return build_oracle("fallback", **kwargs)
