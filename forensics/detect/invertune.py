"""InverTune's detection (arXiv 2506.12411, steps 1-2): find the backdoor's target label, then invert its trigger.

1. *Target identification by adversarial simulation.* A universal patch covering 3 % of the image
   (bottom-right corner) is optimised on clean labelled images to be as *untargeted* as possible:
   it maximises the cross-entropy of the true class (equivalently, minimises the true class's
   log-probability). A backdoored encoder offers the trigger's target as the easiest way out, so the
   patch drives predictions onto it; the class whose share of predictions rises most is the target.
   Our choice where the paper is terse: the loss uses the true labels (not the model's own clean
   predictions) and the zero-shot logits ``100 * cos``.
2. *Trigger inversion.* A mask ``m`` (1 x H x W by default, or 3 x H x W) and a pattern ``t`` blend into
   non-target images, ``x' = m * t + (1 - m) * x``, minimising
   ``5 CE(cos(f(x'), T) / 0.07, target) + 0.5 ||f(x') - f(x_target)|| + 1 (1 - SSIM(x', x)) + 0.01 ||m||_1``
   with Adam; ``m`` and ``t`` are clamped to [0, 1] after each step. ``f(x_target)`` is the mean
   embedding of the clean target-class images given (the target's text embedding when there are none).
   SSIM is a small hand-written Gaussian SSIM (11 px window, sigma 1.5, K = (0.01, 0.03), data range 1,
   valid convolution: pytorch_msssim's defaults; that package is not installed here).

Defaults follow the paper (Adam, loss weights, 3 % patch); the step counts, batch size (32, paper 64)
and learning rates (inversion 0.1, paper 0.01) are scaled so a CPU run on the tiny demo CLIP converges
in tens of steps. The model is never modified: its parameters are frozen only for the run and restored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from forensics.core.checks import check_labelled_images
from forensics.core.errors import ForensicsError
from forensics.core.images import blend, paste
from forensics.core.models import SuspectModel, frozen
from forensics.core.optim import clamped_step
from forensics.core.progress import Progress, ShouldStop, check_stop
from forensics.core.zeroshot import class_text_embeddings, flip_rate, predict_labels
from forensics.detect.findings import FlaggedLabel, InvertedTrigger


@dataclass
class InverTuneDetectSettings:
    """Detection settings. Paper: 3 % patch, Adam lr 0.01, batch 64, loss weights 5 / 0.5 / 1 / 0.01, tau 0.07.

    Scaled for CPU runs on tiny models: batch 32, 20 patch steps at lr 0.1, 40 inversion steps at lr 0.1.
    """

    patch_area: float = 0.03  # share of the image the adversarial patch covers (bottom-right)
    patch_steps: int = 20
    patch_lr: float = 0.1  # 0.05 sometimes stops at a natural adversarial class ('house' on the demo)
    inversion_steps: int = 40
    inversion_lr: float = 0.1  # paper 0.01 (hundreds of steps); 0.1 for tens of steps
    batch_size: int = 32  # paper 64
    mask_channels: int = 1  # 1: one mask for all channels; 3: per-channel mask as in the paper
    mask_init: float = 0.05
    ce_weight: float = 5.0
    feature_weight: float = 0.5
    ssim_weight: float = 1.0
    l1_weight: float = 0.01
    temperature: float = 0.07
    templates: str | list[str] = "short"
    seed: int = 0


@dataclass
class InverTuneDetection:
    """What the detection found: the target (with per-class shares), the inverted trigger and its tensors."""

    target: str
    identification: dict[str, Any]  # shares before/after the adversarial patch, rise, patch box
    flagged: FlaggedLabel
    trigger: InvertedTrigger
    mask: torch.Tensor  # c x H x W in [0, 1]
    pattern: torch.Tensor  # 3 x H x W in [0, 1]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe summary (tensors left out)."""
        return {
            "target": self.target,
            "identification": self.identification,
            "flagged": self.flagged.to_dict(),
            "trigger": self.trigger.to_dict(),
            "settings": self.settings,
        }


# --------------------------------------------------------------------------- helpers


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two image batches in [0, 1] (Gaussian window, valid convolution; pytorch_msssim's defaults)."""
    channels = a.shape[1]
    g = _gaussian_window(window, sigma).to(a.device, a.dtype)
    kx, ky = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, kx, groups=channels), ky, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean()


def patch_box(size: int, area: float) -> tuple[int, int, int, int]:
    """The bottom-right square (x0, y0, x1, y1) covering ``area`` of a ``size`` px image."""
    side = max(1, min(size, int(round(math.sqrt(area) * size))))
    return (size - side, size - side, size, size)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:batch_size]


# --------------------------------------------------------------------------- step 1: target identification


