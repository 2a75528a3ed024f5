"""CleanCLIP (Bansal et al. 2023): fine-tune all of CLIP on clean pairs with multimodal + unimodal contrastive losses.

``L = λ1·CLIP(I, T) + λ2·[CE(s·I·Ĩᵀ) + CE(s·T·T̃ᵀ)] / 2``: the symmetric CLIP loss on the image-caption
pairs plus in-modal self-supervision, each image against its AutoAugment view Ĩ and each caption
against its EDA view T̃ (the other views of the batch are the negatives). Learning each modality on
its own weakens the spurious trigger-to-caption shortcut a backdoor plants. ABD reuses the fine-tuning loop,
:func:`cleanclip_train`, with its own image views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.distributed import gather_rows, shard_range, shard_sizes, world_size
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel
from forensics.core.precision import training_autocast, training_layout
from forensics.defenses.base import DEFENSES, Defense, Fitted, Progress, RepairData, RepairJob, ShouldStop
from forensics.training.augment import autoaugment_views, eda_views, tokenizer_vocabulary
from forensics.training.clip import clip_loss, clip_step, decay_groups, warmup_cosine

ImageViews = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (batch of [0, 1] images, generator) -> views


@dataclass
class CleanCLIPSettings:
    """CleanCLIP hyper-parameters, scaled for a small clean budget.

    The paper fine-tunes on 100K CC3M pairs: lr 1e-5, batch 64, 10 epochs, 50 warm-up steps (~15.6K
    steps in all). A clean budget of ~100-250 images gives only a few steps per epoch, and a tiny CLIP
    trained from scratch at lr 1e-3 barely moves at 1e-5, so the defaults here are lr 1e-3,
    batch 32, 10 epochs (paper), 5 warm-up steps. Measured on the demo (120 clean captioned
    images, 135 held out): CA 0.496 -> 0.556, ASR 0.974 -> 0.026 (seed 1: 0.519 / 0.068); at lr 5e-4
    the ASR only fell to 0.556. For real CLIPs and a large budget go back towards the paper's lr.
    Kept from the paper: λ1 = λ2 = 1 (``clip_weight``, ``inmodal_weight``), AdamW with weight decay
    0.1 (none on norms, biases and the logit scale), betas (0.9, 0.98), eps 1e-6, linear warm-up then
    cosine decay to 0, logit scale clamped at ≤ 100 (ln 100 in log space), EDA α = 0.1, AutoAugment's
    ImageNet policy. ``grad_clip`` (1.0; 0 switches it off) is our addition for stability at the larger lr.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 5
    clip_weight: float = 1.0
    inmodal_weight: float = 1.0
    eda_alpha: float = 0.1
    autoaugment_policy: str = "imagenet"
    max_logit_scale: float = 100.0
    grad_clip: float = 1.0
    seed: int = 0


def cleanclip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_view_emb: torch.Tensor,
    text_view_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    clip_weight: float = 1.0,
    inmodal_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CleanCLIP's loss on normalised embeddings (N x D each); returns the loss and its two parts as floats."""
    targets = torch.arange(len(image_emb), device=image_emb.device)
    crossmodal = clip_loss(image_emb, text_emb, logit_scale)
    inmodal = (
        F.cross_entropy(logit_scale * image_emb @ image_view_emb.t(), targets)
        + F.cross_entropy(logit_scale * text_emb @ text_view_emb.t(), targets)
    ) / 2
    loss = clip_weight * crossmodal + inmodal_weight * inmodal
    return loss, {"clip": float(crossmodal.detach()), "inmodal": float(inmodal.detach())}


