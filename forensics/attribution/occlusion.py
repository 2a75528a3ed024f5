"""Occlusion maps: the captum sliding-window sweep and the first-order (input x gradient) estimate of it."""

from __future__ import annotations

from typing import Any, Callable

import torch
from captum.attr import InputXGradient, IntegratedGradients, Occlusion

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


@ATTRIBUTIONS.register(name="occlusion")
def occlusion(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    targets: Targets,
    window: int | None = None,
    stride: int | None = None,
    baseline: Baseline = "mean",
    batch_size: int = 16,
) -> torch.Tensor:
    """Drop in the target logit when a square window is replaced by the baseline: N x S x S in [0, 1].

    Window defaults to 1/8 of the image side, stride to half the window; each pixel gets the
    mean drop of the windows covering it (captum ``Occlusion``), then its positive part. Pixels
    no window covers (when (S - window) is no multiple of stride) get 0. ``baseline`` "mean" is
    each image's mean colour. About ``batch_size`` images go through the model per forward.
    """
    images = check_images(model, images)
    size = images.shape[-1]
    window = max(1, round(size / 8)) if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 1 <= window <= size or stride < 1:
        raise ForensicsError(f"occlusion window {window} / stride {stride} do not fit a {size}-px image")
    head = ZeroShotHead(model, class_emb)
    occ = Occlusion(head)
    maps = []
    with attribution_mode(model), torch.no_grad():
        targets = check_targets(head, images, targets, batch_size)
        for part in chunks(len(images), batch_size):
            x = images[part].to(model.device)
            attr = occ.attribute(
                x,
                sliding_window_shapes=(3, window, window),
                strides=(3, stride, stride),
                baselines=baseline_images(x, baseline),
                target=targets[part],
                perturbations_per_eval=max(1, batch_size // len(x)),
            )
            maps.append(attr.mean(dim=1).cpu())
    return normalise(torch.cat(maps))


# --------------------------------------------------------------------------- first-order occlusion


def _log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of every class: its logit minus the log-sum-exp of the others. Its gradient is that of
    log p scaled by 1 / (1 - p), so it ranks pixels alike but does not vanish on a confident prediction."""
    c = logits.shape[-1]
    if c == 1:
        return logits
    others = (
        logits.unsqueeze(1)
        .expand(-1, c, -1)
        .masked_fill(torch.eye(c, dtype=torch.bool, device=logits.device), float("-inf"))
    )
    return logits - others.logsumexp(-1)


def _or_zero(attribute: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``attribute()``, or zeros shaped like ``like`` for a model whose output does not depend differentiably on the
    pixels (autograd's "does not require grad"; the forward has run by then)."""
    try:
        return attribute()
    except RuntimeError as err:
        if "does not require grad" not in str(err):
            raise
        return torch.zeros_like(like)


def occlusion_estimate_signed(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    targets: Targets,
    baseline: Baseline = "mean",
    steps: int = 1,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-pixel estimate of how much replacing that pixel by the baseline lowers the target's log-odds.

    ``(x - baseline) . mean of d log(p / (1 - p)) / dx`` over ``steps`` points on the straight path from the baseline
    to the image (captum ``IntegratedGradients``; ``steps=1`` is input x gradient at the image itself),
    summed over colour channels: N x S x S, signed, unnormalised, so a window's estimated drop is the sum
    over it. Averaging along the path keeps a saturated trigger (zero gradient at the image) visible.
    A few backward passes per image instead of one forward per occluder placement; on the demo it
    concentrates on a pasted trigger more than occlusion does (bench/attribution_mass.py).
    """
    images = check_images(model, images)
    if steps < 1:
        raise ForensicsError(f"steps must be at least 1, got {steps}")
    head = ZeroShotHead(model, class_emb)
    log_odds = lambda x: _log_odds(head(x))  # noqa: E731
    maps = []
    with attribution_mode(model):
        targets = check_targets(head, images, targets, batch_size)
        for part in chunks(len(images), max(1, batch_size // steps)):
            x = images[part].to(model.device)
            base = baseline_images(x, baseline)
            if steps == 1:
                method = InputXGradient(lambda shifted, base=base: log_odds(shifted + base))
                attr = _or_zero(lambda: method.attribute((x - base).requires_grad_(True), target=targets[part]), x)
            else:
                attr = _or_zero(
                    lambda: IntegratedGradients(log_odds).attribute(
                        x,
                        baselines=base,
                        target=targets[part],
                        n_steps=steps,
                        method="riemann_trapezoid",
                        internal_batch_size=len(x) * steps,
                    ),
                    x,
                )
            maps.append(attr.detach().sum(dim=1).cpu())
    return torch.cat(maps)


def predict_and_estimate(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    baseline: Baseline = "mean",
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (N x C) and, for each image's own prediction, the estimate of
    :func:`occlusion_estimate_signed` (``steps=1``), from one forward+backward per batch.

    The scan's first pass needs both; predicting first (to know the targets) costs a forward of every image
    more. The forward captum differentiates keeps its logits and returns the log-odds of their argmax (a
    piecewise-constant choice, so the gradient is the predicted class's, as with ``targets=`` the prediction).
    """
    images = check_images(model, images)
    head = ZeroShotHead(model, class_emb)
    probs, maps = [], []
    with attribution_mode(model):
        for part in chunks(len(images), batch_size):
            x = images[part].to(model.device)
            base = baseline_images(x, baseline)
            seen: list[torch.Tensor] = []

            def predicted_log_odds(shifted: torch.Tensor, base: torch.Tensor = base, seen: list = seen) -> torch.Tensor:
                logits = head(shifted + base)
                seen.append(logits.detach())
                return _log_odds(logits).gather(1, logits.argmax(-1, keepdim=True))

            method = InputXGradient(predicted_log_odds)
            attr = _or_zero(lambda: method.attribute((x - base).requires_grad_(True), target=0), x)
            probs.append(seen[-1].softmax(-1).cpu())
            maps.append(attr.detach().sum(dim=1).cpu())
    return torch.cat(probs), torch.cat(maps)


@ATTRIBUTIONS.register(name="occlusion-estimate")
def occlusion_estimate(
    model: Any,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    targets: Targets,
    baseline: Baseline = "mean",
    steps: int = 1,
    batch_size: int = 32,
) -> torch.Tensor:
    """:func:`occlusion_estimate_signed`, positive part, each map divided by its max: N x S x S in [0, 1]."""
    return normalise(occlusion_estimate_signed(model, images, class_emb, targets, baseline, steps, batch_size))