def identify_target(
    model: SuspectModel,
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    area: float = 0.03,
    steps: int = 20,
    lr: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
    templates: str | list[str] = "short",
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    stop_message: str = "detection cancelled",
) -> dict:
    """Optimise an untargeted universal patch (``area`` of the image, bottom-right) and name the class it floods.

    Returns ``{"target", "target_index", "share_before", "share_after", "rise", "box", "patch", "loss"}``; shares
    are per class name (fraction of the images predicted as that class without and with the patch).
    """
    labels_t = check_labelled_images(model, images, labels, class_names)
    if not 0 < area < 1:
        raise ForensicsError(f"the patch area must be a fraction of the image in (0, 1), got {area}")
    if steps < 1 or batch_size < 1:
        raise ForensicsError("steps and batch size must be positive")
    device = model.device
    box = patch_box(model.image_size, area)
    side = box[2] - box[0]
    gen = torch.Generator().manual_seed(int(seed))
    patch = torch.rand(3, side, side, generator=gen).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([patch], lr=lr)
    class_emb = class_text_embeddings(model, list(class_names), templates).detach().to(device)
    images = images.to(device)
    losses = []
    with frozen(model):
        for step in range(steps):
            check_stop(should_stop, stop_message)
            idx = _batches(len(images), batch_size, gen)
            logits = 100.0 * model.encode_image(paste(images[idx], patch, box)) @ class_emb.t()
            loss = -F.cross_entropy(logits, labels_t[idx].to(device))  # untargeted: push away from the true class
            clamped_step(optimizer, loss, patch)
            losses.append(float(loss.detach()))
            if progress:
                progress((step + 1) / steps, f"adversarial patch step {step + 1}/{steps}")
        before = predict_labels(model, images, class_emb)
        after = predict_labels(model, paste(images, patch.detach(), box), class_emb)
    n_classes = len(class_names)
    share_before = torch.bincount(before, minlength=n_classes).float() / len(images)
    share_after = torch.bincount(after, minlength=n_classes).float() / len(images)
    rise = share_after - share_before
    target_index = int(rise.argmax())
    names = list(class_names)
    return {
        "target": names[target_index],
        "target_index": target_index,
        "share_before": {c: round(float(v), 4) for c, v in zip(names, share_before)},
        "share_after": {c: round(float(v), 4) for c, v in zip(names, share_after)},
        "rise": {c: round(float(v), 4) for c, v in zip(names, rise)},
        "captured": int(((after == target_index) & (before != target_index)).sum()),
        "predicted": int((after == target_index).sum()),
        "box": list(box),
        "patch": patch.detach().cpu(),
        "loss": losses[-1],
        "objective": "untargeted: maximise CE(100 cos(f(x + patch), T), true label)",
    }


# --------------------------------------------------------------------------- step 2: trigger inversion


