"""Oracle-guided compact fine-tuning (EftCLIP step 3): repair with the scan's curated set, close to the original.

The image tower is fine-tuned on (a) victims, as they are and with the trigger neutralised, labelled
with their grounded class, (b) clean anchors, and (c) clean anchors carrying the reconstructed
trigger at random places, labelled with their own class, so the trigger stops deciding the label.
A distillation term keeps clean-image embeddings close to the frozen original (our choice where the
paper is silent: it keeps clean accuracy while the trigger is unlearnt). The text tower stays
frozen, so class embeddings do not drift. BatchNorm statistics stay frozen too.

Defaults measured on the demo (BatchNorm frozen, no label loss on anchors; CA / ASR of the planted
trigger after repair, from 0.482 / 0.973): full 300-image scan (45 victims, 128 anchors): distillation
weight 3 -> 0.494 / 0.053, weight 10 -> 0.471 / 0.138; 40-image scan (8 victims, 25 anchors): weight 3 ->
0.404 / 0.000, weight 10 -> 0.451 / 0.022. With BatchNorm in train mode and a label loss on anchors the
40-image case fell to CA 0.353.

With no victims (a clean-only probe, a whole-image trigger) the compact set holds clean images stamped with the
trigger the inversion found, each with its clean source: the stamped ones are labelled with their class and
pulled to the frozen original's embedding of their source (an invariance term, our choice: the trigger should
not move the embedding), the sources distilled like anchors. Measured over one scan each (clean-only probe,
CA / planted ASR after): labels alone, demo 0.503 / 0.319, SIG 0.443 / 0.196; invariance weight 3: demo
0.490 / 0.030, SIG 0.417 / 0.052; weight 10 (the default): demo 0.483 / 0.026, SIG 0.420 / 0.033 (from 0.483 /
0.944 and 0.393 / 0.978); weight 3 with the sources as references only (not trained): demo 0.460 / 0.059.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.distributed import global_mean, rank, shard_range, world_size
from forensics.core.errors import ForensicsError
from forensics.core.images import paste
from forensics.core.models import SuspectModel
from forensics.core.zeroshot import class_text_embeddings
from forensics.defenses.base import DEFENSES, Defense, Fitted, RepairData, RepairJob


@dataclass
class OracleFinetuneSettings:
    epochs: int = 15
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 32
    distill_weight: float = 3.0
    trigger_copies: int = 2  # pasted-trigger copies of each anchor per epoch
    freeze_batchnorm: bool = True  # keep BatchNorm statistics (ResNet towers) as the original had them
    anchor_ce_weight: float = 0.0  # label loss on clean anchors; 0: distillation alone keeps them (less overfitting)
    invariance_weight: float = 10.0  # pulls an image stamped with an inverted trigger to the original's clean one
    seed: int = 0


@DEFENSES.register
class OracleGuidedFinetune(Defense):
    name = "oracle-finetune"
    needs_findings = True
    distributed = True
    summary = (
        "EftCLIP: fine-tune the image tower on the scan's compact set (victims neutralised + anchors + pasted trigger)"
    )
    settings_cls = OracleFinetuneSettings

    def check(self, model: SuspectModel, data: RepairData) -> None:
        """Refuse an empty compact set (nothing was found to repair)."""
        if len(data.images) == 0:
            raise ForensicsError("the compact fine-tuning set is empty: the scan found nothing to repair")

    def fit(self, job: RepairJob) -> Fitted:
        """Fine-tune the copy's image tower on the compact set, distilled towards the original's on clean anchors."""
        model, repaired, data, accelerator, progress, should_stop = job.parts()
        s = self.settings
        rng = np.random.default_rng(s.seed)
        class_emb = class_text_embeddings(model, data.class_names, data.templates).detach().clone()
        teacher = model.clip.visual
        student = repaired.clip
        student.requires_grad_(False)
        student.visual.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [p for p in student.visual.parameters() if p.requires_grad], lr=s.lr, weight_decay=s.weight_decay
        )
        student, optimizer = accelerator.prepare(student, optimizer)  # DDP under several processes
        device = accelerator.device
        world, rank_ = world_size(), rank()
        class_emb = class_emb.to(device)
        teacher = teacher.to(device).eval()
        images, labels = data.images, torch.tensor(data.labels)
        anchors = [i for i, k in enumerate(data.kinds) if k == "anchor"]
        # clean rows, distilled to the original: the anchors and the clean sources of images stamped with a trigger
        distilled = [i for i, k in enumerate(data.kinds) if k in ("anchor", "inverted-source")]
        is_distilled = torch.zeros(len(images), dtype=torch.bool)
        is_distilled[distilled] = True
        sources = torch.tensor([data.source_of(i) for i in range(len(images))], dtype=torch.long)
        if not s.invariance_weight:
            sources = torch.full_like(sources, -1)
        size = images.shape[-1]
        history = []
        per_epoch = len(images) + s.trigger_copies * len(anchors) * bool(data.patterns)
        total_steps = s.epochs * max(1, int(np.ceil(per_epoch / s.batch_size)))
        # the frozen original's embeddings of the clean rows, once: the distillation (and invariance) targets
        wanted = s.distill_weight or s.invariance_weight
        reference = self._anchor_references(teacher, repaired, images, distilled, device) if wanted else None
        step = 0
        for epoch in range(s.epochs):
            batch_x, batch_y, batch_clean = [images], [labels], [is_distilled]
            batch_rows = [torch.arange(len(images))]  # each training row's row in data (-1: a pasted copy)
            if data.patterns and anchors:
                for _ in range(s.trigger_copies):
                    pasted = []
                    for i in anchors:
                        pattern = data.patterns[int(rng.integers(len(data.patterns)))]
                        h, w = pattern.shape[1:]
                        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                        pasted.append(paste(images[i], pattern, (x, y, x + w, y + h)))
                    batch_x.append(torch.stack(pasted))
                    batch_y.append(labels[anchors])
                    batch_clean.append(torch.zeros(len(anchors), dtype=torch.bool))
                    batch_rows.append(torch.full((len(anchors),), -1, dtype=torch.long))
            xs, ys, clean, rows = torch.cat(batch_x), torch.cat(batch_y), torch.cat(batch_clean), torch.cat(batch_rows)
            source = torch.where(rows >= 0, sources[rows.clamp(min=0)], torch.full_like(rows, -1))
            order = torch.from_numpy(rng.permutation(len(xs)))
            losses = []
            student.train()
            if s.freeze_batchnorm:  # running statistics from a small, trigger-heavy set would shift every image
                for module in student.modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.eval()
            for begin in range(0, len(xs), s.batch_size):
                self.check_cancel(should_stop)
                idx = order[begin : begin + s.batch_size]
                n, n_keep, n_stamped = len(idx), int(clean[idx].sum()), int((source[idx] >= 0).sum())
                if world > 1:  # this rank's block of the global batch (every rank draws the same batches)
                    lo, hi = shard_range(n, rank_, world)
                    idx = idx[lo:hi]  # may be empty: its forward then adds zero gradients, as DDP needs
                x = job.layout(repaired.normalize(xs[idx].to(device)))
                with job.autocast():
                    emb = student(image=x)[0]  # normalised image features, through DDP under several processes
                emb = emb.float()
                keep = clean[idx].to(device)
                per_sample = F.cross_entropy(100.0 * emb @ class_emb.t(), ys[idx].to(device), reduction="none")
                # means over the global batch (one process: plain means), so DDP's gradient average is the global one
                loss = global_mean(torch.where(keep, s.anchor_ce_weight * per_sample, per_sample), n)
                if keep.any() and reference is not None and s.distill_weight:
                    ref = reference[rows[idx[clean[idx]]]].to(device)
                    loss = loss + s.distill_weight * global_mean((emb[keep] - ref).pow(2).sum(-1), n_keep) * 10.0
                stamped = source[idx] >= 0
                if n_stamped and reference is not None:  # the trigger should not move the embedding
                    ref = reference[source[idx[stamped]]].to(device)
                    drift = (emb[stamped.to(device)] - ref).pow(2).sum(-1)
                    loss = loss + s.invariance_weight * global_mean(drift, n_stamped) * 10.0
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                value = loss.detach()
                losses.append(float(accelerator.reduce(value, "sum") / world if world > 1 else value))
                step += 1
                if progress:
                    progress(
                        min(1.0, step / total_steps), f"repair epoch {epoch + 1}/{s.epochs} loss {np.mean(losses):.3f}"
                    )
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "samples": int(len(xs))})
        repaired.clip = accelerator.unwrap_model(student).eval()
        repaired.clip.requires_grad_(True)
        return Fitted(
            samples_used=int(len(images)),
            history=history,
            notes=["image tower fine-tuned; text tower frozen; distillation to the original on clean anchors"]
            + self._coverage_notes(data, invariance=bool(s.invariance_weight) and bool((sources >= 0).any())),
        )

    @staticmethod
    def _anchor_references(
        teacher: torch.nn.Module, model: SuspectModel, images: torch.Tensor, anchors: list[int], device: torch.device
    ) -> torch.Tensor:
        """Rows of ``images`` (zeros but for ``anchors``): the frozen tower's normalised embedding of each clean row."""
        chunks = [anchors[i : i + 64] for i in range(0, len(anchors), 64)]
        with torch.no_grad():
            parts = [F.normalize(teacher(model.normalize(images[c].to(device))), dim=-1).cpu() for c in chunks]
        reference = torch.zeros(len(images), parts[0].shape[-1] if parts else 1)
        if parts:
            reference[torch.tensor(anchors)] = torch.cat(parts)
        return reference

    @staticmethod
    def _coverage_notes(data: RepairData, invariance: bool = False) -> list[str]:
        """What the compact set gave this repair to unlearn from: boxed victims (neutralised and as found), a found
        trigger (inverted, or the victims') stamped on clean images, box-less victims; and say plainly when it gave
        nothing."""
        stamped = sum(k == "inverted-trigger" for k in data.kinds)
        boxed = sum(k == "victim-neutralised" for k in data.kinds)  # each boxed victim: neutralised + as found
        boxless = sum(k == "victim" for k in data.kinds) - boxed
        flagged = ", ".join(data.flagged) or "(none named)"
        notes = []
        if boxed:
            notes.append(
                f"{boxed} victim{'s' * (boxed != 1)} with the trigger box neutralised (and as found) for {flagged}"
            )
        if stamped:
            notes.append(
                ("beside them, " if boxed else "no victim to neutralise, so ")
                + f"the compact set carries the found trigger (inverted from clean images, or read off the "
                f"box-less victims): {stamped} stamped clean images (each image with the trigger where it was found "
                f"and moved elsewhere), labelled with their own class"
                + (", each pulled to the original's embedding of its clean source" if invariance else "")
                + f", to unlearn it for {flagged}"
            )
        if boxless > 0:
            notes.append(
                f"{boxless} victim samples without a trigger box (copies of each), labelled with the class their "
                f"probe row names, for {flagged}"
            )
        if notes:
            return notes
        return [
            "the scan flagged no label and found no victim, so there was nothing to unlearn: this run only "
            "distilled clean anchors toward the original (the oracle-guided method looks for visible, localized "
            "triggers; a trigger spread over the whole image, such as Blended, SIG or WaNet, escapes it)"
        ]
