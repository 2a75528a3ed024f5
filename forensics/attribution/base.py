"""Shared glue of the attribution methods: where does a suspect model look?

Grad-CAM, occlusion and region ablation over zero-shot logits.

Every method attributes the target class logit of :class:`ZeroShotHead`
(``100 * cos(encode_image(x), class_embedding)``) and uses captum for the method itself; this
package is glue: choosing the layer, reshaping ViT tokens, baselines, batching, normalising.

Maps come back as float32 CPU tensors N x S x S in [0, 1] (per-image max = 1, an all-zero map
stays zero). Calls leave the model as they found it: every module's ``training`` flag and every
parameter's ``requires_grad`` are restored, and no ``.grad`` is written (captum takes gradients
with ``torch.autograd.grad``, and parameters are frozen while it runs). Attribution itself runs
in eval mode on whatever device the model lives on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from forensics.core.errors import ForensicsError
from forensics.core.models import frozen
from forensics.core.registry import Registry
from forensics.core.zeroshot import zero_shot_logits

ATTRIBUTIONS: Registry = Registry("attribution method")
"""Attribution methods by name: ``f(model, images, class_emb, targets, **settings) -> N x S x S maps in [0, 1]``."""

Targets = int | Sequence[int] | torch.Tensor | None
Baseline = str | float | torch.Tensor


class ZeroShotHead(nn.Module):
    """The forward captum attributes: [0, 1] images -> N x C zero-shot logits (100 * cosine).

    The suspect model is held as a plain attribute (a SuspectModel is no ``nn.Module``); the class
    embeddings are a buffer on the model's device.
    """

    def __init__(self, model: Any, class_emb: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("class_emb", class_emb.detach().to(model.device, torch.float32))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(self.model, x01, self.class_emb)


# --------------------------------------------------------------------------- shared glue


def clip_module(model: Any) -> nn.Module | None:
    clip = getattr(model, "clip", None)
    return clip if isinstance(clip, nn.Module) else None


@contextmanager
def attribution_mode(model: Any) -> Iterator[None]:
    """Eval mode and frozen parameters while attributing; every flag restored afterwards."""
    root = clip_module(model)
    if root is None:
        yield
        return
    with frozen(root):
        yield


def check_images(model: Any, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ForensicsError(f"attribution needs images as an N x 3 x S x S tensor in [0, 1], got {shape}")
    if images.shape[0] == 0:
        raise ForensicsError("no images to attribute")
    size = getattr(model, "image_size", None)
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        raise ForensicsError(
            f"images are {images.shape[-2]}x{images.shape[-1]} px but the model takes {size}x{size}; "
            "preprocess them with model.preprocess first"
        )
    return images.detach().float()


def check_targets(head: ZeroShotHead, images: torch.Tensor, targets: Targets, batch_size: int) -> list[int]:
    """One class index per image; ``None`` means the model's own prediction."""
    n, c = images.shape[0], head.class_emb.shape[0]
    if targets is None:
        with torch.no_grad():
            return [
                int(i)
                for start in range(0, n, batch_size)
                for i in head(images[start : start + batch_size].to(head.class_emb.device)).argmax(-1).tolist()
            ]
    if isinstance(targets, torch.Tensor):
        targets = targets.flatten().tolist()
    elif isinstance(targets, (int, np.integer)):
        targets = [int(targets)] * n
    targets = [int(t) for t in targets]
    if len(targets) != n:
        raise ForensicsError(f"{len(targets)} targets given for {n} images; give one class index per image")
    bad = [t for t in targets if not 0 <= t < c]
    if bad:
        raise ForensicsError(f"target class index {bad[0]} is out of range for {c} classes")
    return targets


def baseline_images(images: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """Full-shape replacement values: ``"mean"`` (per-image mean colour), ``"zero"``, a number, or a tensor."""
    if isinstance(baseline, str):
        if baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
        if baseline in ("zero", "black"):
            return torch.zeros_like(images)
        raise ForensicsError(f"unknown baseline {baseline!r}; use 'mean', 'zero', a number or a tensor")
    if isinstance(baseline, (int, float)):
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(images.device, images.dtype).expand_as(images).contiguous()
        except RuntimeError:
            raise ForensicsError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the images {tuple(images.shape)}"
            ) from None
    raise ForensicsError(f"unknown baseline {baseline!r}; use 'mean', 'zero', a number or a tensor")


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Positive part, divided by each map's max; an all-zero (or non-finite) map becomes zero."""
    maps = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps)).cpu()


def chunks(n: int, size: int) -> Iterator[slice]:
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
