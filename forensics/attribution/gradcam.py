"""Grad-CAM of the zero-shot logit (captum LayerGradCam), with ViT token routing; see :func:`gradcam`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from forensics.attribution.base import (
    ATTRIBUTIONS,
    Targets,
    ZeroShotHead,
    attribution_mode,
    check_images,
    check_targets,
    chunks,
    clip_module,
    normalise,
)
from forensics.core.errors import ForensicsError


class _TokenGrid(nn.Module):
    """Identity tap captum hooks: sees ViT patch tokens as an N x D x H x W map (clone keeps it a fresh tensor)."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.clone()


def _tower_kind(visual: nn.Module) -> str:
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):
        return "vit"
    if hasattr(visual, "layer4") and hasattr(visual, "attnpool"):
        return "resnet"
    raise ForensicsError(f"Grad-CAM needs an open_clip ViT or ModifiedResNet image tower, not {type(visual).__name__}")


def _resnet_layer(visual: nn.Module, layer: str | nn.Module | None, size: int) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    if layer in (None, "auto"):
        # ModifiedResNet halves four times after its 4x stem: layer4 is S/32 px, layer3 S/16
        layer = "layer4" if size // 32 >= 4 else "layer3"
    module: Any = visual
    for part in str(layer).removeprefix("visual.").split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ForensicsError(f"the ResNet image tower has no stage {layer!r}; use layer1 .. layer4 or 'auto'")
    if not isinstance(module, nn.Module):
        raise ForensicsError(f"{layer!r} is no module of the image tower")
    return module


@contextmanager
def _gradcam_layer(model: Any, layer: str | int | nn.Module | None, size: int) -> Iterator[nn.Module]:
    """The module whose NCHW output captum's LayerGradCam uses, with any hook it needs while in use."""
    visual = getattr(clip_module(model), "visual", None)
    if not isinstance(visual, nn.Module):
        raise ForensicsError("Grad-CAM needs a model with an open_clip image tower (model.clip.visual)")
    if _tower_kind(visual) == "resnet":
        yield _resnet_layer(visual, layer, size)
        return
    blocks = visual.transformer.resblocks
    if layer in (None, "auto"):
        index = -1
    elif isinstance(layer, int):
        index = layer
    else:
        raise ForensicsError(f"for a ViT tower give layer as a block index (or None), not {layer!r}")
    try:
        ln_1 = blocks[index].ln_1
    except IndexError:
        raise ForensicsError(f"the ViT has {len(blocks)} blocks; block {index} does not exist") from None
    batch_first = getattr(visual.transformer, "batch_first", True)
    gh, gw = visual.grid_size
    tap = _TokenGrid()

    def route_tokens(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        x = out if batch_first else out.transpose(0, 1)  # N x L x D
        prefix = x.shape[1] - gh * gw  # the class token (open_clip has exactly one)
        n, _, d = x.shape
        grid = tap(x[:, prefix:].transpose(1, 2).reshape(n, d, gh, gw))
        x = torch.cat([x[:, :prefix], grid.reshape(n, d, gh * gw).transpose(1, 2)], dim=1)
        return x if batch_first else x.transpose(0, 1)

    handle = ln_1.register_forward_hook(route_tokens)
    try:
        yield tap
    finally:
        handle.remove()


@ATTRIBUTIONS.register(name="gradcam")
def gradcam(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    targets: Targets,
    layer: str | int | nn.Module | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Grad-CAM of the target logit, upsampled (bilinear) to the image: N x S x S in [0, 1].

    ResNet towers: ``layer`` is None/"auto" (``layer4``, or ``layer3`` when layer4 would be
    smaller than 4x4), a stage name ("layer3", "layer4.0") or a module of the tower.

    ViT towers: ``layer`` is a block index (default the last). Gradients at the last block's
    output (or ``ln_post``) are zero for patch tokens because only the class token is pooled,
    so the map is taken at the OUTPUT of that block's ``ln_1``, which feeds the attention every
    token takes part in. A forward hook on ``ln_1`` drops the class token, reshapes the patch
    tokens to ``visual.grid_size`` as N x D x H x W (batch-first or not), passes them through a
    small identity module (``_TokenGrid``) and puts them back. captum's LayerGradCam hooks that
    identity module, so it sees a real NCHW activation and averages gradients over H x W as
    Grad-CAM intends, while the model computes exactly what it computed before. The hook lives
    only for the call; no module of the model is replaced.
    """
    images = check_images(model, images)
    head = ZeroShotHead(model, class_emb)
    size = images.shape[-1]
    maps = []
    with attribution_mode(model):
        targets = check_targets(head, images, targets, batch_size)
        with _gradcam_layer(model, layer, size) as cam_layer:
            cam = LayerGradCam(head, cam_layer)
            for part in chunks(len(images), batch_size):
                x = images[part].to(model.device)
                attr = cam.attribute(x, target=targets[part], relu_attributions=True)
                up = LayerAttribution.interpolate(attr.detach().float(), (size, size), "bilinear")
                maps.append(up[:, 0].cpu())
    return normalise(torch.cat(maps))
