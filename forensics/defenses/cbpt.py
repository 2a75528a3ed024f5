"""CBPT (arXiv 2502.19269): invert a dummy trigger by contrastive learning, then learn class-wise text prompts
against it.

No public code; our design from the paper's description:

1. *Contrastive trigger inversion.* A mask ``m`` (1 x H x W) and pattern ``t`` stamp images as
   ``x' = m * t + (1 - m) * x``. For each stamped image the other stamped images of the batch are the
   positives and the clean images (its own clean version included) the negatives, in an InfoNCE loss at
   temperature ``tau`` on the frozen CLIP's normalised image embeddings: a trigger makes stamped images
   alike and unlike their clean versions. A class term (cross-entropy of the stamped images towards the
   class they currently pile onto, re-chosen every step) pulls them towards one class, and
   ``size_weight * mean(m)`` keeps the mask small. No labels are used; the class the stamped images end
   on is reported as the suspected target.
2. *Prompt tuning with CLIP frozen.* Class-wise CoOp context vectors (``n_ctx`` x text width per class,
   initialised from the embeddings of "a photo of a" when that has ``n_ctx`` tokens, else N(0, 0.02))
   replace the placeholder words of the prompt "X X X X {class}." in the token embeddings; they are
   learnt so that clean *and* dummy-triggered budget images are classified as their true class
   (cross-entropy at logit scale 100, Adam, full batch: the image embeddings are computed once). Our
   addition for clean accuracy on a small budget: ``anchor_weight * mean(1 - cos)`` between each learnt
   class embedding and the suspect's plain template embedding of that class (12 images a class overfit).

The repaired model is the untouched CLIP plus ``SuspectModel.class_prompts``; ``zeroshot`` uses them
whenever the requested class names are exactly the learnt ones, and ``save_model``/``load_model`` keep them.
Paper-level details (steps, learning rates, temperature) are unknown; the defaults are chosen so a CPU
run on the tiny demo CLIP takes well under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from forensics.core.checks import check_labelled_images
from forensics.core.errors import ForensicsError
from forensics.core.images import blend
from forensics.core.models import SuspectModel, frozen
from forensics.core.optim import clamped_step
from forensics.core.progress import check_stop
from forensics.core.prompts import context_template, encode_text_with_context, initial_context, prompt_tokens
from forensics.core.zeroshot import class_text_embeddings, flip_rate, predict_labels
from forensics.defenses.base import CANCELLED, DEFENSES, Defense, Fitted, Progress, RepairData, RepairJob, ShouldStop
from forensics.detect.findings import InvertedTrigger


@dataclass
class CBPTSettings:
    """CBPT settings (paper values unknown; chosen for the tiny demo on a CPU, see the module docstring)."""

    inversion_steps: int = 40
    inversion_lr: float = 0.1
    batch_size: int = 32
    temperature: float = 0.1  # InfoNCE temperature of the contrastive inversion
    class_weight: float = 0.3  # pull of the stamped images towards the one class they pile onto
    pull_after: float = 0.75  # the class pull starts after this share of the steps (earlier, it locks onto a class the
    # stamped images only pass through on the way to the backdoor's, e.g. 'house' before 'flower' on the demo)
    size_weight: float = 30.0  # weight of mean(mask)
    mask_init: float = 0.05
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    prompt_steps: int = 200
    prompt_lr: float = 1e-2  # Adam (CoOp: SGD 2e-3 over 200 epochs); full batch of precomputed image embeddings
    trigger_weight: float = 1.0  # weight of the triggered images' cross-entropy against the clean one's
    anchor_weight: float = 5.0  # our addition: mean (1 - cos) of each learnt class embedding to the plain template one
    templates: str | list[str] = "short"  # for the inversion's class term (the suspect's plain zero-shot head)
    seed: int = 0


# --------------------------------------------------------------------------- step 1: contrastive inversion


def contrastive_inversion(
    model: SuspectModel,
    images: torch.Tensor,
    class_names: list[str],
    s: CBPTSettings,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    stop_message: str = CANCELLED,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Learn a dummy trigger (mask 1 x H x W, pattern 3 x H x W) that makes stamped images alike, unlike their clean
    versions."""
    if s.inversion_steps < 1 or s.batch_size < 2:
        raise ForensicsError("the contrastive inversion needs at least one step and batches of at least two images")
    if len(images) < 2:
        raise ForensicsError("the contrastive inversion needs at least two clean images")
    device = model.device
    size = model.image_size
    gen = torch.Generator().manual_seed(int(s.seed))
    mask = torch.full((1, size, size), float(s.mask_init)).to(device).requires_grad_(True)
    pattern = torch.rand(3, size, size, generator=gen).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask, pattern], lr=s.inversion_lr)
    class_emb = class_text_embeddings(model, class_names, s.templates).detach().to(device)
    images = images.to(device)
    terms: dict[str, float] = {}
    with frozen(model):
        with torch.no_grad():
            clean_all = torch.cat([model.encode_image(images[i : i + 64]) for i in range(0, len(images), 64)])
        for step in range(s.inversion_steps):
            check_stop(should_stop, stop_message)
            idx = torch.randperm(len(images), generator=gen)[: s.batch_size].to(device)
            clean = clean_all[idx]
            stamped = model.encode_image(blend(images[idx], mask, pattern))
            n = len(idx)
            pos = stamped @ stamped.t() / s.temperature
            neg = stamped @ clean.t() / s.temperature
            eye = torch.eye(n, dtype=torch.bool, device=device)
            pos = pos.masked_fill(eye, float("-inf"))
            contrast = (torch.logsumexp(torch.cat([pos, neg], 1), 1) - torch.logsumexp(pos, 1)).mean()
            logits = 100.0 * stamped @ class_emb.t()
            dominant = int(logits.softmax(-1).mean(0).argmax())
            pull = F.cross_entropy(logits, torch.full((n,), dominant, device=device))
            pull_weight = s.class_weight if step >= s.inversion_steps * s.pull_after else 0.0
            size_term = mask.mean()
            loss = contrast + pull_weight * pull + s.size_weight * size_term
            clamped_step(optimizer, loss, mask, pattern)
            terms = {
                "loss": float(loss.detach()),
                "contrastive": float(contrast.detach()),
                "class_pull": float(pull.detach()),
                "mask_mean": float(size_term.detach()),
            }
            if progress:
                progress(
                    (step + 1) / s.inversion_steps,
                    f"contrastive inversion {step + 1}/{s.inversion_steps} loss {terms['loss']:.3f}",
                )
        mask_out, pattern_out = mask.detach().cpu(), pattern.detach().cpu()
        pred = predict_labels(model, blend(images, mask_out, pattern_out), class_emb)
    target_index = int(torch.bincount(pred, minlength=len(class_names)).argmax())
    stats = {
        **{k: round(v, 5) for k, v in terms.items()},
        "target": class_names[target_index],
        "share_on_target": round(float((pred == target_index).float().mean()), 4),
        "mask_area": round(float(mask_out.mean()), 5),
        "steps": s.inversion_steps,
    }
    return mask_out, pattern_out, stats


