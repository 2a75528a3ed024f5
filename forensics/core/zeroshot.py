"""Zero-shot classification with cached class text embeddings; clean accuracy (CA) and attack success rate (ASR).

CA is top-1 accuracy on clean images. ASR applies the trigger to every image whose true class
is not the target and counts predictions of the target; target-class images are always excluded.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.distributed import gather, shard_range
from forensics.core.errors import ForensicsError
from forensics.core.images import blend
from forensics.core.models import SuspectModel
from forensics.core.templates import fill, resolve_templates

ASR_NOTE = "ASR excludes images whose true class is the target; it is the share of the others predicted as the target"
Progress = Callable[[float, str], None]


def class_text_embeddings(
    model: SuspectModel, class_names: Sequence[str], templates: Sequence[str] | str | None = None
) -> torch.Tensor:
    """C x D class embeddings: mean of the normalised template embeddings, renormalised; cached per model.

    A model with learnt prompts (``model.class_prompts``, e.g. from CBPT) uses them instead of the templates
    when ``class_names`` are exactly the learnt classes, in order: its prompts are its classifier.
    """
    if not class_names:
        raise ForensicsError("no class names given")
    prompts = getattr(model, "class_prompts", None)
    if prompts and list(class_names) == list(prompts["class_names"]):
        cache = model.__dict__.setdefault("text_cache", {})
        key = ("learnt-prompts", tuple(class_names))
        if key not in cache:
            from forensics.core.prompts import learned_class_embeddings  # prompts import models, as we do

            with torch.no_grad():
                cache[key] = learned_class_embeddings(model)
        return cache[key]
    templates = resolve_templates(templates if templates is None or isinstance(templates, str) else list(templates))
    cache = model.__dict__.setdefault("text_cache", {})
    key = (tuple(class_names), tuple(templates))
    if key not in cache:
        with torch.no_grad():
            rows = []
            for name in class_names:
                emb = model.encode_text([fill(t, name) for t in templates])
                rows.append(F.normalize(emb.mean(0), dim=-1))
            cache[key] = torch.stack(rows)
    return cache[key]


def zero_shot_logits(model: SuspectModel, images: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-class logits, 100 * cos(image, class); differentiable (used by attribution and attacks)."""
    return 100.0 * model.encode_image(images) @ class_embeddings.to(model.device).t()


@torch.no_grad()
def predict(
    model: SuspectModel, images: torch.Tensor, class_embeddings: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Softmax probabilities (N x C) for [0, 1] images, in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(zero_shot_logits(model, images[start : start + batch_size], class_embeddings).softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(class_embeddings))


def apply_attack_batch(attack, images: torch.Tensor, seed: int, first_index: int = 0) -> torch.Tensor:
    """Apply an attack image by image with a per-image seeded generator (same result in any batching)."""
    out = []
    for offset, image in enumerate(images):
        rng = np.random.default_rng([seed, first_index + offset])
        out.append(attack.apply(image, rng)[0])
    return torch.stack(out) if out else images


def evaluate(
    model: SuspectModel,
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    attack=None,
    target: str | None = None,
    templates: Sequence[str] | str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    distributed: bool = False,
) -> dict:
    """CA on ``images`` (clean, labelled) and, given an attack and target, ASR on the non-target ones.

    ``distributed``: every process of a launcher calls this on the same images; each predicts its contiguous
    share (per-image attack seeds as in one process) and the predictions are gathered, so all get the same result.
    """
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if len(images) == 0:
        raise ForensicsError("no clean labelled images to evaluate")
    class_emb = class_text_embeddings(model, class_names, templates)
    lo, hi = shard_range(len(images)) if distributed else (0, len(images))
    probs = []
    for start in range(lo, hi, batch_size):
        probs.append(predict(model, images[start : min(hi, start + batch_size)], class_emb, batch_size))
        if progress:
            progress(min(1.0, (start - lo + batch_size) / max(1, hi - lo)) * (0.5 if attack else 1.0), "clean accuracy")
    pred = torch.cat(probs).argmax(-1) if probs else torch.empty(0, dtype=torch.long)
    if distributed:
        pred = torch.cat(gather(pred))
    result = {
        "ca": float((pred == labels).float().mean()),
        "n_clean": int(len(labels)),
        "asr": None,
        "n_attacked": 0,
        "attack": None,
        "target": None,
        "note": ASR_NOTE,
    }
    if attack is None:
        return result
    if target not in class_names:
        raise ForensicsError(f"target label {target!r} is not one of the classes ({', '.join(class_names)})")
    target_index = list(class_names).index(target)
    keep = torch.nonzero(labels != target_index).flatten()
    lo, hi = shard_range(len(keep)) if distributed else (0, len(keep))
    hits = 0
    for start in range(lo, hi, batch_size):
        idx = keep[start : min(hi, start + batch_size)]
        triggered = apply_attack_batch(attack, images[idx], seed, start)
        hits += int((predict(model, triggered, class_emb, batch_size).argmax(-1) == target_index).sum())
        if progress:
            progress(0.5 + 0.5 * min(1.0, (start - lo + batch_size) / max(1, hi - lo)), "attack success rate")
    if distributed:
        hits = sum(gather(hits))
    result.update(asr=hits / max(1, len(keep)), n_attacked=int(len(keep)), attack=attack.to_dict(), target=target)
    return result


@torch.no_grad()
def image_embeddings(model: SuspectModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings (N x D, on the model's device) in batches, without gradients."""
    with torch.no_grad():
        parts = [model.encode_image(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 1)


def predict_labels(
    model: SuspectModel, images: torch.Tensor, class_emb: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Zero-shot argmax labels for [0, 1] images (on the CPU)."""
    out = [
        (model.encode_image(images[i : i + batch_size]) @ class_emb.t()).argmax(-1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def flip_rate(
    model: SuspectModel,
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    target: str,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    templates: str | list[str] = "short",
) -> tuple[float, int]:
    """Share of the non-target images that the inverted trigger turns into ``target`` (and how many were tried)."""
    target_index = list(class_names).index(target)
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    keep = labels_t != target_index
    if not bool(keep.any()):
        return 0.0, 0
    class_emb = class_text_embeddings(model, list(class_names), templates).to(model.device)
    pred = predict_labels(model, blend(images[keep].to(model.device), mask, pattern), class_emb)
    return float((pred == target_index).float().mean()), int(keep.sum())
