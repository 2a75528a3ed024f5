"""One image under the microscope: what the oracle sees, where CLIP looks, and what a trigger does to it.

These are the per-image views of the workbench (and of `forensics.explain_image` for scripts): the oracle's
regions with CLIP's label for each crop beside CLIP's label for the whole image, Grad-CAM beside
occlusion (the map that localizes small triggers), and a trigger pasted on an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from forensics.attacks import Attack
from forensics.attribution import gradcam, occlusion, overlay
from forensics.core.data import load_image
from forensics.core.errors import ForensicsError
from forensics.core.images import crop_resize, paste, pil_to_model_tensor, to_pil
from forensics.core.models import SuspectModel
from forensics.core.zeroshot import class_text_embeddings, predict
from forensics.oracles import Oracle

ImageInput = str | Path | Image.Image | torch.Tensor


@dataclass
class ImageExplanation:
    """CLIP's view of one image beside the oracle's."""

    image: Image.Image
    predicted: str
    probabilities: dict[str, float]  # whole image, every class, highest first
    regions: list[dict]  # per oracle region: mask (H x W bool), box, crop label and probability
    gradcam: Image.Image  # overlay for the predicted label
    occlusion: Image.Image  # overlay: where the prediction rests (localizes small triggers)
    outside_mass: float  # share of occlusion mass outside every oracle region
    oracle: str
    notes: list[str] = field(default_factory=list)

    def region_table(self) -> list[dict]:
        """Rows for a table: the whole image first, then each region's crop."""
        rows = [
            {
                "view": "whole image",
                "CLIP label": self.predicted,
                "probability": round(self.probabilities[self.predicted], 3),
                "box": "",
            }
        ]
        rows += [
            {
                "view": f"region {k + 1}",
                "CLIP label": r["label"],
                "probability": round(r["probability"], 3),
                "box": " ".join(map(str, r["box"])),
            }
            for k, r in enumerate(self.regions)
        ]
        return rows


def as_model_image(image: ImageInput, size: int) -> torch.Tensor:
    """Any image input (path, PIL, 3 x S x S tensor) as 3 x size x size in [0, 1]; bad input -> ForensicsError."""
    if isinstance(image, (str, Path)):
        return load_image(image, size)
    if isinstance(image, Image.Image):
        return pil_to_model_tensor(image, size)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ForensicsError(f"an image tensor must be 3 x H x W, got {tuple(image.shape)}")
        if image.shape[-1] != size or image.shape[-2] != size:
            return pil_to_model_tensor(to_pil(image), size)
        return image.float().clamp(0, 1)
    raise ForensicsError(f"not an image: {type(image).__name__}")


def _ranked(probs: torch.Tensor, class_names: Sequence[str]) -> dict[str, float]:
    order = torch.argsort(probs, descending=True).tolist()
    return {class_names[i]: float(probs[i]) for i in order}


def explain_image(
    model: SuspectModel,
    image: ImageInput,
    class_names: Sequence[str],
    oracle: Oracle,
    templates: str | list[str] = "short",
    max_regions: int = 6,
) -> ImageExplanation:
    """Whole-image and per-region predictions, oracle regions, Grad-CAM and occlusion for one image."""
    class_names = list(class_names)
    if not class_names:
        raise ForensicsError("no class names given")
    x = as_model_image(image, model.image_size)
    size = model.image_size
    class_emb = class_text_embeddings(model, class_names, templates)
    probs = predict(model, x[None], class_emb)[0]
    label = int(probs.argmax())
    regions = oracle.segment(x)[:max_regions]
    crops = torch.stack([crop_resize(x, r.box, size) for r in regions]) if regions else None
    crop_probs = predict(model, crops, class_emb) if crops is not None else torch.empty(0, len(class_names))
    region_rows = [
        {
            "mask": r.mask,
            "box": list(r.box),
            "score": float(r.score),
            "label": class_names[int(p.argmax())],
            "probability": float(p.max()),
        }
        for r, p in zip(regions, crop_probs)
    ]
    cam = gradcam(model, x[None], class_emb, [label])[0]
    occ = occlusion(model, x[None], class_emb, [label], window=max(4, round(size * 0.1875)))[0]
    union = np.zeros((size, size), bool)
    for r in regions:
        union |= r.mask
    total = float(occ.sum())
    outside = float(occ[torch.from_numpy(~union)].sum() / total) if total > 0 and union.any() else 0.0
    notes = []
    if not regions:
        notes.append("the oracle found no object region in this image")
    elif all(r["label"] != class_names[label] for r in region_rows):
        notes.append(
            f"no object region is labelled '{class_names[label]}' on its own: the whole-image label is not grounded"
        )
    return ImageExplanation(
        image=to_pil(x),
        predicted=class_names[label],
        probabilities=_ranked(probs, class_names),
        regions=region_rows,
        gradcam=overlay(x, cam),
        occlusion=overlay(x, occ),
        outside_mass=round(outside, 4),
        oracle=oracle.name,
        notes=notes,
    )