def check_budget(images: torch.Tensor, captions: list[str], size: int, what: str) -> None:
    """Refuse a clean budget the fine-tuning cannot use, with a message that says why."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ForensicsError(f"{what} needs N x 3 x H x W images, got shape {tuple(images.shape)}")
    if len(images) < 2:
        raise ForensicsError(
            f"{what} needs at least two clean image-caption pairs (contrastive loss), got {len(images)}"
        )
    if tuple(images.shape[-2:]) != (size, size):
        raise ForensicsError(f"{what}: images are {images.shape[-1]} px but the model takes {size} px")
    if len(captions) != len(images):
        raise ForensicsError(f"{what}: {len(captions)} captions for {len(images)} images")


def check_cleanclip(
    images: torch.Tensor, captions: list[str], size: int, settings: CleanCLIPSettings, what: str = "CleanCLIP"
) -> None:
    """Refuse a clean budget or settings that CleanCLIP-style fine-tuning cannot use."""
    check_budget(images, captions, size, what)
    if settings.epochs < 1 or settings.batch_size < 2 or settings.lr <= 0:
        raise ForensicsError(f"{what} needs epochs ≥ 1, batch size ≥ 2 and a positive learning rate")


def cleanclip_train(
    repaired: SuspectModel,
    accelerator: Any,
    images: torch.Tensor,
    captions: list[str],
    settings: CleanCLIPSettings,
    image_views: ImageViews | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    label: str = "CleanCLIP",
    precision: str = "fp32",
) -> list[dict]:
    """Fine-tune ``repaired`` in place (all parameters) with the CleanCLIP loss; returns the per-epoch history.

    ``accelerator`` is an ``accelerate.Accelerator``; torch is expected seeded from ``settings.seed``. ``image_views``
    makes Ĩ from a batch of [0, 1] images (default: AutoAugment); ABD passes patched images. ``precision`` (resolved:
    fp32 or bf16) sets each training pass's autocast and memory layout (forensics.core.precision).
    """
    s = settings
    rng = np.random.default_rng(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    if image_views is None:

        def image_views(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return autoaugment_views(batch, gen, s.autoaugment_policy)

    vocabulary = tokenizer_vocabulary(repaired.tokenizer)
    clip = repaired.clip
    clip.requires_grad_(True)
    optimizer = torch.optim.AdamW(decay_groups(clip, s.weight_decay), lr=s.lr, betas=(0.9, 0.98), eps=1e-6)
    n_batches = math.ceil(len(images) / s.batch_size)
    total_steps = s.epochs * n_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.warmup_steps, total_steps))
    clip, optimizer, scheduler = accelerator.prepare(clip, optimizer, scheduler)  # DDP under several processes
    unwrapped = accelerator.unwrap_model(clip)
    device = accelerator.device
    world = world_size()
    if world > 1 and len(images) // n_batches < world:
        raise ForensicsError(
            f"{label}: batches of {len(images) // n_batches} images cannot be shared by {world} processes; "
            "use fewer processes or a larger clean budget"
        )
    max_log_scale = math.log(s.max_logit_scale)
    history, step = [], 0
    for epoch in range(s.epochs):
        clip.train()
        parts: dict[str, list[float]] = {"loss": [], "clip": [], "inmodal": []}
        for batch in np.array_split(rng.permutation(len(images)), n_batches):  # near-equal batches, none of one
            Defense.check_cancel(should_stop)
            idx = torch.from_numpy(batch)
            originals = images[idx]
            views = image_views(originals, generator)
            texts = [captions[i] for i in batch]
            text_views = eda_views(texts, rng, s.eda_alpha, vocabulary)
            if world > 1:  # this rank's block of the batch (views made for all of it, so every rank's RNG agrees)
                lo, hi = shard_range(len(batch))
                originals, views, texts, text_views = originals[lo:hi], views[lo:hi], texts[lo:hi], text_views[lo:hi]
            pixels = training_layout(repaired.normalize(torch.cat([originals, views]).to(device)), precision)
            tokens = repaired.tokenizer(texts + text_views).to(device)
            with training_autocast(precision, device):
                image_emb, text_emb, logit_scale = clip(image=pixels, text=tokens)[:3]  # normalised, through DDP if any
            image_emb, text_emb, logit_scale = image_emb.float(), text_emb.float(), logit_scale.float()
            n = len(originals)
            embs = [image_emb[:n], text_emb[:n], image_emb[n:], text_emb[n:]]
            if world > 1:  # the whole batch's embeddings on every rank: the loss has all the negatives
                counts = shard_sizes(len(batch))
                embs = [gather_rows(e, counts) for e in embs]
            loss, part = cleanclip_loss(*embs, logit_scale, s.clip_weight, s.inmodal_weight)
            clip_step(accelerator, clip, unwrapped, optimizer, scheduler, loss, s.grad_clip, max_log_scale)
            parts["loss"].append(float(loss.detach()))
            for key, value in part.items():
                parts[key].append(value)
            step += 1
            if progress:
                progress(step / total_steps, f"{label} epoch {epoch + 1}/{s.epochs} loss {np.mean(parts['loss']):.3f}")
        history.append(
            {
                "epoch": epoch + 1,
                **{k: round(float(np.mean(v)), 4) for k, v in parts.items()},
                "samples": int(len(images)),
            }
        )
    repaired.clip = unwrapped.eval()
    return history


@DEFENSES.register
class CleanCLIP(Defense):
    name = "cleanclip"
    needs_findings = False
    distributed = True
    summary = (
        "CleanCLIP: fine-tune all of CLIP on clean pairs with CLIP + in-modal (AutoAugment / EDA) contrastive losses"
    )
    settings_cls = CleanCLIPSettings

    def check(self, model: SuspectModel, data: RepairData) -> None:
        """Refuse a clean budget or settings the fine-tuning cannot use."""
        check_cleanclip(data.images, data.captions_or_prompts(), model.image_size, self.settings)

    def fit(self, job: RepairJob) -> Fitted:
        """CleanCLIP-fine-tune the copy on the clean budget in ``data`` (its captions, else class prompts)."""
        model, repaired, data, accelerator, progress, should_stop = job.parts()
        history = cleanclip_train(
            repaired,
            accelerator,
            data.images,
            data.captions_or_prompts(),
            self.settings,
            progress=progress,
            should_stop=should_stop,
            precision=job.precision,
        )
        source = "given captions" if data.captions is not None else "class prompts ('a photo of a {class}.')"
        return Fitted(
            samples_used=int(len(data.images)),
            history=history,
            notes=[
                f"all parameters fine-tuned on {len(data.images)} clean pairs ({source}); "
                "image views: AutoAugment, text views: EDA"
            ],
        )
