"""Where does a suspect model look? Grad-CAM, occlusion and region ablation over zero-shot logits.

Every method attributes the target class logit of :class:`ZeroShotHead`
(``100 * cos(encode_image(x), class_embedding)``) and uses captum for the method itself; this
module is glue: choosing the layer, reshaping ViT tokens, baselines, batching, normalising.

Maps come back as float32 CPU tensors N x S x S in [0, 1] (per-image max = 1, an all-zero map
stays zero). Calls leave the model as they found it: every module's ``training`` flag and every
parameter's ``requires_grad`` are restored, and no ``.grad`` is written (captum takes gradients
with ``torch.autograd.grad``, and parameters are frozen while it runs). Attribution itself runs
in eval mode on whatever device the model lives on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import (FeatureAblation, InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam,
                         Occlusion)
from PIL import Image
from torch import nn

from .errors import ForensicsError
from .zeroshot import zero_shot_logits

Targets = int | Sequence[int] | torch.Tensor | None
Baseline = str | float | torch.Tensor

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
    "overlay",
    "region_ablation",
    "region_ablation_map",
]


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

def _clip_module(model: Any) -> nn.Module | None:
    clip = getattr(model, "clip", None)
    return clip if isinstance(clip, nn.Module) else None


@contextmanager
def _attribution_mode(model: Any) -> Iterator[None]:
    """Eval mode and frozen parameters while attributing; every flag restored afterwards."""
    root = _clip_module(model)
    if root is None:
        yield
        return
    modes = [(m, m.training) for m in root.modules()]
    grads = [(p, p.requires_grad) for p in root.parameters()]
    try:
        root.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in modes:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)


def _check_images(model: Any, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ForensicsError(f"attribution needs images as an N x 3 x S x S tensor in [0, 1], got {shape}")
    if images.shape[0] == 0:
        raise ForensicsError("no images to attribute")
    size = getattr(model, "image_size", None)
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        raise ForensicsError(f"images are {images.shape[-2]}x{images.shape[-1]} px but the model takes {size}x{size}; "
                             "preprocess them with model.preprocess first")
    return images.detach().float()


def _check_targets(head: ZeroShotHead, images: torch.Tensor, targets: Targets, batch_size: int) -> list[int]:
    """One class index per image; ``None`` means the model's own prediction."""
    n, c = images.shape[0], head.class_emb.shape[0]
    if targets is None:
        with torch.no_grad():
            return [int(i) for start in range(0, n, batch_size)
                    for i in head(images[start:start + batch_size].to(head.class_emb.device)).argmax(-1).tolist()]
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


def _baseline(images: torch.Tensor, baseline: Baseline) -> torch.Tensor:
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
            raise ForensicsError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the images "
                                 f"{tuple(images.shape)}") from None
    raise ForensicsError(f"unknown baseline {baseline!r}; use 'mean', 'zero', a number or a tensor")


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Positive part, divided by each map's max; an all-zero (or non-finite) map becomes zero."""
    maps = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps)).cpu()


def _chunks(n: int, size: int) -> Iterator[slice]:
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# --------------------------------------------------------------------------- Grad-CAM

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
    visual = getattr(_clip_module(model), "visual", None)
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


def gradcam(model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
            layer: str | int | nn.Module | None = None, batch_size: int = 16) -> torch.Tensor:
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
    images = _check_images(model, images)
    head = ZeroShotHead(model, class_emb)
    size = images.shape[-1]
    maps = []
    with _attribution_mode(model):
        targets = _check_targets(head, images, targets, batch_size)
        with _gradcam_layer(model, layer, size) as cam_layer:
            cam = LayerGradCam(head, cam_layer)
            for part in _chunks(len(images), batch_size):
                x = images[part].to(model.device)
                attr = cam.attribute(x, target=targets[part], relu_attributions=True)
                up = LayerAttribution.interpolate(attr.detach().float(), (size, size), "bilinear")
                maps.append(up[:, 0].cpu())
    return _normalise(torch.cat(maps))


