"""SafeCLIP safe training (arXiv 2310.05862).

Train a CLIP on a possibly poisoned image-caption set without learning the poison.

Schedule: ``warmup_epochs`` of unimodal contrastive learning (images against augmented views of
themselves, captions against augmented captions; no image-caption loss, so poisoned pairs are
never matched). Then, before every epoch, the image-caption cosine of every pair is computed with
the current model and a seeded 2-component Gaussian mixture is fitted on them. The safe set is the
pairs likely to belong to the high-mean component: in the first epoch those with probability
>= ``first_threshold`` (0.9), later the top ``filter_ratio`` of pairs by that probability, the ratio
growing by ``ratio_step`` (0.01) per epoch up to ``max_filter_ratio`` (0.85). In each batch the CLIP
loss is applied to the safe pairs and the unimodal losses to the risky ones.

Our choices where the notes are silent: the starting ``filter_ratio`` (0.5); image views are a
random resized crop (scale 0.5-1), a horizontal flip and brightness/contrast jitter; caption views
drop and swap words (EDA's deletion and swap, alpha 0.1; no synonym lists, which need WordNet);
the unimodal temperature is CLIP's own logit scale, as in CleanCLIP. SafeCLIP's nearest-neighbour
pool and its data augmentation for the CLIP loss are left out.

Measured (fine-tuning the demo's clean twin, lr 1e-4, 1 warm-up + 2 safe epochs, on 200 demo probe
pairs of which 21 carry the demo's BadNet trigger captioned "a photo of a flower."): 18 and then 19
of the 21 poisoned pairs fall in the risky set while it holds 90 and then 100 of the 200 pairs.
From scratch the warm-up leaves images and captions unaligned, so the first GMM split is weak.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel
from forensics.core.tokenizer import split_words
from forensics.training.clip import (
    CaptionDataset,
    Progress,
    TrainConfig,
    clip_loss,
    clip_step,
    decay_groups,
    warmup_cosine,
)


def gmm_risk(cosines: np.ndarray, seed: int = 0, n_init: int = 5) -> tuple[np.ndarray, dict]:
    """Fit a seeded 2-component GMM on the cosines; return P(low-mean component) per pair and the fit's parameters."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(cosines, dtype=np.float64).reshape(-1, 1)
    if len(x) < 4:
        raise ForensicsError(f"a Gaussian-mixture audit needs at least 4 image-caption pairs, got {len(x)}")
    if float(x.std()) < 1e-8:
        return np.zeros(len(x)), {
            "means": [float(x.mean())] * 2,
            "stds": [0.0, 0.0],
            "weights": [1.0, 0.0],
            "note": "all cosines are equal: nothing to separate",
        }
    gmm = GaussianMixture(n_components=2, random_state=seed, n_init=n_init, reg_covar=1e-6).fit(x)
    means = gmm.means_.ravel()
    low = int(np.argmin(means))
    order = [low, 1 - low]
    risk = gmm.predict_proba(x)[:, low]
    return risk, {
        "means": [float(means[i]) for i in order],
        "stds": [float(np.sqrt(gmm.covariances_.ravel()[i])) for i in order],
        "weights": [float(gmm.weights_[i]) for i in order],
        "note": "component 0 is the low-mean (risky) one",
    }


