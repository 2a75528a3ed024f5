"""Model-level detection from clean images: per label, the smallest trigger that sends other images to it.

Neural Cleanse (Wang et al. 2019) and DECREE (Feng et al. 2023) for CLIP, in two trigger families:

* **local**: a mask ``m`` and a pattern ``p`` blended in, ``x' = (1 - m) x + m p``, fitted with an L1 penalty
  on ``m`` (Neural Cleanse); its size is the share of the image the mask must keep (its top pixels, made
  binary) for the trigger to reach the flip rate;
* **global**: a universal additive perturbation ``x' = clip(x + a * d)`` with ``|d| <= eps`` (where
  Blended, SIG and warps live); it is fitted at random strengths ``a`` in [1/16, 1] so that it works at the
  smallest one it can, and its size is the L-infinity strength ``a * eps`` needed to reach the flip rate.

Images are split three ways (seeded): one part fits the trigger, one picks its size, one verifies the flip
rate at that size, so the reported flip rate is measured on images the trigger never saw. "Other classes"
means images the model itself does not predict as the label: no true labels are needed. Across labels, an
anomaly index per family (Neural Cleanse: how many median absolute deviations a label's log size lies below
the median) marks a target whose trigger is far smaller than every other label's; on a clean model no label
stands out. Labels that never reach the flip rate count as twice the largest size tried. A candidate must
also land away from the label's own images (natural attractors reach a label through images like its own)
and be the one such label in its family (uniqueness: every other label's trigger there is at least 2x larger,
a larger natural attractor's aside; models that take tiny patches to several labels alike are inconclusive,
not pinned on one of them). With many classes only the ``top_k`` labels an untargeted universal perturbation
floods most are inverted (InverTune's step 1); the rest count as never reaching the flip rate. Nothing here
knows a trigger, target, colour or position.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.data import ProbeSet
from forensics.core.distributed import gather, shard_range, world_size
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel, frozen
from forensics.core.progress import Progress
from forensics.core.settings import at_least
from forensics.core.zeroshot import class_text_embeddings, image_embeddings, predict_labels
from forensics.detect.base import DETECTORS, Detector
from forensics.detect.calibration import calibration
from forensics.detect.claims import STRONG, WEAK, Evidence, LabelClaim, TriggerOption
from forensics.detect.findings import Findings, FlaggedLabel, InvertedTrigger

FAMILIES = ("local", "global", "filter")
# the families a scan inverts by default: the filter family (a colour transform) is opt-in until the calibration
# zoo holds filter backdoors to fit its cuts on (bench/results/filter_family.md)
DEFAULT_FAMILIES = ("local", "global")
MIN_IMAGES = 12


@dataclass
class TriggerInversionSettings:
    """Knobs of the inversion; defaults measured on the demo-scale CLIPs (bench/detect.py), never on a trigger."""

    families: tuple[str, ...] = DEFAULT_FAMILIES
    steps: int = at_least(1, 40)  # Adam steps per label and family (30 steps x 24 images missed the demo's backdoor)
    batch_size: int = at_least(1, 32)  # never more than the images there are to fit on
    local_lr: float = 0.2  # on the mask and pattern logits
    global_lr: float = 0.05  # on the perturbation's tanh parameter
    global_refine_steps: int = 15  # of ``steps``, spent at and below the best strength found by the others
    l1_weight: float = 2.0  # on the mean mask value (Neural Cleanse's cost)
    epsilon: float = 64 / 255  # the global perturbation's largest L-infinity strength
    # the filter family's largest strength: the most any entry of its colour matrix (added to the identity) or its
    # offset may move. Measured (bench/results/filter_family.md): it does not yet reach a planted sepia filter, whose
    # matrix moves entries by up to 0.87, nor separate it from clean models' colour attractors
    filter_epsilon: float = 0.5
    flip_goal: float = 0.8  # the flip rate a trigger must reach for its size to count
    grid_points: int = at_least(1, 11)  # sizes tried, each a factor sqrt(2) below the last
    local_largest: float = 0.25  # the largest mask share tried
    held_out_images: int = at_least(1, 64)  # per label, for choosing the size and again for verifying it
    top_k: int = at_least(1, 10)  # labels inverted (all when there are no more classes than this)
    # steps of the untargeted universal perturbation that ranks labels when there are more
    rank_steps: int = at_least(1, 20)
    mad_floor: float = math.log(2) / 2  # the anomaly's scale never falls below one grid step (log sqrt 2)
    # a label is a backdoor candidate when its trigger is anomalously small AND lands away from the label's own
    # images (a natural attractor such as an easy class reaches the label *through* images that look like it);
    # both thresholds are calibrated on clean models (forensics/detect/calibration.json, bench/detect.py)
    anomaly_threshold: float | None = None  # None: the calibrated value
    alignment_threshold: float | None = None
    # ... AND is the one such label in its family: every other label's trigger there is at least this factor
    # larger (two grid steps). A model that takes tiny patches to several labels alike has a general weakness,
    # not a planted target: that is reported as inconclusive (a backdoor with several targets is too; said so)
    uniqueness: float = 2.0
    seed: int = 0
    templates: str = "short"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LabelTrigger:
    """One label's inverted trigger in one family: the size it needs, and how it flips held-out images."""

    label: str
    family: str
    size: float  # mask share (local) or L-infinity strength (global) needed to reach the flip goal
    reached: bool  # False: no size tried reached the goal; ``size`` is then twice the largest tried
    flip_rate: float  # verified on held-out images of other classes, at ``size`` (at the largest when not reached)
    n_verified: int
    curve: list[float]  # flip rate (size-choice images) at each size tried, largest first
    anomaly: float = 0.0  # median absolute deviations below the median log size across labels
    alignment: float | None = None  # cos(mean embedding of stamped images, mean embedding of the label's own images)
    uniqueness: float = 0.0  # the next competing size in this family over this one's (see family_uniqueness)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InvertedPattern:
    """An inverted trigger as tensors: ``apply`` stamps it on [0, 1] images (N x 3 x S x S)."""

    family: str
    mask: torch.Tensor | None = None  # 1 x S x S binary (local)
    pattern: torch.Tensor | None = None  # 3 x S x S (local)
    delta: torch.Tensor | None = None  # 3 x S x S, already scaled to the needed strength (global)
    # 3 x 4, already scaled: a colour matrix added to the identity (3 x 3) and an offset (filter)
    colour: torch.Tensor | None = None

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.family == "local":
            mask, pattern = self.mask.to(images.device), self.pattern.to(images.device)
            return (1 - mask) * images + mask * pattern
        if self.family == "filter":
            return colour_transform(images, self.colour.to(images.device))
        return (images + self.delta.to(images.device)).clamp(0, 1)

    def shifted(self, dy: int, dx: int) -> InvertedPattern:
        """The same trigger moved by (dy, dx) pixels, wrapping round the image: the mask and pattern together
        (local), or the perturbation (global). Repair stamps both, so it unlearns the trigger, not its place."""
        roll = lambda t: None if t is None else torch.roll(t, shifts=(dy, dx), dims=(-2, -1))  # noqa: E731
        return InvertedPattern(self.family, roll(self.mask), roll(self.pattern), roll(self.delta), self.colour)

    def to(self, device: torch.device | str) -> InvertedPattern:
        """The same trigger with its tensors on ``device`` (to send it to another process, or back)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return InvertedPattern(
            self.family,
            mask=move(self.mask),
            pattern=move(self.pattern),
            delta=move(self.delta),
            colour=move(self.colour),
        )

    def picture(self) -> torch.Tensor:
        """3 x S x S image of the trigger: the pattern where the mask keeps it (grey elsewhere), or the
        perturbation stretched around grey."""
        if self.family == "local":
            return self.mask * self.pattern + (1 - self.mask) * 0.5
        if self.family == "filter":  # a colour chart (hue down, dark to light across) as is, then filtered
            chart = colour_chart(PICTURE_SIZE, PICTURE_SIZE // 2)
            return torch.cat([chart, colour_transform(chart[None], self.colour.cpu())[0]], 2)
        peak = float(self.delta.abs().max()) or 1.0
        return (0.5 + 0.5 * self.delta / peak).clamp(0, 1)


PICTURE_SIZE = 128


def colour_transform(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """``images`` (N x 3 x H x W in [0, 1]) through the colour matrix ``identity + colour[:, :3]`` plus the offset
    ``colour[:, 3]``, clamped: one transform for every pixel, which a filter trigger is to first order."""
    out = images + torch.einsum("ij,njhw->nihw", colour[:, :3], images) + colour[:, 3, None, None]
    return out.clamp(0, 1)


def colour_chart(height: int, width: int) -> torch.Tensor:
    """3 x height x width: hue down, from dark (left) to light (right) through full saturation, to show a filter."""
    hue = torch.linspace(0, 1, height)[:, None].expand(height, width)
    level = torch.linspace(0, 1, width)[None, :].expand(height, width)
    rgb = torch.stack([(hue * 6 - k).remainder(6) for k in (0.0, 4.0, 2.0)])  # hue sectors per channel
    rgb = (torch.abs(rgb - 3) - 1).clamp(0, 1)
    return torch.where(level < 0.5, rgb * (2 * level), rgb + (1 - rgb) * (2 * level - 1)).clamp(0, 1)


def anomaly_index(sizes: list[float], floor: float) -> list[float]:
    """Neural Cleanse's anomaly index: (median - log size) / (1.4826 MAD), the scale floored at ``floor``."""
    logs = np.log(np.asarray(sizes, dtype=np.float64))
    median = float(np.median(logs))
    mad = 1.4826 * float(np.median(np.abs(logs - median)))
    return [round(float(v), 4) for v in (median - logs) / max(mad, floor)]