# --------------------------------------------------------------------------- the defense


@DEFENSES.register
class CBPT(Defense):
    name = "cbpt"
    needs_findings = False
    summary = (
        "CBPT: invert a dummy trigger contrastively, then learn class-wise prompts that classify triggered "
        "images correctly"
    )
    settings_cls = CBPTSettings
    trigger: tuple[torch.Tensor, torch.Tensor] | None = None  # the last repair's dummy trigger (mask, pattern)

    def check(self, model: SuspectModel, data: RepairData) -> None:
        """Refuse no context vectors or prompt steps, and labelled images that do not fit the model and classes."""
        if self.settings.n_ctx < 1 or self.settings.prompt_steps < 1:
            raise ForensicsError("CBPT needs at least one context vector and one prompt step")
        check_labelled_images(model, data.images, data.labels, data.class_names)

    def fit(self, job: RepairJob) -> Fitted:
        """Invert a dummy trigger on the clean budget, then learn prompts; the CLIP weights stay as they are."""
        model, repaired, data, accelerator, progress, should_stop = job.parts()
        s = self.settings
        labels = torch.as_tensor(list(data.labels), dtype=torch.long)
        names = list(data.class_names)
        device = accelerator.device
        repaired.class_prompts = None  # learn from the plain CLIP, not from earlier prompts
        repaired.to(device)
        images = data.images.to(device)
        with job.autocast():  # the dummy trigger's search is a training pass too
            mask, pattern, inv_stats = contrastive_inversion(
                repaired,
                images,
                names,
                s,
                (lambda f, m: progress(0.6 * f, m)) if progress else None,
                should_stop,
                CANCELLED,
            )
        self.trigger = (mask, pattern)
        rate, n_flip = flip_rate(
            repaired, images, labels.tolist(), names, inv_stats["target"], mask, pattern, s.templates
        )
        self.check_cancel(should_stop)

        template = context_template(s.n_ctx)
        tokens = prompt_tokens(repaired, names, template, s.n_ctx).to(device)
        gen = torch.Generator().manual_seed(int(s.seed))
        with frozen(repaired), torch.no_grad():
            clean_feats = torch.cat([repaired.encode_image(images[i : i + 64]) for i in range(0, len(images), 64)])
            stamped = blend(images, mask, pattern)
            trig_feats = torch.cat([repaired.encode_image(stamped[i : i + 64]) for i in range(0, len(images), 64)])
        learner = torch.nn.Module()
        learner.context = torch.nn.Parameter(initial_context(repaired, len(names), s.n_ctx, s.ctx_init, gen).to(device))
        optimizer = torch.optim.Adam(learner.parameters(), lr=s.prompt_lr)
        learner, optimizer = accelerator.prepare(learner, optimizer)
        context = accelerator.unwrap_model(learner).context
        y = labels.to(device)
        plain = class_text_embeddings(repaired, names, s.templates).detach().to(device)
        history = []
        with frozen(repaired):
            for step in range(s.prompt_steps):
                self.check_cancel(should_stop)
                with job.autocast():
                    text = encode_text_with_context(repaired.clip, tokens, context)
                class_emb = F.normalize(text.float(), dim=-1)
                clean_loss = F.cross_entropy(100.0 * clean_feats @ class_emb.t(), y)
                trig_loss = F.cross_entropy(100.0 * trig_feats @ class_emb.t(), y)
                anchor = (1 - (class_emb * plain).sum(-1)).mean()
                loss = clean_loss + s.trigger_weight * trig_loss + s.anchor_weight * anchor
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                if step % 10 == 9 or step == s.prompt_steps - 1:
                    history.append(
                        {
                            "step": step + 1,
                            "loss": round(float(loss.detach()), 5),
                            "clean_ce": round(float(clean_loss.detach()), 5),
                            "triggered_ce": round(float(trig_loss.detach()), 5),
                            "anchor": round(float(anchor.detach()), 5),
                        }
                    )
                if progress:
                    progress(
                        0.6 + 0.4 * (step + 1) / s.prompt_steps,
                        f"prompt tuning {step + 1}/{s.prompt_steps} loss {float(loss.detach()):.3f}",
                    )
        repaired.class_prompts = {"class_names": names, "context": context.detach().cpu().clone(), "template": template}
        trigger = InvertedTrigger(
            label=inv_stats["target"],
            method="cbpt",
            mask_area=inv_stats["mask_area"],
            verified_asr=round(rate, 4),
            n_verified=n_flip,
            verified_on="the budget images (inversion set)",
            stats=inv_stats,
        )
        notes = [
            f"dummy trigger: {inv_stats['mask_area']:.1%} of the image; stamped budget images pile onto "
            f"'{inv_stats['target']}' ({inv_stats['share_on_target']:.0%}); "
            f"flips {rate:.0%} of {n_flip} non-target images",
            f"CLIP weights unchanged; {len(names)} class-wise prompts of {s.n_ctx} learnt context vectors "
            "(used for these exact class names only)",
        ]
        return Fitted(
            samples_used=int(len(images)),
            history=history,
            notes=notes,
            details={"dummy_trigger": trigger.to_dict(), "template": template},
        )
