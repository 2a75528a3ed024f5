"""ABD (arXiv 2409.15968): find a universal adversarial patch that behaves like a backdoor, then unlearn it
CleanCLIP-style.

Step 1, :func:`find_universal_patch`. The paper trains a patch generator with a discriminator and an
InfoNCE "backdoor loss" that compares the poisoned encoder with a clean one. We have no clean
encoder, so we optimise the patch pixels directly with an InfoNCE loss on the suspect model alone,
which asks the patch to do what a backdoor trigger does: for each patched image (pasted at a random
place, fresh every step), the positive is the centroid of the *other* patched images of the batch
and the negatives are the clean embeddings of the batch (its own clean image included). A patch
that wins this pulls every image it touches to one point, away from what the image shows; on a
backdoored model the trigger's shortcut is the easiest such point.

Step 2 reuses :func:`~forensics.defenses.cleanclip.cleanclip_train`: the CleanCLIP loss with the
patched images (the found patch pasted at fresh random places) as the image views and EDA captions
as the text views, so the model learns that the patch does not change what an image is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.distributed import broadcast
from forensics.core.errors import ForensicsError
from forensics.core.images import paste, random_boxes
from forensics.core.models import SuspectModel, frozen
from forensics.core.optim import clamped_step
from forensics.core.precision import training_autocast
from forensics.defenses.base import DEFENSES, Defense, Fitted, Progress, RepairData, RepairJob, ShouldStop
from forensics.defenses.cleanclip import CleanCLIPSettings, check_cleanclip, cleanclip_train

PAPER_PATCH_RATIO = 16 / 224  # the paper's 16 x 16 patch on 224 px images


def patch_side(image_size: int, ratio: float) -> int:
    """Patch side in pixels for a side ``ratio`` of the image (at least 2 px, at most the image)."""
    return int(min(image_size, max(2, round(ratio * image_size))))


def paste_patch(images: torch.Tensor, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paste ``patch`` (3 x k x k) onto each image at a random place drawn from ``generator`` (ys, then xs);
    differentiable in ``patch``."""
    n, _, h, w = images.shape
    return paste(images, patch, random_boxes(n, h, w, patch.shape[-1], generator))


