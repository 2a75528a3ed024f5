"""InverTune (arXiv 2506.12411): invert the backdoor's trigger on a clean budget, then tune the activations it drives.

1. Detection (``forensics.detect.invertune``): name the target with an untargeted adversarial patch
   (skipped when ``data.flagged`` names it) and invert its trigger as a mask + pattern.
2. Clustering-guided activation tuning. The image tower's blocks (ResNet bottlenecks, ViT residual
   blocks) are ranked by ``||mean clean act - mean triggered act|| / ||mean clean act||`` (per-channel
   activations averaged over positions and over the budget); the top ``n_layers`` are kept. In each,
   k-means (k = 2, seeded) on the per-channel ``|delta activation|`` splits the channels; the cluster with
   the larger centre holds the critical neurons. The image tower is then fine-tuned to close the masked
   activation gap, student(triggered) vs frozen original(clean) on critical channels at every position
   (each layer's squared gap divided by its clean activation energy, our choice so that layers of
   different scales weigh alike), plus ``0.5 ||f(x) - f_orig(x)||`` on clean images.

Paper settings: AdamW lr 2e-6, weight decay 1e-4, cosine schedule, grad clip 1.0, 200 iterations on one
clean batch of 64. The tiny demo CLIP (trained from scratch at lr 1e-3) does not move at lr 2e-6, and a
CPU cannot afford 200 double-batch steps in a demo, so the defaults here are lr 5e-4, 40 iterations on
random batches of 32 from the budget. BatchNorm statistics stay frozen (the tower runs in eval mode:
batches of 32 are too small to re-estimate them). Only the image tower is tuned: the text tower gets no
gradient from these losses, so freezing it is the same as the paper's "all parameters".
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.checks import check_labelled_images
from forensics.core.errors import ForensicsError
from forensics.core.images import blend
from forensics.core.models import SuspectModel
from forensics.defenses.base import CANCELLED, DEFENSES, Defense, Fitted, Progress, RepairData, RepairJob
from forensics.detect.invertune import InverTuneDetection, InverTuneDetectSettings, run_invertune_detection


@dataclass
class InverTuneSettings:
    """InverTune repair settings (tuning: paper AdamW lr 2e-6, wd 1e-4, cosine, clip 1.0, 200 its, batch 64;
    scaled here to lr 5e-4, 40 its, batch 32 for the tiny demo on a CPU). ``detect`` holds the detection's
    settings (its own keys may also be given flat to the constructor); the detection runs with ``seed``."""

    n_layers: int = 3
    iterations: int = 40
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    keep_weight: float = 0.5  # weight of ||f(x) - f_orig(x)||
    gap_weight: float = 1.0
    seed: int = 0
    detect: InverTuneDetectSettings = field(default_factory=InverTuneDetectSettings)

    def __post_init__(self) -> None:
        if isinstance(self.detect, dict):
            self.detect = InverTuneDetectSettings(**self.detect)


def candidate_layers(visual: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The image tower's blocks whose activations InverTune ranks: ResNet bottlenecks or ViT residual blocks."""
    import open_clip

    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        return {f"layer{i}.{j}": block for i in range(1, 5) for j, block in enumerate(getattr(visual, f"layer{i}"))}
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        return {f"transformer.resblocks.{i}": block for i, block in enumerate(visual.transformer.resblocks)}
    raise ForensicsError(f"InverTune supports ResNet and ViT image towers, not {type(visual).__name__}")