def invert_trigger(
    model: SuspectModel,
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    target: str,
    settings: InverTuneDetectSettings | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    stop_message: str = "detection cancelled",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Learn a mask and pattern that send non-target images to ``target`` while staying small and image-like.

    Returns ``(mask c x H x W, pattern 3 x H x W, stats)``; stats hold the final loss terms, the mask's L1
    and area, and the flip rate on the non-target images used for the inversion.
    """
    s = settings or InverTuneDetectSettings()
    labels_t = check_labelled_images(model, images, labels, class_names)
    names = list(class_names)
    if target not in names:
        raise ForensicsError(f"target label {target!r} is not one of the classes ({', '.join(names)})")
    if s.mask_channels not in (1, 3):
        raise ForensicsError(f"mask_channels must be 1 or 3, got {s.mask_channels}")
    if s.inversion_steps < 1 or s.batch_size < 1:
        raise ForensicsError("steps and batch size must be positive")
    target_index = names.index(target)
    others = images[labels_t != target_index]
    if len(others) == 0:
        raise ForensicsError(f"trigger inversion needs clean images of classes other than {target!r}")
    device = model.device
    size = model.image_size
    gen = torch.Generator().manual_seed(int(s.seed))
    mask = torch.full((s.mask_channels, size, size), float(s.mask_init)).to(device).requires_grad_(True)
    pattern = torch.rand(3, size, size, generator=gen).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask, pattern], lr=s.inversion_lr)
    class_emb = class_text_embeddings(model, names, s.templates).detach().to(device)
    others = others.to(device)
    terms: dict[str, float] = {}
    with frozen(model):
        own = images[labels_t == target_index]
        with torch.no_grad():
            anchor = model.encode_image(own.to(device)).mean(0) if len(own) else class_emb[target_index]
        goal = torch.full((min(s.batch_size, len(others)),), target_index, device=device)
        for step in range(s.inversion_steps):
            check_stop(should_stop, stop_message)
            x = others[_batches(len(others), s.batch_size, gen)]
            stamped = blend(x, mask, pattern)
            feats = model.encode_image(stamped)
            ce = F.cross_entropy(feats @ class_emb.t() / s.temperature, goal[: len(x)])
            dist = (feats - anchor).norm(dim=-1).mean()
            structure = 1 - ssim(stamped, x)
            l1 = mask.abs().sum()
            loss = s.ce_weight * ce + s.feature_weight * dist + s.ssim_weight * structure + s.l1_weight * l1
            clamped_step(optimizer, loss, mask, pattern)
            terms = {
                "loss": float(loss.detach()),
                "ce": float(ce.detach()),
                "feature_distance": float(dist.detach()),
                "one_minus_ssim": float(structure.detach()),
                "mask_l1": float(l1.detach()),
            }
            if progress:
                progress(
                    (step + 1) / s.inversion_steps,
                    f"trigger inversion step {step + 1}/{s.inversion_steps} loss {terms['loss']:.3f}",
                )
        mask_out, pattern_out = mask.detach().cpu(), pattern.detach().cpu()
        rate, n = flip_rate(model, images, labels_t.tolist(), names, target, mask_out, pattern_out, s.templates)
    stats = {
        **{k: round(v, 5) for k, v in terms.items()},
        "mask_area": round(float(mask_out.mean()), 5),
        "mask_pixels_over_half": int((mask_out.amax(0) > 0.5).sum()),
        "flip_rate": round(rate, 4),
        "n_flip": n,
        "steps": s.inversion_steps,
    }
    return mask_out, pattern_out, stats


# --------------------------------------------------------------------------- both steps


def run_invertune_detection(
    model: SuspectModel,
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    settings: InverTuneDetectSettings | None = None,
    target: str | None = None,
    verify_images: torch.Tensor | None = None,
    verify_labels: Sequence[int] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    stop_message: str = "detection cancelled",
) -> InverTuneDetection:
    """Identify the target (unless ``target`` is given) and invert its trigger, as typed findings.

    The trigger's verified flip rate is measured on ``verify_images`` (non-target ones) when given, else on
    the non-target images used for the inversion (optimistic: they were optimised on).
    """
    s = settings or InverTuneDetectSettings()
    names = list(class_names)
    check_labelled_images(model, images, labels, names)

    def part(lo: float, hi: float) -> Progress | None:
        return (lambda f, msg: progress(lo + (hi - lo) * f, msg)) if progress else None

    if target is None:
        ident = identify_target(
            model,
            images,
            labels,
            names,
            s.patch_area,
            s.patch_steps,
            s.patch_lr,
            s.batch_size,
            s.seed,
            s.templates,
            part(0.0, 0.3),
            should_stop,
            stop_message,
        )
        target = ident["target"]
        ident.pop("patch")
        rise = ident["rise"][target]
        flagged = FlaggedLabel(
            label=target,
            score=round(float(rise), 4),
            captured=ident["captured"],
            predicted=ident["predicted"],
            explanation=(
                f"an untargeted {s.patch_area:.0%} adversarial patch raised the share of "
                f"'{target}' predictions from {ident['share_before'][target]:.0%} to "
                f"{ident['share_after'][target]:.0%}, the largest rise of any class"
            ),
        )
    else:
        if target not in names:
            raise ForensicsError(f"target label {target!r} is not one of the classes ({', '.join(names)})")
        ident = {"target": target, "given": True}
        flagged = FlaggedLabel(
            label=target,
            score=1.0,
            captured=0,
            predicted=0,
            explanation="target given (flagged earlier); identification skipped",
        )
    mask, pattern, stats = invert_trigger(
        model,
        images,
        labels,
        names,
        target,
        s,
        part(0.3 if "given" not in ident else 0.0, 1.0),
        should_stop,
        stop_message,
    )
    if verify_images is not None:
        if verify_labels is None:
            raise ForensicsError("verification images need their labels")
        check_labelled_images(model, verify_images, verify_labels, names)
        with frozen(model):
            rate, n = flip_rate(model, verify_images, verify_labels, names, target, mask, pattern, s.templates)
        where = "held-out images"
    else:
        rate, n, where = stats["flip_rate"], stats["n_flip"], "the inversion images"
    trigger = InvertedTrigger(
        label=target,
        method="invertune",
        mask_area=stats["mask_area"],
        verified_asr=round(rate, 4),
        n_verified=n,
        verified_on=where,
        stats=stats,
    )
    return InverTuneDetection(
        target=target,
        identification=ident,
        flagged=flagged,
        trigger=trigger,
        mask=mask,
        pattern=pattern,
        settings=asdict(s),
    )