@dataclass
class SafeClipSettings:
    """SafeCLIP schedule.

    Defaults: 1 unimodal warm-up epoch, first-epoch threshold 0.9, then a safe ratio from 0.5
    growing 0.01/epoch to 0.85.
    """

    warmup_epochs: int = 1
    first_threshold: float = 0.9
    filter_ratio: float = 0.5  # share of pairs kept safe in the second filtered epoch (our choice; not in our notes)
    ratio_step: float = 0.01
    max_filter_ratio: float = 0.85
    text_aug_alpha: float = 0.1  # EDA's alpha: share of words deleted / swapped in a caption view
    unimodal_weight: float = 1.0

    def check(self) -> None:
        """Raise ForensicsError on settings outside their ranges."""
        if self.warmup_epochs < 0:
            raise ForensicsError("warmup_epochs must be at least 0")
        for name in ("first_threshold", "filter_ratio", "max_filter_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ForensicsError(f"{name} must be in (0, 1], got {value}")


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of each [0, 1] image: resized crop (scale 0.5-1), horizontal flip, brightness/contrast jitter."""
    n, _, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        scale = 0.5 + 0.5 * float(torch.rand(1, generator=generator))
        ch, cw = max(8, round(h * math.sqrt(scale))), max(8, round(w * math.sqrt(scale)))
        y = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        view = F.interpolate(
            images[i : i + 1, :, y : y + ch, x : x + cw], size=(h, w), mode="bilinear", align_corners=False
        )[0]
        if float(torch.rand(1, generator=generator)) < 0.5:
            view = view.flip(-1)
        brightness, contrast = 1 + 0.4 * (torch.rand(2, generator=generator) - 0.5)
        mean = view.mean()
        out[i] = ((view - mean) * contrast + mean * brightness).clamp(0, 1)
    return out


def augment_caption(caption: str, rng: np.random.Generator, alpha: float = 0.1) -> str:
    """An EDA-style view of a caption: random deletion (p = alpha) and round(alpha * n) random swaps."""
    words = split_words(caption)
    if len(words) < 2:
        return caption
    kept = [w for w in words if rng.random() >= alpha] or [words[int(rng.integers(len(words)))]]
    for _ in range(max(1, round(alpha * len(kept)))):
        if len(kept) < 2:
            break
        a, b = rng.choice(len(kept), size=2, replace=False)
        kept[a], kept[b] = kept[b], kept[a]
    return " ".join(kept)


def unimodal_loss(emb: torch.Tensor, view_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE between each item and its own augmented view (the other items of the batch are negatives)."""
    return clip_loss(emb, view_emb, logit_scale)


@torch.no_grad()
def all_pair_cosines(
    clip: torch.nn.Module,
    dataset: CaptionDataset,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
) -> np.ndarray:
    """Image-caption cosine of every pair under the current model (eval mode)."""
    was_training = clip.training
    clip.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        pixels = (dataset.images[start : start + batch_size].to(device).float() / 255.0 - mean) / std
        image_emb, text_emb = clip(pixels, dataset.tokens[start : start + batch_size].to(device))[:2]
        out.append((image_emb * text_emb).sum(-1).float().cpu().numpy())
    clip.train(was_training)
    return np.concatenate(out).astype(np.float64)


def select_safe(
    cosines: np.ndarray, filtered_epoch: int, settings: SafeClipSettings, seed: int
) -> tuple[np.ndarray, float]:
    """The safe mask for one epoch and the ratio or threshold used.

    ``filtered_epoch`` counts from 0 after the warm-up.
    """
    risk, _ = gmm_risk(cosines, seed)
    p_clean = 1.0 - risk
    if filtered_epoch == 0:
        return p_clean >= settings.first_threshold, settings.first_threshold
    ratio = min(settings.max_filter_ratio, settings.filter_ratio + settings.ratio_step * (filtered_epoch - 1))
    k = max(0, min(len(cosines), int(round(ratio * len(cosines)))))
    order = np.lexsort((-cosines, -p_clean))  # most likely clean first; cosine breaks saturated ties
    safe = np.zeros(len(cosines), dtype=bool)
    safe[order[:k]] = True
    return safe, ratio


def safe_train_clip(
    model: SuspectModel,
    rows: list[dict[str, str]],
    config: TrainConfig,
    settings: SafeClipSettings | None = None,
    progress: Progress | None = None,
    should_stop=None,
) -> list[dict]:
    """Train ``model`` in place on ``rows`` with SafeCLIP's schedule.

    Returns the per-epoch history (safe-set sizes, poison in it).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    settings = settings or SafeClipSettings()
    settings.check()
    set_seed(config.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dataset = CaptionDataset(rows, model, progress)
    if len(dataset) < 4:
        raise ForensicsError("SafeCLIP training needs at least four image-caption pairs")
    captions = [r["caption"] for r in rows]
    flags = None
    if all(str(r.get("poisoned", "")).strip() != "" for r in rows):
        flags = np.array([str(r["poisoned"]).strip().lower() in ("1", "true", "yes") for r in rows])
    generator = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    text_rng = np.random.default_rng(config.seed)
    batch_size = min(config.batch_size, len(dataset))
    loader = DataLoader(
        torch.arange(len(dataset)), batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
    )
    clip = model.clip
    clip.train()
    optimizer = torch.optim.AdamW(decay_groups(clip, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    total_epochs = config.epochs
    total_steps = max(1, total_epochs * len(loader))

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    clip, optimizer, loader, scheduler = accelerator.prepare(clip, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(clip)
    device = accelerator.device
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    max_log_scale = math.log(config.max_logit_scale)
    history, step, start = [], 0, time.time()
    for epoch in range(total_epochs):
        warm = epoch < settings.warmup_epochs
        record: dict = {"epoch": epoch + 1, "phase": "unimodal warm-up" if warm else "safe"}
        if warm:
            safe = np.zeros(len(dataset), dtype=bool)
        else:
            cosines = all_pair_cosines(clip, dataset, mean, std, device)
            safe, cut = select_safe(cosines, epoch - settings.warmup_epochs, settings, config.seed)
            record.update(
                safe=int(safe.sum()),
                risky=int((~safe).sum()),
                **({"threshold": cut} if epoch == settings.warmup_epochs else {"filter_ratio": round(cut, 4)}),
            )
            if flags is not None:
                from sklearn.metrics import roc_auc_score

                record.update(poisoned_safe=int((safe & flags).sum()), poisoned_risky=int((~safe & flags).sum()))
                if flags.any() and (~flags).any():
                    record["auroc"] = round(float(roc_auc_score(flags, -cosines)), 4)
        safe_t = torch.from_numpy(safe)
        losses = []
        for idx in loader:
            if should_stop and should_stop():
                raise ForensicsError("training cancelled")
            idx = idx.cpu()
            images = dataset.images[idx].float() / 255.0
            tokens = dataset.tokens[idx]
            is_safe = safe_t[idx]
            loss = torch.zeros((), device=device)
            logit_scale = unwrapped.logit_scale.exp()
            if is_safe.sum() >= 2:
                pixels = (images[is_safe].to(device) - mean) / std
                image_emb, text_emb, scale = clip(pixels, tokens[is_safe].to(device))[:3]
                loss = loss + clip_loss(image_emb, text_emb, scale)
            risky = ~is_safe
            if risky.sum() >= 2 and settings.unimodal_weight:
                r_idx = idx[risky]
                both = torch.cat([images[risky], augment_images(images[risky], aug_gen)]).to(device)
                texts = [captions[i] for i in r_idx.tolist()]
                views = [augment_caption(c, text_rng, settings.text_aug_alpha) for c in texts]
                tok = model.tokenizer(texts + views).to(device)
                image_emb, text_emb = clip((both - mean) / std, tok)[:2]
                n = int(risky.sum())
                uni = (
                    unimodal_loss(image_emb[:n], image_emb[n:], logit_scale)
                    + unimodal_loss(text_emb[:n], text_emb[n:], logit_scale)
                ) / 2
                loss = loss + settings.unimodal_weight * uni
            if not loss.requires_grad:
                continue
            clip_step(accelerator, clip, unwrapped, optimizer, scheduler, loss, config.grad_clip, max_log_scale)
            losses.append(loss.item())
            step += 1
            if progress and (step % 5 == 0 or step == total_steps):
                progress(
                    min(1.0, step / total_steps),
                    f"epoch {epoch + 1}/{total_epochs} ({record['phase']}) loss {np.mean(losses[-10:]):.3f}",
                )
        record.update(loss=float(np.mean(losses)) if losses else None, seconds=round(time.time() - start, 1))
        history.append(record)
    clip.eval()
    model.clip = unwrapped
    model.clip.eval()
    model.__dict__.pop("text_cache", None)
    return history


def settings_dict(settings: SafeClipSettings) -> dict:
    """The settings as a plain dict (for sidecars and JSON output)."""
    return asdict(settings)