class _Recorder:
    """Forward hooks that keep the named blocks' outputs as channels-second tensors (B x C x ...)."""

    def __init__(self, visual: torch.nn.Module, names: list[str]):
        layers = candidate_layers(visual)
        self.batch_first = bool(getattr(getattr(visual, "transformer", None), "batch_first", True))
        self.vit = "transformer.resblocks.0" in layers
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [layers[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if self.vit:
                out = (out if self.batch_first else out.transpose(0, 1)).transpose(1, 2)  # B x D x tokens
            self.outputs[name] = out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _channel_means(
    model: SuspectModel, visual: torch.nn.Module, images: torch.Tensor, names: list[str], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Per-channel activations averaged over positions and images, for each named block."""
    rec = _Recorder(visual, names)
    sums: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                visual(model.normalize(images[i : i + batch_size]))
                for n in names:
                    a = rec.outputs[n].flatten(2).mean(-1).sum(0)
                    sums[n] = sums.get(n, 0) + a
    finally:
        rec.remove()
    return {n: (v / len(images)).cpu() for n, v in sums.items()}


def critical_neurons(delta: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Channels in the high-|delta| cluster of a 2-means split (sklearn KMeans, seeded): InverTune's critical
    neurons."""
    from sklearn.cluster import KMeans

    values = delta.abs().double().numpy().reshape(-1, 1)
    if len(values) < 2 or float(values.max() - values.min()) == 0.0:
        return torch.ones(len(values), dtype=torch.bool)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(values)
    high = int(np.argmax(km.cluster_centers_.ravel()))
    return torch.from_numpy(km.labels_ == high)


@DEFENSES.register
class InverTune(Defense):
    name = "invertune"
    needs_findings = False
    summary = "InverTune: find the target by adversarial patch, invert the trigger, tune the activations it drives"
    settings_cls = InverTuneSettings
    detection: InverTuneDetection | None = None  # the last repair's detection (mask and pattern included)

    @classmethod
    def fold_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Detection settings may come flat (e.g. ``--param inversion_steps=20``) as well as under ``detect``."""
        settings = dict(settings)
        own = set(InverTuneSettings.__dataclass_fields__)
        flat = {
            k: settings.pop(k)
            for k in list(settings)
            if k not in own and k in InverTuneDetectSettings.__dataclass_fields__
        }
        if flat:
            detect = settings.get("detect") or {}
            settings["detect"] = {**(asdict(detect) if isinstance(detect, InverTuneDetectSettings) else detect), **flat}
        return settings

    def check(self, model: SuspectModel, data: RepairData) -> None:
        """Refuse non-positive step counts, bad labelled images and a flagged label that is not a class."""
        s = self.settings
        if s.iterations < 1 or s.batch_size < 1 or s.n_layers < 1:
            raise ForensicsError("InverTune needs positive iterations, batch size and layer count")
        check_labelled_images(model, data.images, data.labels, data.class_names)
        if data.flagged and data.flagged[0] not in data.class_names:
            raise ForensicsError(f"flagged label {data.flagged[0]!r} is not one of the classes")

    def fit(self, job: RepairJob) -> Fitted:
        """Detect (or take ``data.flagged[0]`` as the target), invert the trigger, tune critical activations."""
        model, repaired, data, accelerator, progress, should_stop = job.parts()
        s = self.settings
        device = accelerator.device
        repaired.to(device)

        def part(lo: float, hi: float) -> Progress | None:
            return (lambda f, msg: progress(lo + (hi - lo) * f, msg)) if progress else None

        detect_settings = copy.deepcopy(s.detect)
        detect_settings.seed = s.seed
        with job.autocast():  # the patch and trigger searches are training passes too
            detection = run_invertune_detection(
                repaired,
                data.images,
                data.labels,
                data.class_names,
                detect_settings,
                target=data.flagged[0] if data.flagged else None,
                progress=part(0.0, 0.5),
                should_stop=should_stop,
                stop_message=CANCELLED,
            )
        self.detection = detection
        images = data.images.to(device)
        stamped = blend(images, detection.mask, detection.pattern)

        visual = repaired.clip.visual
        teacher = copy.deepcopy(visual).eval().requires_grad_(False)
        names = list(candidate_layers(visual))
        clean_means = _channel_means(repaired, teacher, images, names)
        trig_means = _channel_means(repaired, teacher, stamped, names)
        scores = {
            n: float((clean_means[n] - trig_means[n]).norm() / clean_means[n].norm().clamp_min(1e-8)) for n in names
        }
        chosen = sorted(names, key=lambda n: -scores[n])[: s.n_layers]
        crit = {n: critical_neurons(clean_means[n] - trig_means[n], s.seed).to(device) for n in chosen}
        self.check_cancel(should_stop)

        # the frozen original's clean embeddings and critical activations, once for the whole budget
        rec = _Recorder(teacher, chosen)
        ref_emb, ref_act = [], {n: [] for n in chosen}
        with torch.no_grad():
            for i in range(0, len(images), 64):
                ref_emb.append(F.normalize(teacher(repaired.normalize(images[i : i + 64])), dim=-1))
                for n in chosen:
                    ref_act[n].append(rec.outputs[n][:, crit[n]])
        rec.remove()
        ref_emb_t = torch.cat(ref_emb)
        ref_act_t = {n: torch.cat(v) for n, v in ref_act.items()}
        energy = {n: ref_act_t[n].pow(2).mean().clamp_min(1e-8) for n in chosen}

        visual.requires_grad_(True)
        visual.eval()
        optimizer = torch.optim.AdamW(visual.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.iterations)
        student, optimizer = accelerator.prepare(visual, optimizer)
        srec = _Recorder(accelerator.unwrap_model(student), chosen)
        gen = torch.Generator().manual_seed(s.seed)
        history: list[dict[str, Any]] = []
        try:
            for it in range(s.iterations):
                self.check_cancel(should_stop)
                idx = torch.randperm(len(images), generator=gen)[: s.batch_size].to(device)
                with job.autocast():
                    feats = F.normalize(student(job.layout(repaired.normalize(images[idx]))).float(), dim=-1)
                keep = (feats - ref_emb_t[idx]).norm(dim=-1).mean()
                with job.autocast():
                    student(job.layout(repaired.normalize(stamped[idx])))
                gap = sum(
                    (srec.outputs[n][:, crit[n]].float() - ref_act_t[n][idx]).pow(2).mean() / energy[n] for n in chosen
                )
                loss = s.gap_weight * gap + s.keep_weight * keep
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if s.grad_clip:
                    accelerator.clip_grad_norm_(student.parameters(), s.grad_clip)
                optimizer.step()
                scheduler.step()
                history.append(
                    {
                        "iteration": it + 1,
                        "loss": round(float(loss.detach()), 5),
                        "gap": round(float(gap.detach()), 5),
                        "keep": round(float(keep.detach()), 5),
                    }
                )
                if progress:
                    progress(
                        0.5 + 0.5 * (it + 1) / s.iterations,
                        f"activation tuning {it + 1}/{s.iterations} gap {float(gap.detach()):.3f}",
                    )
        finally:
            srec.remove()
        repaired.clip.visual = accelerator.unwrap_model(student)
        repaired.clip.eval()
        repaired.clip.requires_grad_(True)
        summary = detection.to_dict()
        details = {
            "detection": summary,
            "layer_scores": {n: round(v, 5) for n, v in scores.items()},
            "tuned_layers": chosen,
            "critical_neurons": {n: int(crit[n].sum()) for n in chosen},
        }
        ident = summary["identification"]
        how = (
            "given by the flagged labels"
            if "share_before" not in ident
            else "identified by the adversarial patch (share of predictions "
            f"{ident['share_before'][detection.target]:.0%} -> {ident['share_after'][detection.target]:.0%})"
        )
        notes = [
            f"target '{detection.target}' {how}",
            f"inverted trigger covers {detection.trigger.mask_area:.1%} of the image and flips "
            f"{detection.trigger.verified_asr:.0%} of {detection.trigger.n_verified} non-target budget images",
            f"tuned critical neurons in {', '.join(chosen)}; image tower only, text tower frozen",
        ]
        return Fitted(samples_used=int(len(images)), history=history, notes=notes, details=details)
