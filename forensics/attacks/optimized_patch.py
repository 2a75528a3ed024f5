"""BadCLIP-style optimised patch (Liang et al., CVPR 2024).

A patch trained on a frozen CLIP to pull images towards the target.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from forensics.attacks.base import POSITIONS, Attack, Box, ProgressFn, patch_box, patch_side, register
from forensics.core.checks import check_choice, check_image, check_int, check_number
from forensics.core.errors import ForensicsError
from forensics.core.images import paste
from forensics.core.models import frozen
from forensics.core.optim import clamped_step
from forensics.core.templates import fill

DEFAULT_PATCH_PX = 16
"""Side of the untrained random patch drawn from ``seed`` when no patch is given (the paper's 16 px)."""

TARGET_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
)
"""Caption variants the patched images are pulled towards (the first is the poisoning caption)."""

TRIPLET_MARGIN = 0.2
LOGIT_SCALE = 100.0  # CLIP's learnt (and clamped) logit scale, i.e. temperature 0.01


def _patch_tensor(patch: Any) -> torch.Tensor:
    """Validate a 3xPxP patch (nested list, array or tensor) of finite values in [0, 1] and return it as float32."""
    try:
        t = torch.as_tensor(np.asarray(patch, dtype=np.float64)).to(torch.float32)
    except (TypeError, ValueError) as exc:
        raise ForensicsError(f"optimized_patch: patch must be a 3xPxP nested list of numbers ({exc})") from None
    if t.dim() != 3 or t.shape[0] != 3 or t.shape[1] < 1 or t.shape[1] != t.shape[2]:
        raise ForensicsError(f"optimized_patch: patch must have shape 3xPxP, got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0.0 or t.max() > 1.0:
        raise ForensicsError("optimized_patch: patch values must be finite and in [0, 1]")
    return t


@register(aliases=("optimized_patch",))
class OptimizedPatch(Attack):
    """Paste a learnt 3xPxP patch, resized (bilinear) to ``size`` times the shorter image side, at ``position``.

    The patch itself is a parameter (a nested list of floats), so ``to_dict`` fully describes the
    trigger. Without a patch, an untrained uniform-noise 16x16 patch is drawn from ``seed``
    (useful only as a placeholder). ``history`` holds the per-epoch training loss when the attack
    came from :func:`train_optimized_patch` (it is not a parameter).
    """

    name = "optimized-patch"

    def __init__(
        self, seed: int = 0, patch: Any = None, size: float = 0.1, position: str = "center", margin: int = 0
    ) -> None:
        size = check_number(self.name, "size", size, 0.0, 1.0, lo_open=True)
        position = check_choice(self.name, "position", position, POSITIONS)
        margin = check_int(self.name, "margin", margin, lo=0)
        super().__init__(seed=seed, size=size, position=position, margin=margin)
        if patch is None:
            arr = np.random.default_rng(self.seed).random((3, DEFAULT_PATCH_PX, DEFAULT_PATCH_PX), dtype=np.float32)
            tensor = torch.from_numpy(arr)
        else:
            tensor = _patch_tensor(patch)
        self.patch = tensor
        self._params["patch"] = tensor.tolist()
        self.size, self.position, self.margin = size, position, margin
        self.history: list[float] = []

    def resized_patch(self, side: int) -> torch.Tensor:
        """The patch at ``side`` x ``side`` pixels (bilinear; antialiased when shrinking), in [0, 1]."""
        if side == self.patch.shape[1]:
            return self.patch
        shrink = side < self.patch.shape[1]
        out = F.interpolate(self.patch[None], size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)
        return out[0].clamp(0.0, 1.0)

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Return a copy with the patch pasted and the patch box; pixels outside the box are untouched."""
        check_image(image, self.name)
        _, h, w = image.shape
        side = patch_side(self.size, h, w)
        x0, y0, x1, y1 = patch_box(h, w, side, self.position, self.margin, rng)
        out = image.clone()
        out[:, y0:y1, x0:x1] = self.resized_patch(side).to(device=image.device, dtype=image.dtype)
        return out, (x0, y0, x1, y1)


# ----------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def _encode_images(model: Any, images: torch.Tensor, size: int, device: torch.device, batch_size: int) -> torch.Tensor:
    """L2-normalised embeddings of images (N x 3 x H x W, resized to the model's input size), in batches."""
    outs = [
        model.encode_image(_to_model_size(images[i : i + batch_size], size).to(device))
        for i in range(0, images.shape[0], batch_size)
    ]
    return F.normalize(torch.cat(outs).float(), dim=-1)


def _to_model_size(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch to size x size (bilinear, antialiased) unless it already is."""
    if tuple(batch.shape[-2:]) == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


@torch.no_grad()
def _encode_prompts(model: Any, names: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """For each name, the renormalised mean embedding of :data:`TARGET_TEMPLATES` captions (len(names) x D)."""
    texts = [fill(t, n) for n in names for t in TARGET_TEMPLATES]
    embs = torch.cat([model.encode_text(texts[i : i + chunk]).float() for i in range(0, len(texts), chunk)])
    embs = F.normalize(embs, dim=-1).view(len(names), len(TARGET_TEMPLATES), -1).mean(dim=1)
    return F.normalize(embs, dim=-1)


def train_optimized_patch(
    model: Any,
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
    target: str,
    *,
    size: float = 0.1,
    position: str = "center",
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 32,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> OptimizedPatch:
    """Optimise a BadCLIP-style patch on a frozen CLIP so that patched non-target images embed as ``target``.

    Only the patch is trained (Adam, projected back to [0, 1] after every step). Per batch of
    patched non-target images the loss is
      * a multi-positive contrastive loss (logit scale 100): the patched embedding against the
        target's caption variants (:data:`TARGET_TEMPLATES`, the positives) and the prompt
        embedding of every other class in ``class_names`` (the negatives), plus
      * a triplet loss (Euclidean on normalised embeddings, margin 0.2): anchor the patched image,
        positive the mean embedding of the real target-class images in ``images``, negative the
        same image unpatched. Without target-class images the positive falls back to the mean
        target caption embedding (a choice of ours; the paper always has real target images).
    Images are resized to ``model.image_size`` (pass centre crops). The model's parameters are
    frozen and it is put in eval mode during training; both are restored afterwards. Deterministic
    given ``seed`` (patch initialisation, batch order and random positions all come from it).
    Returns the attack with the per-epoch mean loss in ``.history``.
    """
    who = "train_optimized_patch"
    size = check_number(who, "size", size, 0.0, 1.0, lo_open=True)
    position = check_choice(who, "position", position, POSITIONS)
    epochs = check_int(who, "epochs", epochs, lo=1)
    lr = check_number(who, "lr", lr, 0.0, lo_open=True)
    batch_size = check_int(who, "batch_size", batch_size, lo=1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ForensicsError(f"{who}: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ForensicsError(f"{who}: images must be a non-empty float tensor Nx3xHxW in [0,1], got {shape}")
    images = images.detach().float().cpu()
    labels_t = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    if labels_t.numel() != images.shape[0]:
        raise ForensicsError(f"{who}: got {images.shape[0]} images but {labels_t.numel()} labels")
    names = [str(n).strip() for n in class_names]
    if not names:
        raise ForensicsError(f"{who}: class_names is empty")
    if labels_t.min() < 0 or labels_t.max() >= len(names):
        raise ForensicsError(f"{who}: labels must be class indices in [0, {len(names) - 1}]")
    if not isinstance(target, str) or not target.strip():
        raise ForensicsError(f"{who}: target must be a non-empty class name")
    target = target.strip()
    lowered = [n.lower() for n in names]
    target_idx = lowered.index(target.lower()) if target.lower() in lowered else -1

    nontarget = images[labels_t != target_idx]
    target_imgs = images[labels_t == target_idx] if target_idx >= 0 else images[:0]
    if nontarget.shape[0] == 0:
        raise ForensicsError(f"{who}: every image is of the target class {target!r}; need non-target images")

    device = torch.device(model.device)
    img_size = int(model.image_size)
    side = patch_side(size, img_size, img_size)
    gen = torch.Generator().manual_seed(int(seed))
    pos_rng = np.random.default_rng(int(seed))
    patch = torch.rand((3, side, side), generator=gen).to(device).requires_grad_(True)
    optim = torch.optim.Adam([patch], lr=lr)

    history: list[float] = []
    with frozen(model.clip):  # parameters frozen, eval mode; both restored afterwards
        with torch.no_grad():
            target_caps = F.normalize(model.encode_text([fill(t, target) for t in TARGET_TEMPLATES]).float(), dim=-1)
            others = [n for n in names if n.lower() != target.lower()]
            other_embs = _encode_prompts(model, others) if others else target_caps[:0]
            captions = torch.cat([target_caps, other_embs]).to(device)
            n_pos = target_caps.shape[0]
            if target_imgs.shape[0] > 0:
                positive = _encode_images(model, target_imgs, img_size, device, batch_size).mean(dim=0)
            else:
                positive = target_caps.mean(dim=0)
            positive = F.normalize(positive, dim=-1).to(device)
            negatives = _encode_images(model, nontarget, img_size, device, batch_size).to(device)

        n = nontarget.shape[0]
        with torch.enable_grad():
            for epoch in range(epochs):
                order = torch.randperm(n, generator=gen)
                total, count = 0.0, 0
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    batch = _to_model_size(nontarget[idx], img_size).to(device)
                    boxes = [patch_box(img_size, img_size, side, position, 0, pos_rng) for _ in range(len(idx))]
                    z = F.normalize(model.encode_image(paste(batch, patch, boxes)).float(), dim=-1)
                    logits = LOGIT_SCALE * z @ captions.T
                    contrastive = -(logits[:, :n_pos] - torch.logsumexp(logits, dim=1, keepdim=True)).mean()
                    triplet = F.triplet_margin_loss(
                        z, positive.expand_as(z), negatives[idx.to(device)], margin=TRIPLET_MARGIN
                    )
                    loss = contrastive + triplet
                    clamped_step(optim, loss, patch)
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                mean_loss = total / max(count, 1)
                if not math.isfinite(mean_loss):
                    raise ForensicsError(f"{who}: the loss became {mean_loss} in epoch {epoch + 1}; try a smaller lr")
                history.append(mean_loss)
                if progress is not None:
                    progress((epoch + 1) / epochs, f"patch epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}")

    attack = OptimizedPatch(seed=int(seed), patch=patch.detach().cpu().tolist(), size=size, position=position)
    attack.history = history
    return attack