# --------------------------------------------------------------------------- occlusion

def occlusion(model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
              window: int | None = None, stride: int | None = None, baseline: Baseline = "mean",
              batch_size: int = 16) -> torch.Tensor:
    """Drop in the target logit when a square window is replaced by the baseline: N x S x S in [0, 1].

    Window defaults to 1/8 of the image side, stride to half the window; each pixel gets the
    mean drop of the windows covering it (captum ``Occlusion``), then its positive part. Pixels
    no window covers (when (S - window) is no multiple of stride) get 0. ``baseline`` "mean" is
    each image's mean colour. About ``batch_size`` images go through the model per forward.
    """
    images = _check_images(model, images)
    size = images.shape[-1]
    window = max(1, round(size / 8)) if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 1 <= window <= size or stride < 1:
        raise ForensicsError(f"occlusion window {window} / stride {stride} do not fit a {size}-px image")
    head = ZeroShotHead(model, class_emb)
    occ = Occlusion(head)
    maps = []
    with _attribution_mode(model), torch.no_grad():
        targets = _check_targets(head, images, targets, batch_size)
        for part in _chunks(len(images), batch_size):
            x = images[part].to(model.device)
            attr = occ.attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                 baselines=_baseline(x, baseline), target=targets[part],
                                 perturbations_per_eval=max(1, batch_size // len(x)))
            maps.append(attr.mean(dim=1).cpu())
    return _normalise(torch.cat(maps))


# --------------------------------------------------------------------------- first-order occlusion

def _log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of every class: its logit minus the log-sum-exp of the others. Its gradient is that of
    log p scaled by 1 / (1 - p), so it ranks pixels alike but does not vanish on a confident prediction."""
    c = logits.shape[-1]
    if c == 1:
        return logits
    others = logits.unsqueeze(1).expand(-1, c, -1).masked_fill(torch.eye(c, dtype=torch.bool, device=logits.device), float("-inf"))
    return logits - others.logsumexp(-1)


def occlusion_estimate_signed(model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
                              baseline: Baseline = "mean", steps: int = 1, batch_size: int = 32) -> torch.Tensor:
    """Per-pixel estimate of how much replacing that pixel by the baseline lowers the target's log-odds.

    ``(x - baseline) . mean of d log(p / (1 - p)) / dx`` over ``steps`` points on the straight path from the baseline
    to the image (captum ``IntegratedGradients``; ``steps=1`` is input x gradient at the image itself),
    summed over colour channels: N x S x S, signed, unnormalised, so a window's estimated drop is the sum
    over it. Averaging along the path keeps a saturated trigger (zero gradient at the image) visible.
    A few backward passes per image instead of one forward per occluder placement; on the demo it
    concentrates on a pasted trigger more than occlusion does (bench/attribution_mass.py).
    """
    images = _check_images(model, images)
    if steps < 1:
        raise ForensicsError(f"steps must be at least 1, got {steps}")
    head = ZeroShotHead(model, class_emb)
    log_odds = lambda x: _log_odds(head(x))  # noqa: E731
    maps = []
    with _attribution_mode(model):
        targets = _check_targets(head, images, targets, batch_size)
        for part in _chunks(len(images), max(1, batch_size // steps)):
            x = images[part].to(model.device)
            base = _baseline(x, baseline)
            try:
                if steps == 1:
                    method = InputXGradient(lambda shifted, base=base: log_odds(shifted + base))
                    attr = method.attribute((x - base).requires_grad_(True), target=targets[part])
                else:
                    attr = IntegratedGradients(log_odds).attribute(x, baselines=base, target=targets[part], n_steps=steps,
                                                                    method="riemann_trapezoid",
                                                                    internal_batch_size=len(x) * steps)
            except RuntimeError as err:  # a model whose output does not depend differentiably on the pixels
                if "does not require grad" not in str(err):
                    raise
                attr = torch.zeros_like(x)
            maps.append(attr.detach().sum(dim=1).cpu())
    return torch.cat(maps)


def occlusion_estimate(model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
                       baseline: Baseline = "mean", steps: int = 1, batch_size: int = 32) -> torch.Tensor:
    """:func:`occlusion_estimate_signed`, positive part, each map divided by its max: N x S x S in [0, 1]."""
    return _normalise(occlusion_estimate_signed(model, images, class_emb, targets, baseline, steps, batch_size))


# --------------------------------------------------------------------------- region ablation

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


def region_ablation(model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
                    regions: Sequence[torch.Tensor], baseline: Baseline = "mean",
                    batch_size: int = 16) -> list[torch.Tensor]:
    """Per-region drop in the target logit when that region alone is replaced by the baseline.

    ``regions[i]`` is an R_i x S x S bool tensor for image i; the result is a list of R_i float
    tensors (positive = the region supports the class). Built on captum ``FeatureAblation``
    with one feature per region; pixels in no region form a background feature that is ablated
    too but not returned. Where regions overlap, the LATER region owns the shared pixels, so
    a region entirely covered by later ones owns nothing and scores 0.
    """
    images = _check_images(model, images)
    size = images.shape[-1]
    regions = _region_masks(regions, len(images), size)
    ids = _feature_ids(regions, size)
    head = ZeroShotHead(model, class_emb)
    ablate = FeatureAblation(head)
    drops: list[torch.Tensor] = []
    with _attribution_mode(model), torch.no_grad():
        targets = _check_targets(head, images, targets, batch_size)
        for part in _chunks(len(images), batch_size):
            if all(r.shape[0] == 0 for r in regions[part]):
                drops.extend(torch.zeros(0) for _ in regions[part])
                continue
            x = images[part].to(model.device)
            mask = ids[part].unsqueeze(1).to(x.device)
            attr = ablate.attribute(x, baselines=_baseline(x, baseline), target=targets[part], feature_mask=mask,
                                    perturbations_per_eval=max(1, batch_size // len(x)))
            attr = attr[:, 0].float().cpu()
            for j, i in enumerate(range(part.start, part.stop)):
                values = torch.zeros(regions[i].shape[0])
                for r in range(regions[i].shape[0]):
                    owned = ids[i] == r + 1
                    if owned.any():
                        values[r] = attr[j][owned].mean()
                drops.append(values)
    return drops


def region_ablation_map(model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
                        regions: Sequence[torch.Tensor], baseline: Baseline = "mean",
                        batch_size: int = 16) -> torch.Tensor:
    """Each region painted with its positive logit drop (later regions win overlaps): N x S x S in [0, 1]."""
    images = _check_images(model, images)
    size = images.shape[-1]
    masks = _region_masks(regions, len(images), size)
    drops = region_ablation(model, images, class_emb, targets, masks, baseline=baseline, batch_size=batch_size)
    ids = _feature_ids(masks, size)
    values = [torch.cat([torch.zeros(1), d.clamp_min(0)]) for d in drops]  # id 0 = background, painted 0
    return _normalise(torch.stack([v[i] for v, i in zip(values, ids)]))


# --------------------------------------------------------------------------- summaries and pictures

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
        raise ForensicsError(f"mask of shape {tuple(masks.shape)} does not fit maps of shape {tuple(maps.shape)}") from None
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


# --------------------------------------------------------------------------- registry

ATTRIBUTIONS: dict[str, Callable[..., torch.Tensor]] = {"gradcam": gradcam, "occlusion": occlusion,
                                                         "occlusion-estimate": occlusion_estimate}


def attribute(name: str, model: Any, images: torch.Tensor, class_emb: torch.Tensor, targets: Targets,
              **kwargs: Any) -> torch.Tensor:
    """Run the attribution method ``name`` (a key of :data:`ATTRIBUTIONS`): N x S x S maps in [0, 1]."""
    try:
        method = ATTRIBUTIONS[name]
    except KeyError:
        raise ForensicsError(f"unknown attribution method {name!r}; choose one of {', '.join(ATTRIBUTIONS)}") from None
    return method(model, images, class_emb, targets, **kwargs)
