"""The oracle-guided scan (EftCLIP, with Grad-CAM/occlusion from the product card).

Per probe image: CLIP's prediction; the oracle's object regions and CLIP's prediction for each
region crop and for the image with everything but the objects blanked (grounding); a sweep of one
small occluding window over the image, which finds whether a small area decides the prediction
(a backdoor trigger does; an object rarely does); and the attribution mass that falls outside every
object region. Across the probe set: labels that such hijacked predictions pile onto are flagged,
their images are victims, the hijacking crops are aggregated into a reconstructed trigger, which is
verified by pasting it on clean images of other classes. Nothing here knows any trigger, target,
colour or position: every threshold is relative to the model's own behaviour on the probe set.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ProbeSet
from ..errors import ForensicsError
from ..models import SuspectModel
from ..oracles import Oracle, Region
from ..zeroshot import class_text_embeddings, predict, zero_shot_logits
from .findings import Box, Findings, FlaggedLabel, ImageEvidence, TriggerCandidate, Victim

Progress = Callable[[float, str], None]


@dataclass
class ScanSettings:
    """Knobs of the scan; defaults are relative to image size and to the probe set, never to a trigger."""

    window: float = 0.1875  # occluding window side, as a fraction of the image side
    coarse_stride: float = 0.5  # coarse sweep stride, as a fraction of the window
    fine_stride_px: int = 2  # stride of the small occluder that refines the trigger box (model pixels)
    box_threshold: float = 0.3  # share of the refined map's peak that still counts as trigger
    min_object_area: float = 0.02  # regions smaller than this share of the image cannot ground a label
    max_regions: int = 6
    hijack_share: float = 0.5  # the window must remove at least this share of the prediction's probability
    new_confidence: float = 0.4  # ...and the prediction without it must be confident
    compact_share: float = 0.5  # ...and the refined decisive region must be compact: at most this share of the
    # window's area (measured on the demo: trigger regions ~150-200 px², fragile clean predictions ~530 px²)
    min_flag_count: int = 3
    min_flag_share: float = 0.02  # of the probe set
    flag_ratio: float = 3.0  # captured count vs (median over labels + 1)
    verify_images: int = 64
    batch_size: int = 64
    seed: int = 0
    templates: str = "short"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- helpers

def _blank(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Replace pixels outside ``keep`` (N x S x S bool) by each image's mean colour."""
    fill = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    return torch.where(keep[:, None], images, fill)


def crop_resize(image: torch.Tensor, box: Box, size: int, pad: float = 0.08) -> torch.Tensor:
    """The box (padded by ``pad`` of its size) cut out and resized to size x size: how CLIP sees one region."""
    x0, y0, x1, y1 = box
    px, py = int((x1 - x0) * pad) + 1, int((y1 - y0) * pad) + 1
    x0, y0 = max(0, x0 - px), max(0, y0 - py)
    x1, y1 = min(image.shape[2], x1 + px), min(image.shape[1], y1 + py)
    crop = image[:, y0:y1, x0:x1]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def _positions(size: int, window: int, stride: int, lo: int = 0, hi: int | None = None) -> list[int]:
    hi = size - window if hi is None else min(hi, size - window)
    lo = max(0, lo)
    out = list(range(lo, hi + 1, max(1, stride)))
    if not out or out[-1] != hi:
        out.append(hi)
    return sorted(set(out))