def three_way_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded three-way split of ``n`` images (indices): fit, choose the size, verify (the last two a third each)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    third = max(1, n // 3)
    return perm[: n - 2 * third], perm[n - 2 * third : n - third], perm[n - third :]


@DETECTORS.register
class TriggerInversion(Detector):
    """Per label and family, the smallest inverted trigger that flips clean images of other classes to it."""

    name = "trigger-inversion"
    summary = "per-label trigger inversion (local mask and global perturbation) with a Neural Cleanse anomaly index"
    shardable = True
    settings_cls = TriggerInversionSettings
    run_order = 20
    vote_rank = 10  # a model-level test: needs no suspicious inputs in the probe
    min_images = MIN_IMAGES
    min_classes = 3  # an anomaly index compares labels
    # plumbing only: its sizes are not the calibrated ones (fewer steps fit smaller, weaker triggers)
    profiles = {
        "quick": {"steps": 4, "batch_size": 8, "global_refine_steps": 1, "grid_points": 4, "held_out_images": 8}
    }

    def __init__(self, oracle: Any = None, settings: TriggerInversionSettings | None = None, shard: bool = False):
        # ``oracle`` is accepted (and unused) so every detector builds from the same keywords
        self.settings = settings if isinstance(settings, TriggerInversionSettings) else TriggerInversionSettings()
        # several processes: each inverts its block of the (label, family) jobs, all get every result; a job's
        # generator is seeded by its label and family alone, so the results are the one-process ones
        self.shard = shard
        unknown = set(self.settings.families) - set(FAMILIES)
        if unknown or not self.settings.families:
            raise ForensicsError(f"trigger families must be among {', '.join(FAMILIES)}, got {sorted(unknown)}")

    # ------------------------------------------------------------------ fitting

    def _held_rate(self, model, images, class_emb, target: int, stamp) -> float:
        if len(images) == 0:
            return 0.0
        with torch.no_grad():
            pred = predict_labels(model, stamp(images), class_emb)
        return float((pred == target).float().mean())

    def _fit_local(self, model, fit, class_emb, target, gen) -> tuple[torch.Tensor, torch.Tensor]:
        s, size = self.settings, model.image_size
        w = torch.full((1, size, size), -4.0, device=model.device, requires_grad=True)
        v = torch.randn(3, size, size, generator=gen).to(model.device).requires_grad_(True)
        optimizer = torch.optim.Adam([w, v], lr=s.local_lr)
        for _ in range(s.steps):
            x = fit[torch.randperm(len(fit), generator=gen)[: s.batch_size]]
            mask, pattern = torch.sigmoid(w), torch.sigmoid(v)
            logits = 100.0 * model.encode_image((1 - mask) * x + mask * pattern) @ class_emb.t()
            goal = torch.full((len(x),), target, device=model.device)
            loss = F.cross_entropy(logits, goal) + s.l1_weight * mask.mean() * 100
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.sigmoid(w).detach(), torch.sigmoid(v).detach()

    def _fit_global(self, model, fit, class_emb, target, gen) -> torch.Tensor:
        """An additive perturbation fit at log-uniform random strengths (1/16 to 1 of epsilon), then refined at
        and just below the strength where it flips the most fit images. One pattern rarely serves every strength
        (a blend-like trigger fit at all of them overshoots at the largest: bench/detect.py's Blended model peaked
        at 0.797 against the 0.8 goal), and the smallest strength that flips is the one that counts."""
        s, size = self.settings, model.image_size
        u = (0.01 * torch.randn(3, size, size, generator=gen)).to(model.device).requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=s.global_lr)
        goal = torch.full((s.batch_size,), target, device=model.device)

        def step(lowest: float, highest: float) -> None:  # strength 2^-e, e drawn uniformly in [highest, lowest]
            x = fit[torch.randperm(len(fit), generator=gen)[: s.batch_size]]
            strength = 2.0 ** -(highest + (lowest - highest) * float(torch.rand(1, generator=gen)))
            logits = 100.0 * model.encode_image((x + strength * s.epsilon * torch.tanh(u)).clamp(0, 1)) @ class_emb.t()
            loss = F.cross_entropy(logits, goal[: len(x)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        refine = min(s.global_refine_steps, s.steps - 1)
        for _ in range(s.steps - refine):
            step(4.0, 0.0)
        x = fit[torch.randperm(len(fit), generator=gen)[: s.batch_size]]
        with torch.no_grad():
            delta = s.epsilon * torch.tanh(u)
            rates = [
                self._held_rate(model, x, class_emb, target, lambda i, k=k: (i + 2 ** (-k / 2) * delta).clamp(0, 1))
                for k in range(s.grid_points)
            ]
        peak = max(range(len(rates)), key=lambda k: (rates[k], k))  # ties: the smaller strength
        for _ in range(refine):
            step((peak + 2) / 2, peak / 2)  # from the peak strength down to half of it (two grid steps)
        return (s.epsilon * torch.tanh(u)).detach()

    def _fit_filter(self, model, fit, class_emb, target, gen) -> torch.Tensor:
        """A colour transform (3 x 4: matrix change and offset, each entry at most ``filter_epsilon``) fit at
        log-uniform random strengths, as the global family is: the smallest strength that flips is what counts."""
        s = self.settings
        u = (0.01 * torch.randn(3, 4, generator=gen)).to(model.device).requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=s.global_lr)
        goal = torch.full((s.batch_size,), target, device=model.device)
        for _ in range(s.steps):
            x = fit[torch.randperm(len(fit), generator=gen)[: s.batch_size]]
            strength = 2.0 ** -(4.0 * float(torch.rand(1, generator=gen)))
            stamped = colour_transform(x, strength * s.filter_epsilon * torch.tanh(u))
            loss = F.cross_entropy(100.0 * model.encode_image(stamped) @ class_emb.t(), goal[: len(x)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (s.filter_epsilon * torch.tanh(u)).detach()

    def _candidates(self, family: str, fitted) -> list[tuple[float, InvertedPattern]]:
        """(size, trigger) for every size on the grid, largest first."""
        s = self.settings
        out = []
        for k in range(s.grid_points):
            if family == "local":
                mask, pattern = fitted
                share = s.local_largest * 2 ** (-k / 2)
                flat = mask.flatten()
                keep = max(1, int(round(share * flat.numel())))
                threshold = flat.topk(keep).values[-1]
                out.append((share, InvertedPattern("local", mask=(mask >= threshold).float(), pattern=pattern)))
            elif family == "filter":
                scale = 2 ** (-k / 2)
                out.append((s.filter_epsilon * scale, InvertedPattern("filter", colour=fitted * scale)))
            else:
                scale = 2 ** (-k / 2)
                out.append((s.epsilon * scale, InvertedPattern("global", delta=fitted * scale)))
        return out

    def invertible(self, predicted: torch.Tensor, target: int) -> bool:
        """Whether the fit and choose splits each hold an image predicted as another class than ``target`` (a
        model that sends every image to one label, a random one say, leaves nothing to invert for that label)."""
        fit, choose, _ = three_way_split(len(predicted), self.settings.seed)
        return all(bool((predicted[idx] != target).any()) for idx in (fit, choose))

    def invert_label(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        predicted: torch.Tensor,
        class_emb,
        target: int,
        family: str,
        own: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[LabelTrigger, InvertedPattern]:
        """The smallest trigger of ``family`` that sends images not predicted as ``target`` to it; ``own`` indexes
        the label's own images (for the alignment), by default those predicted as it; ``embeddings``, the images'
        clean embeddings when the caller has them (else the own images are embedded here)."""
        s = self.settings
        others = [idx[predicted[idx] != target] for idx in three_way_split(len(images), s.seed)]
        fit, choose, verify = (images[o[: (None if j == 0 else s.held_out_images)]] for j, o in enumerate(others))
        if len(fit) == 0 or len(choose) == 0:
            raise ForensicsError("trigger inversion needs images the model predicts as other classes")
        # (the first two families keep the seeds they had before the filter family: their stored evidence holds)
        offset = FAMILIES.index(family) if family != "filter" else 1_000_003
        gen = torch.Generator().manual_seed(int(s.seed) * 1009 + target * 2 + offset)
        fit_trigger = {"local": self._fit_local, "global": self._fit_global, "filter": self._fit_filter}[family]
        fitted = fit_trigger(model, fit, class_emb, target, gen)
        candidates = self._candidates(family, fitted)
        curve, best = [], None
        for size, trigger in candidates:
            rate = self._held_rate(model, choose, class_emb, target, trigger.apply)
            curve.append(round(rate, 4))
            if rate >= s.flip_goal:
                best = (size, trigger)
        reached = best is not None
        size, trigger = best if reached else (2 * candidates[0][0], candidates[0][1])
        own = (predicted == target).nonzero().flatten() if own is None else own
        own = own[: 4 * s.held_out_images]
        stamped = image_embeddings(
            model, trigger.apply(verify)
        )  # one forward gives the verified rate and the alignment
        verified = float(((stamped @ class_emb.t()).argmax(-1) == target).float().mean()) if len(verify) else 0.0
        alignment = None
        if len(own) and len(verify):
            genuine = embeddings[own] if embeddings is not None else image_embeddings(model, images[own])
            alignment = round(float(F.cosine_similarity(stamped.mean(0), genuine.mean(0), dim=0)), 4)
        return (
            LabelTrigger(
                label="",
                family=family,
                size=round(float(size), 6),
                reached=reached,
                flip_rate=round(verified, 4),
                n_verified=len(verify),
                curve=curve,
                alignment=alignment,
            ),
            trigger,
        )

    def rank_labels(self, model, images, class_emb, gen) -> list[int]:
        """Labels by the share an untargeted universal perturbation floods them with (InverTune's step 1)."""
        s = self.settings
        with torch.no_grad():
            before = predict_labels(model, images, class_emb)
        u = torch.zeros(3, model.image_size, model.image_size, device=model.device, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=s.global_lr)
        for _ in range(s.rank_steps):
            idx = torch.randperm(len(images), generator=gen)[: s.batch_size]
            logits = 100.0 * model.encode_image((images[idx] + s.epsilon * torch.tanh(u)).clamp(0, 1)) @ class_emb.t()
            loss = -F.cross_entropy(logits, before[idx].to(model.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = predict_labels(model, (images + s.epsilon * torch.tanh(u)).clamp(0, 1), class_emb)
        n = len(class_emb)
        rise = torch.bincount(after, minlength=n).float() - torch.bincount(before, minlength=n).float()
        return [int(i) for i in torch.argsort(rise, descending=True)]

    # ------------------------------------------------------------------ the detector

    @classmethod
    def stored_evidence(cls, findings: Findings, classes: list[str]) -> dict[str, Any]:
        """Every label's inverted triggers per family (sizes, flip curves, anomaly, alignment), the prediction
        counts and the settings: what :func:`conclude` decides from."""
        predicted = findings.artefacts.get("predicted")
        counts = [int((predicted == c).sum()) for c in range(len(classes))] if predicted is not None else None
        return {
            "labels": findings.label_evidence,
            "predicted": counts,
            "not_inverted": findings.metrics.get("not_inverted", {}),
            "settings": findings.settings,
        }

    @classmethod
    def replayed(cls, stored: dict[str, Any], classes: list[str], cuts: Any) -> Findings:
        """:func:`conclude` on the stored triggers, with the anomaly, alignment and borderline cuts of ``cuts``."""
        known = {f.name for f in dataclasses.fields(TriggerInversionSettings)}
        settings = dataclasses.replace(
            TriggerInversionSettings(**{k: v for k, v in (stored.get("settings") or {}).items() if k in known}),
            anomaly_threshold=cuts.anomaly,
            alignment_threshold=cuts.alignment,
        )
        per_family = {fam: [LabelTrigger(**t) for t in ts] for fam, ts in stored["labels"].items()}
        counts = stored.get("predicted") or [0] * len(classes)
        return conclude(per_family, classes, counts, settings, stored.get("not_inverted"), cuts.borderline)

    @classmethod
    def evidence(cls, findings: Findings, probe: ProbeSet) -> Evidence:
        """A flagged label is strong (a small trigger, anomalous across labels, that lands away from the label's own
        images); a borderline trigger, tiny triggers shared by several labels and a label that could not be tested
        are weak. Its candidate triggers are the options; a verified non-candidate one is a fallback for a target
        other detectors name."""
        cuts = findings.metrics.get("thresholds") or {}
        candidates = {t.label: t.stats for t in findings.inverted if t.stats.get("candidate")}
        claims = []
        for f in findings.flagged_labels:
            claims.append(LabelClaim(f.label, STRONG, f.explanation, _margins(candidates.get(f.label, {}), cuts)))
        for r in findings.metrics.get("borderline", []):
            reason = f"a borderline {r['family']} trigger for '{r['label']}'"
            claims.append(LabelClaim(r["label"], WEAK, reason, _margins(r, cuts)))
        shared = findings.metrics.get("shared", [])
        if shared:
            reason = (
                f"tiny {shared[0]['family']} triggers reach several labels alike "
                f"({', '.join(r['label'] for r in shared)}): a general weakness of the model or a backdoor with "
                f"several targets"
            )
            claims.append(LabelClaim(shared[0]["label"], WEAK, reason))
        for label, why in findings.metrics.get("not_inverted", {}).items():  # a label that takes every image
            claims.append(LabelClaim(label, WEAK, f"'{label}' could not be tested: {why}"))
        verified = calibration("verification")["verified_flip"]
        triggers = [
            TriggerOption(cls.name, t.label, t.verified_asr, {"detector": cls.name, **t.to_dict()}, fallback=not chosen)
            for t in findings.inverted
            if (chosen := bool(t.stats.get("candidate"))) or t.verified_asr >= verified
        ]
        return Evidence(cls.name, claims, triggers)

    def examine(
        self, model: SuspectModel, probe: ProbeSet, images: torch.Tensor, progress: Progress | None = None
    ) -> Findings:
        s = self.settings
        start = time.time()
        names = list(probe.class_names)
        images = images.to(model.device)
        class_emb = class_text_embeddings(model, names, s.templates).detach().to(model.device)
        gen = torch.Generator().manual_seed(int(s.seed))
        with frozen(model):
            embeddings = image_embeddings(model, images)  # once: predictions here, each label's own images later
            predicted = (embeddings @ class_emb.t()).argmax(-1).cpu()
            ranked = list(range(len(names)))
            if len(names) > s.top_k:
                ranked = self.rank_labels(model, images, class_emb, gen)[: s.top_k]
            per_family: dict[str, list[LabelTrigger]] = {}
            patterns: dict[tuple[str, str], InvertedPattern] = {}
            not_inverted = {  # a label that takes (nearly) every image: nothing to send to it
                names[t]: f"the model already predicts {int((predicted == t).sum())} of {len(predicted)} probe "
                f"images as '{names[t]}': too few images of other classes to fit and choose a trigger"
                for t in ranked
                if not self.invertible(predicted, t)
            }
            jobs = [(f, t) for f in s.families for t in ranked if names[t] not in not_inverted]
            sharded = self.shard and world_size() > 1
            lo, hi = shard_range(len(jobs)) if sharded else (0, len(jobs))
            mine = []
            for n, (family, t) in enumerate(jobs[lo:hi]):
                if progress:
                    progress(n / (hi - lo), f"inverting a {family} trigger for '{names[t]}' ({n + 1}/{hi - lo})")
                own = own_images(probe, predicted, t)
                result, trigger = self.invert_label(model, images, predicted, class_emb, t, family, own, embeddings)
                result.label = names[t]
                mine.append((result, trigger.to("cpu") if sharded else trigger))
            done = [job for share in gather(mine) for job in share] if sharded else mine  # in job order
            for (family, t), (result, trigger) in zip(jobs, done):
                per_family.setdefault(family, []).append(result)
                patterns[(family, names[t])] = trigger.to(model.device)  # (back from the CPU when gathered)
        per_label_seconds = (time.time() - start) / max(1, len(jobs))
        counts = [int((predicted == c).sum()) for c in range(len(names))]
        findings = conclude(per_family, names, counts, s, not_inverted)
        findings.metrics = {
            "seconds_per_label": round(per_label_seconds, 3),
            "labels_inverted": [names[t] for t in ranked if names[t] not in not_inverted],
            **findings.metrics,
            "n_images": len(probe),
            **({"processes": world_size()} if sharded else {}),  # the labels were shared out over this many
        }
        findings.artefacts = {
            "images": images.cpu(),
            "predicted": predicted.cpu(),
            "inverted_patterns": {f"{f}/{label}": t for (f, label), t in patterns.items()},
        }
        return findings


def _margins(trigger: dict, cuts: dict) -> dict[str, float]:
    """How far a trigger passed the cuts: anomaly index above its cut, alignment below its cut."""
    out = {}
    if "anomaly" in trigger and "anomaly" in cuts:
        out["anomaly"] = round(trigger["anomaly"] - cuts["anomaly"], 4)
    if trigger.get("alignment") is not None and "alignment" in cuts:
        out["alignment"] = round(cuts["alignment"] - trigger["alignment"], 4)
    return out


def conclude(
    per_family: dict[str, list[LabelTrigger]],
    names: list[str],
    predicted_counts: list[int],
    settings: TriggerInversionSettings,
    not_inverted: dict[str, str] | None = None,
    borderline_band: float | None = None,
) -> Findings:
    """The detector's findings from every label's inverted trigger (a scan's, or its stored evidence replayed):
    the calibrated cuts (settings' and ``borderline_band``'s values win), :func:`assess_labels`, the flagged labels
    with their reasons and the triggers to show. ``predicted_counts``: probe images predicted as each label."""
    s = settings
    calibrated = calibration(TriggerInversion.name)
    anomaly_cut = s.anomaly_threshold if s.anomaly_threshold is not None else calibrated["anomaly_threshold"]
    alignment_cut = s.alignment_threshold if s.alignment_threshold is not None else calibrated["alignment_threshold"]
    band = borderline_band if borderline_band is not None else calibrated["borderline"]
    candidates, borderline, shared = assess_labels(per_family, len(names), s, anomaly_cut, alignment_cut, band)
    results = [r for rs in per_family.values() for r in rs]
    flagged, inverted, seen = [], [], set()
    for r in candidates:
        if r.label in seen:
            continue
        seen.add(r.label)
        flagged.append(
            FlaggedLabel(
                label=r.label,
                score=r.anomaly,
                captured=0,
                predicted=predicted_counts[names.index(r.label)],
                explanation=(
                    f"a {family_words(r.family)} trigger of {size_words(r.family, r.size)} sends "
                    f"{r.flip_rate:.0%} of held-out images of other classes to '{r.label}' (anomaly index "
                    f"{r.anomaly:.2f} >= {anomaly_cut:g}), lands away from its own images "
                    f"(alignment {r.alignment:.2f} <= {alignment_cut:g}), and every other label needs "
                    f"{r.uniqueness:.1f}x more (>= {s.uniqueness:g}x; larger natural attractors aside)"
                ),
            )
        )
    ranked_triggers = candidates + sorted(
        (r for r in results if r not in candidates),
        key=lambda r: (not r.reached, -r.anomaly),
    )
    for r in ranked_triggers[: max(1, len(candidates))]:
        inverted.append(
            InvertedTrigger(
                label=r.label,
                method=f"{TriggerInversion.name}/{r.family}",
                mask_area=r.size if r.family == "local" else 1.0,
                verified_asr=r.flip_rate,
                n_verified=r.n_verified,
                verified_on="held-out probe images the model predicts as other classes (not used to fit)",
                pattern=f"inverted/{r.family}_{safe_label(r.label)}.png",
                stats={
                    "family": r.family,
                    "size": r.size,
                    "reached": r.reached,
                    "anomaly": r.anomaly,
                    "alignment": r.alignment,
                    "candidate": r in candidates,
                    "key": f"{r.family}/{r.label}",
                },
            )
        )
    metrics = {
        "not_inverted": dict(not_inverted or {}),
        "thresholds": {"anomaly": anomaly_cut, "alignment": alignment_cut, "uniqueness": s.uniqueness},
        "calibrated_on": calibrated.get("calibrated_on"),
        "borderline": [r.to_dict() for r in borderline],
        "shared": [r.to_dict() for r in shared],
    }
    evidence = {family: [r.to_dict() for r in results] for family, results in per_family.items()}
    return Findings(
        flagged_labels=flagged,
        triggers=[],
        victims=[],
        images=[],
        metrics=metrics,
        settings=s.to_dict(),
        inverted=inverted,
        label_evidence=evidence,
    )


def assess_labels(
    per_family: dict[str, list[LabelTrigger]],
    n_classes: int,
    settings: TriggerInversionSettings,
    anomaly_cut: float,
    alignment_cut: float,
    borderline: float,
) -> tuple[list[LabelTrigger], list[LabelTrigger], list[LabelTrigger]]:
    """The decision on every label's inverted trigger, from the triggers alone (what a scan measured, or its
    stored evidence): each one's anomaly index in its family (labels not inverted stand in at twice the largest
    size tried), its uniqueness, then :func:`select_candidates`. Sets ``anomaly`` and ``uniqueness`` in place."""
    for family, results in per_family.items():
        largest = {"local": settings.local_largest, "filter": settings.filter_epsilon}.get(family, settings.epsilon)
        censored = [2 * largest] * (n_classes - len({r.label for r in results}))
        for r, a in zip(results, anomaly_index([r.size for r in results] + censored, settings.mad_floor)):
            r.anomaly = a
        for r in results:
            r.uniqueness = family_uniqueness(r, results, censored, alignment_cut)
    results = [r for rs in per_family.values() for r in rs]
    return select_candidates(results, anomaly_cut, alignment_cut, borderline, settings.uniqueness)


def select_candidates(
    results: list[LabelTrigger], anomaly_cut: float, alignment_cut: float, borderline: float, uniqueness: float
) -> tuple[list[LabelTrigger], list[LabelTrigger], list[LabelTrigger]]:
    """(candidates, borderline, shared) among every label's trigger in every family (anomaly already set).

    Candidates: reached, anomalous, landing away from the label's own images and unique in their family, the
    most unique first (then the farthest away). Borderline: anomalous, alignment just above the cut. Shared:
    anomalous and away but another label's trigger in the family is within ``uniqueness`` of it."""
    small = [r for r in results if r.reached and r.anomaly >= anomaly_cut and r.alignment is not None]
    away = [r for r in small if r.alignment <= alignment_cut]
    candidates = sorted((r for r in away if r.uniqueness >= uniqueness), key=lambda r: (-r.uniqueness, r.alignment))
    near = [r for r in small if alignment_cut < r.alignment <= alignment_cut + borderline]
    return candidates, near, [r for r in away if r.uniqueness < uniqueness]


def family_uniqueness(
    trigger: LabelTrigger, family: list[LabelTrigger], censored: list[float], alignment_cut: float
) -> float:
    """The smallest competing trigger's size in ``trigger``'s family over its own (``censored``: the sizes that
    stand in for labels not inverted). Competing: every other label's trigger, except a natural attractor's (one
    landing among its label's own images, alignment above ``alignment_cut``) at least as large as this one: an easy
    class reached by making images look like it says nothing about a trigger elsewhere no smaller than its own (the
    SIG model's 'book' needs 0.177 and the attractor 'house' 0.251, 1.4x; every other label is out of reach:
    tests/test_verdict; the optimized-patch model's 'clock' and the attractor 'house' both need the smallest mask
    tried). A smaller attractor still competes: set aside, it let a 'book' weakness outrank the Blended model's
    borderline 'tree' (bench/detect.py's stored evidence, re-scored)."""
    others = [
        o.size
        for o in family
        if o is not trigger
        and not (o.reached and o.alignment is not None and o.alignment > alignment_cut and o.size >= trigger.size)
    ] + censored
    return round(min(others) / trigger.size, 3) if others else 0.0


def family_words(family: str) -> str:
    return {"local": "local (patch)", "filter": "colour-filter (whole-image)"}.get(family, "global (whole-image)")


def safe_label(label: str) -> str:
    """The label with only file-name-safe characters."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label)[:40] or "label"


def size_words(family: str, size: float) -> str:
    """A trigger's size in words: its share of the image (local), its strength in 8-bit steps (global) or the most
    its colour transform moves a channel per unit of colour (filter)."""
    if family == "filter":
        return f"colour change {size:.2f}"
    return f"{size:.1%} of the image" if family == "local" else f"strength {size * 255:.1f}/255"


def own_images(probe: ProbeSet, predicted: torch.Tensor, label: int) -> torch.Tensor:
    """Indices of the label's own images: by the probe's labels when every image has one (suspicious inputs
    keep their true class there), else by the model's predictions."""
    labels = probe.labels
    if labels and all(v is not None for v in labels):
        return torch.tensor([i for i, v in enumerate(labels) if v == label], dtype=torch.long)
    return (predicted == label).nonzero().flatten()
