"""Region ablation: the drop in the target logit when each oracle region is replaced by the baseline."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from captum.attr import FeatureAblation

from forensics.attribution.base import (
    ATTRIBUTIONS,
    Baseline,
    Targets,
    ZeroShotHead,
    attribution_mode,
    baseline_images,
    check_images,
    check_targets,
    chunks,
    normalise,
)
from forensics.core.errors import ForensicsError


def _region_masks(regions: Sequence[torch.Tensor], n: int, size: int) -> list[torch.Tensor]:
    if len(regions) != n:
        raise ForensicsError(f"{len(regions)} region sets given for {n} images; give one (R x S x S) per image")
    out = []
    for i, reg in enumerate(regions):
        reg = torch.as_tensor(reg)
        if reg.dim() == 2:
            reg = reg.unsqueeze(0)
        if reg.dim() != 3 or tuple(reg.shape[-2:]) != (size, size):
            raise ForensicsError(f"regions of image {i} have shape {tuple(reg.shape)}; expected R x {size} x {size}")
        out.append(reg.detach().cpu().bool())
    return out


def _feature_ids(regions: list[torch.Tensor], size: int) -> torch.Tensor:
    """N x S x S ids: 0 = background (in no region), r + 1 = region r; later regions win overlaps."""
    ids = torch.zeros(len(regions), size, size, dtype=torch.long)
    for i, reg in enumerate(regions):
        for r in range(reg.shape[0]):
            ids[i][reg[r]] = r + 1
    return ids


def region_ablation(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    targets: Targets,
    regions: Sequence[torch.Tensor],
    baseline: Baseline = "mean",
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per-region drop in the target logit when that region alone is replaced by the baseline.

    ``regions[i]`` is an R_i x S x S bool tensor for image i; the result is a list of R_i float
    tensors (positive = the region supports the class). Built on captum ``FeatureAblation``
    with one feature per region; pixels in no region form a background feature that is ablated
    too but not returned. Where regions overlap, the LATER region owns the shared pixels, so
    a region entirely covered by later ones owns nothing and scores 0.
    """
    images = check_images(model, images)
    size = images.shape[-1]
    regions = _region_masks(regions, len(images), size)
    ids = _feature_ids(regions, size)
    head = ZeroShotHead(model, class_emb)
    ablate = FeatureAblation(head)
    drops: list[torch.Tensor] = []
    with attribution_mode(model), torch.no_grad():
        targets = check_targets(head, images, targets, batch_size)
        for part in chunks(len(images), batch_size):
            if all(r.shape[0] == 0 for r in regions[part]):
                drops.extend(torch.zeros(0) for _ in regions[part])
                continue
            x = images[part].to(model.device)
            mask = ids[part].unsqueeze(1).to(x.device)
            attr = ablate.attribute(
                x,
                baselines=baseline_images(x, baseline),
                target=targets[part],
                feature_mask=mask,
                perturbations_per_eval=max(1, batch_size // len(x)),
            )
            attr = attr[:, 0].float().cpu()
            for j, i in enumerate(range(part.start, part.stop)):
                values = torch.zeros(regions[i].shape[0])
                for r in range(regions[i].shape[0]):
                    owned = ids[i] == r + 1
                    if owned.any():
                        values[r] = attr[j][owned].mean()
                drops.append(values)
    return drops


@ATTRIBUTIONS.register(name="region-ablation")
def region_ablation_map(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    targets: Targets,
    regions: Sequence[torch.Tensor],
    baseline: Baseline = "mean",
    batch_size: int = 16,
) -> torch.Tensor:
    """Each region painted with its positive logit drop (later regions win overlaps): N x S x S in [0, 1]."""
    images = check_images(model, images)
    size = images.shape[-1]
    masks = _region_masks(regions, len(images), size)
    drops = region_ablation(model, images, class_emb, targets, masks, baseline=baseline, batch_size=batch_size)
    ids = _feature_ids(masks, size)
    values = [torch.cat([torch.zeros(1), d.clamp_min(0)]) for d in drops]  # id 0 = background, painted 0
    return normalise(torch.stack([v[i] for v, i in zip(values, ids)]))