def _occlusion_sweep(model: SuspectModel, image: torch.Tensor, class_emb: torch.Tensor, window: int,
                     xs: Sequence[int], ys: Sequence[int], batch_size: int) -> tuple[torch.Tensor, list[Box]]:
    """Probabilities (W x C) of the image with each window occluded by its mean colour, and the windows."""
    fill = image.mean(dim=(1, 2), keepdim=True)
    boxes = [(x, y, x + window, y + window) for y in ys for x in xs]
    probs = []
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        batch = image.expand(len(chunk), -1, -1, -1).clone()
        for j, (x0, y0, x1, y1) in enumerate(chunk):
            batch[j, :, y0:y1, x0:x1] = fill
        probs.append(predict(model, batch, class_emb, batch_size))
    return torch.cat(probs), boxes


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two pixel boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def paste(image: torch.Tensor, pattern: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """A copy of ``image`` with ``pattern`` (3 x h x w) pasted at (x, y)."""
    out = image.clone()
    h, w = pattern.shape[1:]
    out[:, y:y + h, x:x + w] = pattern
    return out


# --------------------------------------------------------------------------- the scan

class OracleGuidedScan:
    """EftCLIP-style scan: oracle grounding + small-window hijack test + occlusion attribution."""

    name = "oracle-guided"

    def __init__(self, oracle: Oracle, settings: ScanSettings | None = None):
        self.oracle = oracle
        self.settings = settings or ScanSettings()

    # ---- per image
    def _regions(self, image: torch.Tensor) -> list[Region]:
        regions = self.oracle.segment(image)
        return regions[: self.settings.max_regions]

    def _localize(self, model: SuspectModel, image: torch.Tensor, class_emb: torch.Tensor, label: int, window: Box) -> Box:
        """Refine a decisive window to the trigger's box: a graded map of logit drops under a small occluder.

        Around the window, a window a third as wide is swept with a small stride; each pixel gets the mean
        drop of the label's logit over the placements covering it. The box of the connected area above
        half the peak is the trigger's extent (a coarse window may defuse a trigger by covering a part).
        """
        from scipy import ndimage

        s = self.settings
        size = image.shape[-1]
        x0, y0, x1, y1 = window
        w = x1 - x0
        small = max(2, round(w / 3))
        lo_x, hi_x = max(0, x0 - w // 2), min(size, x1 + w // 2)
        lo_y, hi_y = max(0, y0 - w // 2), min(size, y1 + w // 2)
        xs = _positions(size, small, s.fine_stride_px, lo_x, hi_x - small)
        ys = _positions(size, small, s.fine_stride_px, lo_y, hi_y - small)
        fill = image.mean(dim=(1, 2), keepdim=True)
        placements = [(x, y) for y in ys for x in xs]
        with torch.no_grad():
            base = zero_shot_logits(model, image[None], class_emb)[0, label]
            drops = []
            for start in range(0, len(placements), s.batch_size):
                chunk = placements[start:start + s.batch_size]
                batch = image.expand(len(chunk), -1, -1, -1).clone()
                for j, (x, y) in enumerate(chunk):
                    batch[j, :, y:y + small, x:x + small] = fill
                drops.append(base - zero_shot_logits(model, batch, class_emb)[:, label])
        drops = torch.cat(drops).clamp(min=0).cpu()
        total = torch.zeros(size, size)
        count = torch.zeros(size, size)
        for (x, y), d in zip(placements, drops):
            total[y:y + small, x:x + small] += float(d)
            count[y:y + small, x:x + small] += 1
        heat = (total / count.clamp(min=1)).numpy()
        peak = float(heat.max())
        if peak <= 0:
            return window
        components, _ = ndimage.label(heat >= s.box_threshold * peak)
        py, px = np.unravel_index(int(heat.argmax()), heat.shape)
        ys_, xs_ = np.nonzero(components == components[py, px])
        return (int(xs_.min()), int(ys_.min()), int(xs_.max()) + 1, int(ys_.max()) + 1)

    def examine(self, model: SuspectModel, images: torch.Tensor, class_emb: torch.Tensor, class_names: list[str],
                progress: Progress | None = None) -> tuple[list[dict], torch.Tensor]:
        """Evidence for every image (a dict per image) and the occlusion attribution maps (N x S x S)."""
        s = self.settings
        n, size = len(images), images.shape[-1]
        full = predict(model, images, class_emb, s.batch_size)
        pred = full.argmax(-1)
        window = max(4, round(size * s.window))
        coarse = _positions(size, window, max(1, round(window * s.coarse_stride)))
        maps = torch.zeros(n, size, size)
        records = []
        for i in range(n):
            image, label = images[i], int(pred[i])
            p_label = float(full[i, label])
            regions = self._regions(image)
            big = [r for r in regions if r.area >= s.min_object_area * size * size]
            object_mask = torch.zeros(size, size, dtype=torch.bool)
            for r in big:
                object_mask |= torch.from_numpy(r.mask)
            views = [_blank(image[None], object_mask[None])[0]] if big else []
            views += [crop_resize(image, r.box, size) for r in regions]
            view_probs = predict(model, torch.stack(views), class_emb, s.batch_size) if views else torch.empty(0, len(class_names))
            object_view = view_probs[0] if big else full[i]
            crop_probs = view_probs[1:] if big else view_probs
            region_labels = [
                {"box": list(r.box), "score": float(r.score), "area": r.area, "object": r.area >= s.min_object_area * size * size,
                 "label": class_names[int(p.argmax())], "probability": float(p.max())}
                for r, p in zip(regions, crop_probs)
            ]
            grounded = bool(big) and (int(object_view.argmax()) == label or any(
                rl["object"] and rl["label"] == class_names[label] and rl["probability"] >= 0.5 for rl in region_labels))

            # small-window hijack test: coarse sweep, then a fine sweep around the most decisive window
            probs, boxes = _occlusion_sweep(model, image, class_emb, window, coarse, coarse, s.batch_size)
            drops = p_label - probs[:, label]
            best = int(drops.argmax())
            new_label = int(probs[best].argmax())
            new_conf = float(probs[best].max())
            flips = new_label != label
            share = float(drops[best]) / p_label if p_label > 0 else 0.0
            hijack_box = boxes[best]
            if flips and share >= s.hijack_share:
                hijack_box = self._localize(model, image, class_emb, label, boxes[best])

            # occlusion attribution map (the estimator of captum's Occlusion) from the coarse sweep
            for (x0, y0, x1, y1), d in zip(boxes, drops.clamp(min=0)):
                maps[i, y0:y1, x0:x1] += float(d)
            total = float(maps[i].sum())
            outside = float(maps[i][~object_mask].sum() / total) if total > 0 and big else (1.0 if total > 0 else 0.0)
            bw, bh = hijack_box[2] - hijack_box[0], hijack_box[3] - hijack_box[1]
            compact = bw * bh <= s.compact_share * window * window
            captured = bool(flips and share >= s.hijack_share and new_conf >= s.new_confidence and compact)
            discrepancy = float(np.clip(0.45 * share * flips + 0.3 * (not grounded) + 0.25 * outside, 0, 1))
            records.append({
                "predicted": class_names[label], "confidence": p_label,
                "object_view_label": class_names[int(object_view.argmax())], "object_view_support": float(object_view[label]),
                "region_labels": region_labels, "grounded": grounded, "hijack_drop": share,
                "hijack_box": tuple(int(v) for v in hijack_box), "hijack_flips": flips, "hijack_new_label": class_names[new_label],
                "outside_mass": outside, "discrepancy": discrepancy, "captured": captured, "regions": regions,
            })
            if progress:
                progress((i + 1) / n, f"examining images {i + 1}/{n}")
        mx = maps.flatten(1).max(-1).values.clamp(min=1e-12)
        return records, maps / mx[:, None, None]

    # ---- across the probe set
    def flag(self, records: list[dict], class_names: list[str]) -> list[FlaggedLabel]:
        """Labels whose captured predictions are an outlier among labels (none on a clean model)."""
        s = self.settings
        n = len(records)
        captured = {c: 0 for c in class_names}
        predicted = {c: 0 for c in class_names}
        for r in records:
            predicted[r["predicted"]] += 1
            captured[r["predicted"]] += int(r["captured"])
        counts = np.array(list(captured.values()), float)
        median = float(np.median(counts))
        floor = max(s.min_flag_count, s.min_flag_share * n)
        flagged = []
        for c in class_names:
            k = captured[c]
            others = np.delete(counts, class_names.index(c))
            baseline = float(np.median(others)) + 1.0
            if k >= floor and k >= s.flag_ratio * baseline:
                score = k / (k + s.flag_ratio * baseline)
                flagged.append(FlaggedLabel(
                    label=c, score=round(score, 4), captured=k, predicted=predicted[c],
                    explanation=(f"{k} of the {predicted[c]} images predicted as '{c}' lose that prediction when one small "
                                 f"window (about {s.window:.0%} of the side) is covered, the decisive area is compact, and "
                                 f"CLIP is then confidently another class; the median label has {median:g} such images")))
        return sorted(flagged, key=lambda f: (-f.captured, -f.score))

    def reconstruct(self, model: SuspectModel, images: torch.Tensor, class_emb: torch.Tensor, class_names: list[str],
                    label: str, victims: list[int], boxes: dict[int, Box], clean_pool: list[int]) -> tuple[torch.Tensor, dict]:
        """Aggregate the victims' hijacking crops into one pattern and verify it on clean images of other classes."""
        s = self.settings
        size = images.shape[-1]
        sides = [max(boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]) for i in victims]
        side = int(np.median(sides))
        crops = torch.stack([F.interpolate(images[i][None, :, boxes[i][1]:boxes[i][3], boxes[i][0]:boxes[i][2]],
                                           size=(side, side), mode="bilinear", align_corners=False)[0] for i in victims])
        target = class_names.index(label)
        rng = np.random.default_rng(s.seed)
        pool = list(clean_pool)
        if len(pool) > s.verify_images:
            pool = sorted(rng.choice(pool, size=s.verify_images, replace=False).tolist())
        spots = [(int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))) for _ in pool]

        def flip_rate(pattern: torch.Tensor) -> float:
            if not pool:
                return 0.0
            pasted = torch.stack([paste(images[i], pattern, x, y) for i, (x, y) in zip(pool, spots)])
            return float((predict(model, pasted, class_emb, s.batch_size).argmax(-1) == target).float().mean())

        candidates = {"median of crops": crops.median(dim=0).values, "mean of crops": crops.mean(dim=0)}
        # single crops closest to the median are candidates too: aggregation blurs misaligned crops
        closeness = (crops - candidates["median of crops"]).abs().flatten(1).mean(-1)
        for rank, j in enumerate(closeness.argsort()[:3].tolist()):
            candidates[f"crop {rank + 1} nearest the median (image {victims[j]})"] = crops[j]
        rates = {name: flip_rate(p) for name, p in candidates.items()}
        best = max(rates, key=rates.get)
        return candidates[best], {"method": best, "rates": rates, "side": side, "size": side / size,
                                  "n_verified": len(pool), "crops": crops}

    def run(self, model: SuspectModel, probe: ProbeSet, progress: Progress | None = None) -> tuple[Findings, dict]:
        """Scan ``probe`` with ``model``; returns the findings and the artefacts (images, maps, patterns) for reports."""
        s = self.settings
        start = time.time()
        if len(probe) == 0:
            raise ForensicsError("the probe set is empty")
        class_names = list(probe.class_names)
        if not class_names:
            raise ForensicsError("the probe set names no classes")
        size = model.image_size
        part = (lambda lo, hi: (lambda f, m: progress(lo + (hi - lo) * f, m))) if progress else (lambda lo, hi: None)
        images = probe.load_images(size, progress=part(0.0, 0.05))
        class_emb = class_text_embeddings(model, class_names, s.templates)
        records, maps = self.examine(model, images, class_emb, class_names, part(0.05, 0.9))
        flagged = self.flag(records, class_names)
        flagged_names = {f.label for f in flagged}

        evidence = []
        for i, r in enumerate(records):
            item = probe.items[i]
            evidence.append(ImageEvidence(
                index=i, image=str(item.image), predicted=r["predicted"], confidence=round(r["confidence"], 4),
                true_label=class_names[item.label] if item.label is not None else None,
                object_view_label=r["object_view_label"], object_view_support=round(r["object_view_support"], 4),
                region_labels=r["region_labels"], grounded=r["grounded"], hijack_drop=round(r["hijack_drop"], 4),
                hijack_box=r["hijack_box"], hijack_flips=r["hijack_flips"], outside_mass=round(r["outside_mass"], 4),
                discrepancy=round(r["discrepancy"], 4), captured=r["captured"], triggered=item.triggered))

        victims: list[Victim] = []
        triggers: list[TriggerCandidate] = []
        artefacts: dict[str, Any] = {"images": images, "maps": maps, "records": records, "patterns": {}}
        for f in flagged:
            members = [i for i, r in enumerate(records) if r["captured"] and r["predicted"] == f.label]
            boxes = {i: records[i]["hijack_box"] for i in members}
            for i in members:
                victims.append(Victim(index=i, image=str(probe.items[i].image), label=f.label, box=boxes[i],
                                      grounded_label=records[i]["hijack_new_label"], discrepancy=round(records[i]["discrepancy"], 4)))
            clean_pool = [i for i, r in enumerate(records) if not r["captured"] and r["predicted"] != f.label
                          and r["predicted"] not in flagged_names]
            pattern, info = self.reconstruct(model, images, class_emb, class_names, f.label, members, boxes, clean_pool)
            name = f"trigger_{len(triggers)}_{f.label.replace(' ', '_')}.png"
            artefacts["patterns"][name] = {"pattern": pattern, **info}
            triggers.append(TriggerCandidate(label=f.label, pattern=name, size=round(info["size"], 4), n_crops=len(members),
                                             verified_asr=round(info["rates"][info["method"]], 4), n_verified=info["n_verified"]))
        victims.sort(key=lambda v: -v.discrepancy)
        findings = Findings(flagged_labels=flagged, triggers=triggers, victims=victims, images=evidence,
                            metrics=self._metrics(probe, records, victims, size), settings=s.to_dict())
        findings.metrics["seconds"] = round(time.time() - start, 2)
        findings.metrics["images_per_second"] = round(len(probe) / max(1e-9, time.time() - start), 3)
        return findings, artefacts

    @staticmethod
    def _metrics(probe: ProbeSet, records: list[dict], victims: list[Victim], size: int) -> dict:
        """Precision/recall of victims and trigger-box IoU against the probe set's ground truth, when it has any."""
        out: dict[str, Any] = {"n_images": len(records), "n_captured": sum(r["captured"] for r in records),
                               "n_victims": len(victims)}
        if not probe.has_trigger_flags:
            return out
        truth = {i for i, it in enumerate(probe.items) if it.triggered}
        found = {v.index for v in victims}
        tp = len(truth & found)
        out.update(victim_precision=tp / len(found) if found else (1.0 if not truth else 0.0),
                   victim_recall=tp / len(truth) if truth else 1.0, n_triggered=len(truth))
        ious = []
        for i in sorted(truth):
            true_box = probe.trigger_box_at(i, size)
            if true_box is not None:
                ious.append(box_iou(tuple(records[i]["hijack_box"]), true_box))
        if ious:
            out["box_iou_mean"] = float(np.mean(ious))
            out["box_iou_at_0.5"] = float(np.mean([v >= 0.5 for v in ious]))
        return out
