"""Where does a suspect model look? Grad-CAM, occlusion and region ablation over zero-shot logits.

One file per method, each registered in :data:`ATTRIBUTIONS` with one signature,
``f(model, images, class_emb, targets, **settings) -> N x S x S`` maps in [0, 1] (as captum's
``attribute()``); drawing lives in :mod:`forensics.attribution.render`. See :mod:`.base` for what
every method guarantees about the model's state.
"""

from __future__ import annotations

from typing import Any

import torch

from forensics.attribution.base import ATTRIBUTIONS, Targets, ZeroShotHead
from forensics.attribution.gradcam import gradcam
from forensics.attribution.occlusion import (
    occlusion,
    occlusion_estimate,
    occlusion_estimate_signed,
    predict_and_estimate,
)
from forensics.attribution.region_ablation import region_ablation, region_ablation_map
from forensics.attribution.render import heatmap_to_image, mass_inside, overlay

__all__ = [
    "ATTRIBUTIONS",
    "ZeroShotHead",
    "attribute",
    "gradcam",
    "heatmap_to_image",
    "mass_inside",
    "occlusion",
    "occlusion_estimate",
    "occlusion_estimate_signed",
    "predict_and_estimate",
    "overlay",
    "region_ablation",
    "region_ablation_map",
]


def attribute(
    name: str, model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets, **kwargs: Any
) -> torch.Tensor:
    """Run the registered attribution method ``name``: N x S x S maps in [0, 1]."""
    return ATTRIBUTIONS.get(name)(model, images, class_emb, targets, **kwargs)