def paste_trigger(
    model: SuspectModel,
    image: ImageInput,
    pattern: torch.Tensor,
    class_names: Sequence[str],
    position: str = "bottom-right",
    seed: int = 0,
    templates: str | list[str] = "short",
) -> dict[str, Any]:
    """Paste a trigger pattern on an image and return the predictions before and after, and the pasted image."""
    x = as_model_image(image, model.image_size)
    size = model.image_size
    h, w = pattern.shape[1:]
    if h > size or w > size:
        raise ForensicsError(f"the trigger ({w}x{h}) is larger than the image ({size}x{size})")
    margin = max(1, size // 32)
    if position == "bottom-right":
        px, py = size - w - margin, size - h - margin
    elif position == "top-left":
        px, py = margin, margin
    elif position == "centre":
        px, py = (size - w) // 2, (size - h) // 2
    elif position == "random":
        rng = np.random.default_rng(seed)
        px, py = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    else:
        raise ForensicsError(f"position must be bottom-right, top-left, centre or random, not {position!r}")
    px, py = max(0, px), max(0, py)
    pasted = paste(x, pattern, (px, py, px + w, py + h))
    class_emb = class_text_embeddings(model, list(class_names), templates)
    probs = predict(model, torch.stack([x, pasted]), class_emb)
    before, after = _ranked(probs[0], class_names), _ranked(probs[1], class_names)
    return {
        "image": to_pil(pasted),
        "before": before,
        "after": after,
        "before_label": next(iter(before)),
        "after_label": next(iter(after)),
        "flipped": next(iter(before)) != next(iter(after)),
    }


def attack_side_by_side(
    attack: Attack,
    image: ImageInput,
    models: dict[str, SuspectModel],
    class_names: Sequence[str],
    seed: int = 0,
    templates: str | list[str] = "short",
) -> dict[str, Any]:
    """Apply an attack to one image and show each model's prediction on the clean and the attacked image."""
    if not models:
        raise ForensicsError("no model to compare")
    size = next(iter(models.values())).image_size
    x = as_model_image(image, size)
    attacked, box = attack.apply(x, np.random.default_rng(seed))
    rows = []
    for name, model in models.items():
        xm = x if model.image_size == size else as_model_image(to_pil(x), model.image_size)
        am = attacked if model.image_size == size else as_model_image(to_pil(attacked), model.image_size)
        class_emb = class_text_embeddings(model, list(class_names), templates)
        probs = predict(model, torch.stack([xm, am]), class_emb)
        clean, hit = _ranked(probs[0], class_names), _ranked(probs[1], class_names)
        rows.append(
            {
                "model": name,
                "clean image": next(iter(clean)),
                "clean probability": round(next(iter(clean.values())), 3),
                "attacked image": next(iter(hit)),
                "attacked probability": round(next(iter(hit.values())), 3),
                "changed": next(iter(clean)) != next(iter(hit)),
            }
        )
    return {"image": to_pil(x), "attacked": to_pil(attacked), "box": box, "rows": rows}