def patch_infonce(patched: torch.Tensor, clean: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: each patched embedding vs the centroid of the other patched ones (positive) and all clean ones
    (negatives)."""
    n = len(patched)
    centroids = (patched.sum(0, keepdim=True) - patched) / max(1, n - 1)
    positive = (patched * F.normalize(centroids, dim=-1)).sum(-1, keepdim=True)
    logits = torch.cat([positive, patched @ clean.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=logits.device))


def find_universal_patch(
    model: SuspectModel,
    images: torch.Tensor,
    ratio: float = 0.1,
    steps: int = 60,
    batch_size: int = 32,
    lr: float = 0.05,
    temperature: float = 0.1,
    seed: int = 0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    stats: dict | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Optimise a universal patch (3 x k x k in [0, 1], returned on the CPU) on clean images so patched images all
    embed alike.

    A ``stats`` dict, when given, is filled with the search's statistics: side, first and last loss,
    the mean cosine among patched embeddings and between patched and clean ones, before and after. ``precision``
    (resolved: fp32 or bf16) sets each search step's autocast, as cleanclip_train's (forensics.core.precision).
    The model is left untouched (gradients go to the patch only, the tower stays in eval mode).
    """
    if images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
        raise ForensicsError("the patch search needs at least two clean N x 3 x H x W images")
    if not 0.0 < ratio <= 1.0 or steps < 1 or batch_size < 2:
        raise ForensicsError("the patch search needs 0 < ratio ≤ 1, steps ≥ 1 and batch size ≥ 2")
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = model.device
    k = patch_side(images.shape[-1], ratio)
    patch = torch.rand(3, k, k, generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([patch], lr=lr)
    stats = {} if stats is None else stats
    with frozen(model):  # gradients go to the patch only; flags and train/eval modes come back as they were
        with torch.no_grad():
            clean_all = torch.cat(
                [model.encode_image(images[i : i + 64].to(device)) for i in range(0, len(images), 64)]
            )

        def measure(tag: str) -> None:
            with torch.no_grad():
                view = paste_patch(images[:64].to(device), patch.detach(), torch.Generator().manual_seed(seed))
                z = model.encode_image(view)
                n = len(z)
                together = (z @ z.t()).sum().sub(n).div(n * (n - 1))
                stats[f"patched_cos_{tag}"] = round(float(together), 4)
                stats[f"patched_vs_clean_cos_{tag}"] = round(float((z * clean_all[:n]).sum(-1).mean()), 4)

        measure("before")
        losses = []
        for step in range(steps):
            Defense.check_cancel(should_stop)
            idx = torch.from_numpy(rng.choice(len(images), size=min(batch_size, len(images)), replace=False))
            batch = images[idx].to(device)
            with training_autocast(precision, device):
                patched = model.encode_image(paste_patch(batch, patch, generator))
            loss = patch_infonce(patched, clean_all[idx.to(device)], temperature)
            clamped_step(optimizer, loss, patch)
            losses.append(float(loss.detach()))
            if progress:
                progress(
                    (step + 1) / steps, f"ABD patch search step {step + 1}/{steps} loss {np.mean(losses[-10:]):.3f}"
                )
        measure("after")
        stats.update(side=k, loss_first=round(losses[0], 4), loss_last=round(float(np.mean(losses[-5:])), 4))
    return patch.detach().cpu()


@dataclass
class ABDSettings(CleanCLIPSettings):
    """ABD: patch search settings plus the CleanCLIP fine-tuning settings (defaults as :class:`CleanCLIPSettings`
    but lr 5e-4).

    ``patch_ratio`` 0.1: the paper's 16/224 ≈ 0.071 of the image side, a bit larger because at
    128 px that is only 9 px (a 9 px patch reached a weaker optimum in 60 steps on the demo);
    ``patch_steps`` 60 Adam steps (lr 0.05, batch 32) on the clean budget suffice for the tiny
    models (the paper trains a generator far longer on 100K images); ``patch_temperature`` 0.1 for
    the InfoNCE loss (our choice; the paper's is not known). ``lr`` 5e-4, half CleanCLIP's here:
    the patched views aim at the backdoor directly, so a gentler fine-tuning suffices and keeps more
    CA. Measured on the demo (120 clean captioned images, 135 held out): CA 0.496 -> 0.556, ASR
    0.974 -> 0.068, where CleanCLIP at the same lr only reached ASR 0.556.
    """

    patch_ratio: float = 0.1
    patch_steps: int = 60
    patch_lr: float = 0.05
    patch_batch_size: int = 32
    patch_temperature: float = 0.1
    lr: float = 5e-4


@DEFENSES.register
class ABD(Defense):
    name = "abd"
    needs_findings = False
    summary = "ABD: find a universal backdoor-like patch, then CleanCLIP fine-tuning with patched images as image views"
    settings_cls = ABDSettings
    distributed = True  # the fine-tuning is cleanclip_train's; the patch search is repeated on each rank
    last_patch: torch.Tensor | None = None  # the last repair's patch (3 x k x k), for callers that show or reuse it

    def check(self, model: SuspectModel, data: RepairData) -> None:
        """Refuse a clean budget or fine-tuning settings ABD cannot use (the patch search checks its own)."""
        check_cleanclip(data.images, data.captions_or_prompts(), model.image_size, self.settings, "ABD")

    def fit(self, job: RepairJob) -> Fitted:
        """Find the patch on ``model``, then fine-tune the copy; the patch's statistics are in the notes."""
        model, repaired, data, accelerator, progress, should_stop = job.parts()
        s = self.settings
        captions = data.captions_or_prompts()
        share = s.patch_steps / (s.patch_steps + 2 * s.epochs * max(1, int(np.ceil(len(data.images) / s.batch_size))))

        def part(lo: float, hi: float) -> Progress | None:
            return (lambda f, msg: progress(lo + (hi - lo) * f, msg)) if progress else None

        stats: dict = {}
        patch = find_universal_patch(
            model,
            data.images,
            s.patch_ratio,
            s.patch_steps,
            s.patch_batch_size,
            s.patch_lr,
            s.patch_temperature,
            s.seed,
            part(0.0, share),
            should_stop,
            stats,
            job.precision,
        )

        patch = broadcast(patch)  # searched alike on every rank (not shared out); rank 0's, to be sure they agree

        def patched_views(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return paste_patch(batch, patch.to(batch.device), generator)

        history = cleanclip_train(
            repaired,
            accelerator,
            data.images,
            captions,
            s,
            image_views=patched_views,
            progress=part(share, 1.0),
            should_stop=should_stop,
            label="ABD",
            precision=job.precision,
        )
        self.last_patch = patch
        notes = [
            f"universal patch {stats['side']} x {stats['side']} px, mean pixel {float(patch.mean()):.3f}; "
            f"patched-image cosine {stats['patched_cos_before']:.3f} -> {stats['patched_cos_after']:.3f}, "
            f"patched vs clean {stats['patched_vs_clean_cos_before']:.3f} -> "
            f"{stats['patched_vs_clean_cos_after']:.3f}",
            f"all parameters fine-tuned on {len(data.images)} clean pairs; image views: patched images, "
            "text views: EDA",
        ]
        return Fitted(samples_used=int(len(data.images)), history=history, notes=notes)
