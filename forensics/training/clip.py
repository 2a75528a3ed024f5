"""Contrastive CLIP training on an image-caption CSV: implanting a backdoor by training or fine-tuning.

Device placement goes through accelerate, so the same loop runs on a CPU, one GPU, or several
(``accelerate launch``). Progress is reported through a ``progress(fraction, message)`` callback.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from forensics.core.errors import ForensicsError
from forensics.core.images import load_image
from forensics.core.models import SuspectModel
from forensics.training.augment import augment_views, view_augmenter

Progress = Callable[[float, str], None]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the output sidecar)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    seed: int = 0
    max_logit_scale: float = 100.0
    grad_clip: float = 1.0
    augment: bool = False  # per-batch view augmentation (augment_views); off: the images as rendered

    def to_dict(self) -> dict:
        return asdict(self)


def read_caption_csv(csv_path: str | Path) -> list[dict[str, str]]:
    """Rows of an image-caption CSV (header with at least ``image`` and ``caption``); paths made absolute."""
    path = Path(csv_path)
    if not path.is_file():
        raise ForensicsError(f"data file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "image" not in fields or "caption" not in fields:
            raise ForensicsError(
                f"{path.name} needs a header with columns image,caption (found: {', '.join(fields) or 'none'})"
            )
        rows = list(reader)
    if not rows:
        raise ForensicsError(f"{path.name} has no rows")
    for row in rows:
        image = Path(row["image"])
        row["image"] = str(image if image.is_absolute() else (path.parent / image).resolve())
    return rows


class CaptionDataset(Dataset):
    """Images (decoded once, kept as uint8) with their tokenised captions."""

    def __init__(self, rows: list[dict[str, str]], model: SuspectModel, progress: Progress | None = None):
        size = model.image_size
        self.images = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
        for i, row in enumerate(rows):
            self.images[i] = (load_image(row["image"], size) * 255).round().to(torch.uint8)
            if progress and (i % 500 == 0 or i == len(rows) - 1):
                progress(0.0, f"reading images {i + 1}/{len(rows)}")
        self.tokens = model.tokenizer([row["caption"] for row in rows])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.tokens[index]


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching image/text embeddings."""
    logits = logit_scale * image_emb @ text_emb.t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups.

    No weight decay on norms, biases, 1-d parameters and the logit scale (as CLIP/CleanCLIP).
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name or "bn" in name or "ln" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Learning-rate factor.

    Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def clip_step(
    accelerator: Any,
    clip: torch.nn.Module,
    unwrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss: torch.Tensor,
    grad_clip: float,
    max_log_scale: float,
) -> None:
    """One optimiser step of CLIP training: backward, optional gradient clipping, step, schedule, logit-scale clamp."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(clip.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, max_log_scale)


def train_clip(
    model: SuspectModel,
    rows: list[dict[str, str]],
    config: TrainConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train all parameters of ``model`` with the CLIP loss on ``rows``; returns the per-epoch history."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(config.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dataset = CaptionDataset(rows, model, progress)
    if len(dataset) < 2:
        raise ForensicsError("training needs at least two image-caption pairs")
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset, batch_size=min(config.batch_size, len(dataset)), shuffle=True, drop_last=True, generator=generator
    )
    clip = model.clip
    clip.train()
    optimizer = torch.optim.AdamW(decay_groups(clip, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    total_steps = max(1, config.epochs * len(loader))

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    clip, optimizer, loader, scheduler = accelerator.prepare(clip, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(clip)
    mean = torch.tensor(model.mean, device=accelerator.device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=accelerator.device).view(1, 3, 1, 1)
    history, step, start = [], 0, time.time()
    max_log_scale = math.log(config.max_logit_scale)
    augmenter = view_augmenter(model.image_size) if config.augment else None
    for epoch in range(config.epochs):
        losses = []
        for images, tokens in loader:
            if should_stop and should_stop():
                raise ForensicsError("training cancelled")
            if augmenter is not None:
                images = augment_views(
                    images, augmenter
                )  # on the batch's device; parameters from torch's CPU generator
            pixels = (images.float() / 255.0 - mean) / std
            image_emb, text_emb, logit_scale = clip(pixels, tokens)[:3]  # through DDP when several GPUs
            loss = clip_loss(image_emb, text_emb, logit_scale)
            clip_step(accelerator, clip, unwrapped, optimizer, scheduler, loss, config.grad_clip, max_log_scale)
            losses.append(loss.item())
            step += 1
            if progress and (step % 10 == 0 or step == total_steps):
                progress(
                    step / total_steps,
                    f"epoch {epoch + 1}/{config.epochs} step {step}/{total_steps} loss {np.mean(losses[-10:]):.3f}",
                )
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1)})
        if on_epoch_end:
            clip.eval()
            on_epoch_end(epoch + 1, history[-1])
            clip.train()
    clip.eval()
    model.clip = unwrapped
    model.clip.eval()
    if hasattr(model, "text_cache"):
        model.text_cache.clear()
    return history
