"""The oracle-guided scan (EftCLIP: oracle grounding, with Grad-CAM and occlusion attribution).

Per probe image: CLIP's prediction; the oracle's object regions and CLIP's prediction for each
region crop and for the image with everything but the objects blanked (grounding); whether covering
one small window takes the prediction away (a backdoor trigger does; an object rarely does), with
the windows to try ranked by a first-order occlusion estimate and the decisive area boxed on that
map; and the attribution mass that falls outside every object region. Across the probe set: labels
that such hijacked predictions pile onto are flagged, their images are victims, the hijacking crops
are aggregated into a reconstructed trigger, which is verified by pasting it on clean images of
other classes. Nothing here knows any trigger, target, colour or position: every threshold is
relative to the model's own behaviour on the probe set.

``ScanSettings(cascade=True)`` (off by default) runs the costly per-image steps only where the cheap pass (prediction
and estimated-drop map) looks suspicious, plus a seeded random sample, and caches oracle regions by image content.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from forensics.attribution import occlusion_estimate_signed, predict_and_estimate
from forensics.core.cache import ContentCache, cache_key, content_hash
from forensics.core.data import ProbeSet
from forensics.core.distributed import gather, shard_range, world_size
from forensics.core.images import Box, box_iou, crop_resize, paste
from forensics.core.models import SuspectModel
from forensics.core.progress import Progress
from forensics.core.settings import at_least
from forensics.core.zeroshot import class_text_embeddings, predict, zero_shot_logits
from forensics.detect.base import DETECTORS, Detector
from forensics.detect.calibration import calibration
from forensics.detect.claims import REFUTED, STRONG, WEAK, Evidence, LabelClaim, TriggerOption
from forensics.detect.findings import Findings, FlaggedLabel, ImageEvidence, TriggerCandidate, Victim
from forensics.oracles import Oracle, Region


@dataclass
class ScanSettings:
    """Knobs of the scan; defaults are relative to image size and to the probe set, never to a trigger."""

    window: float = 0.1875  # occluding window side, as a fraction of the image side
    coarse_stride: float = 0.5  # stride of the grid of candidate windows, as a fraction of the window
    proposals: int = at_least(1, 12)  # windows per image really occluded: those whose estimated drop is largest
    # points on the path from the mean colour to the image where gradients are taken
    estimate_steps: int = at_least(1, 1)
    smooth: float = 1 / 32  # side of the box filter on the estimated-drop map, as a fraction of the image side
    box_threshold: float = 0.3  # share of the map's peak that still counts as trigger
    min_object_area: float = 0.02  # regions smaller than this share of the image cannot ground a label
    max_regions: int = at_least(1, 6)
    hijack_share: float = 0.5  # the window must remove at least this share of the prediction's probability
    new_confidence: float = 0.4  # ...and the prediction without it must be confident
    compact_share: float = 0.75  # ...and the localized box must be compact: at most this share of the window's area
    # (a trigger up to ~85 % of the window side), and covering the box alone must take the prediction away
    min_flag_count: int = at_least(1, 3)
    min_flag_share: float = 0.02  # of the probe set
    flag_ratio: float = 3.0  # captured count vs (median over labels + 1)
    verify_images: int = at_least(1, 64)
    # measured on 2 CPU cores (demo RN, 128 px): 32 gives ~570 img/s, 64 only ~250 (cache)
    batch_size: int = at_least(1, 32)
    seed: int = 0
    templates: str = "short"
    # cascade: the costly per-image steps only on images the cheap pass finds suspicious, plus a seeded random sample
    cascade: bool = False
    cascade_sample: float = 0.1  # share of the unsuspicious images examined anyway (calibrates the across-set counts)
    cascade_focus_z: float = 1.5  # robust z (over the probe) of the attribution share in the top window
    cascade_label_z: float = 2.5  # a label's predicted count above the median label's, in Poisson standard deviations
    # windows really occluded per examined image in the cascade (``proposals`` in the full scan): 9 found the very
    # victims 12 find on the demo and on the zoo's triggered probes; 8 lost one of the bottom-right noise patch's 21,
    # 6 lost two (python bench/scan_repair.py --proposals-check ZOO, ZOO made by bench/detect_zoo.py)
    cascade_proposals: int = at_least(1, 9)

    def to_dict(self) -> dict:
        return asdict(self)


REGION_CACHE = ContentCache(max_items=2048)
"""The oracle regions of the cascade scan, by image content + oracle name and settings, shared by the process's
scans (a second scan of the same probe segments nothing)."""

# --------------------------------------------------------------------------- helpers


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); the mean absolute deviation stands in when the MAD is 0, zeros when all equal."""
    values = np.asarray(values, float)
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre)))
    if spread <= 1e-12:
        spread = float(np.mean(np.abs(values - centre)))
    return (values - centre) / spread if spread > 1e-12 else np.zeros_like(values)


def _window_grid(size: int, settings: ScanSettings) -> tuple[int, list[Box]]:
    """The occluding window's side in pixels and the grid of candidate windows."""
    window = max(4, round(size * settings.window))
    grid = _positions(size, window, max(1, round(window * settings.coarse_stride)))
    return window, [(x, y, x + window, y + window) for y in grid for x in grid]


def _window_sums(maps: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """N x len(boxes): each map's sum inside each window."""
    return torch.stack([maps[:, y0:y1, x0:x1].sum(dim=(1, 2)) for x0, y0, x1, y1 in boxes], 1)


def _smoothed_heat(estimate: torch.Tensor, settings: ScanSettings) -> torch.Tensor:
    """The positive estimated drops, box-filtered over ``settings.smooth`` of the side: where a trigger's extent is
    read from."""
    smooth = max(1, round(estimate.shape[-1] * settings.smooth))
    return torch.from_numpy(ndimage.uniform_filter(estimate.clamp(min=0).numpy(), size=(1, smooth, smooth)))


def _seed_opencv(digest: str) -> None:
    """Seed OpenCV's process-wide RNG (GrabCut's) from an image's hash, so its regions depend on it alone."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - cv2 is a dependency of the fallback oracles
        return
    cv2.setRNGSeed(int(digest[:7], 16))  # 28 bits: fits the C int OpenCV takes


def _blank(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Replace pixels outside ``keep`` (N x S x S bool) by each image's mean colour."""
    fill = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    return torch.where(keep[:, None], images, fill)


def _positions(size: int, window: int, stride: int, lo: int = 0, hi: int | None = None) -> list[int]:
    hi = size - window if hi is None else min(hi, size - window)
    lo = max(0, lo)
    out = list(range(lo, hi + 1, max(1, stride)))
    if not out or out[-1] != hi:
        out.append(hi)
    return sorted(set(out))


def zero_shot_logits_batched(
    model: SuspectModel, images: torch.Tensor, class_emb: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Zero-shot logits (N x C) without gradients, in batches."""
    with torch.no_grad():
        return torch.cat(
            [
                zero_shot_logits(model, images[k : k + batch_size], class_emb).cpu()
                for k in range(0, len(images), batch_size)
            ]
        )


def occluded_logits(
    model: SuspectModel,
    images: torch.Tensor,
    class_emb: torch.Tensor,
    jobs: Sequence[tuple[int, Box]],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Zero-shot logits (J x C) of ``images[i]`` with ``box`` filled by that image's mean colour, for each job (i, box).

    Jobs of many images share batches (small CPU batches run fastest), built lazily so memory stays flat.
    """
    fills = images.mean(dim=(2, 3), keepdim=True)
    out = []
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = images[[i for i, _ in chunk]].clone()
            for j, (i, (x0, y0, x1, y1)) in enumerate(chunk):
                batch[j, :, y0:y1, x0:x1] = fills[i]
            out.append(zero_shot_logits(model, batch, class_emb).cpu())
            if progress:
                progress(start + len(chunk))
    return torch.cat(out) if out else torch.empty(0, len(class_emb))


# --------------------------------------------------------------------------- the scan


def trigger_file_name(index: int, label: str) -> str:
    """The file a reconstructed trigger is saved as; the label comes from the probe set (user input), so only
    letters, digits, ``.``, ``_`` and ``-`` reach the name: no folder separator, no ``..`` escape."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:60] or "label"
    return f"trigger_{index}_{safe}.png"


@dataclass
class Grounding:
    """Pass 1 for one image: the oracle's regions, whether any is big enough to be an object, their union, CLIP's
    probabilities on the objects alone, CLIP's label per region crop, and whether the prediction is grounded."""

    regions: list[Region]
    has_objects: bool
    object_mask: torch.Tensor
    object_view: torch.Tensor
    region_labels: list[dict[str, Any]]
    grounded: bool


@dataclass
class WindowResult:
    """Pass 2 for one image: the window whose occlusion drops the prediction most, the label it leaves, whether
    the label flips, the share of probability removed, and whether that makes a hijack candidate."""

    box: Box
    new_label: int
    flips: bool
    share: float
    candidate: bool


@dataclass
class Sweep:
    """Pass 2 across the probe set: per-image window results, the signed occlusion estimate, which images it has
    signal for, the attribution maps being built, and the window side in pixels."""

    windows: list[WindowResult]
    estimate: torch.Tensor
    signal: torch.Tensor
    maps: torch.Tensor
    window: int


@DETECTORS.register
class OracleGuidedScan(Detector):
    """EftCLIP-style scan: oracle grounding + small-window hijack test + occlusion attribution."""

    name = "oracle-guided"
    summary = "EftCLIP: labels whose predictions a small non-object window decides, their victims and trigger"
    shardable = True
    settings_cls = ScanSettings
    run_order = 10
    vote_rank = 20  # per-image evidence, counted when its reconstructed trigger is verified on clean images
    profiles = {"quick": {"proposals": 6, "cascade_proposals": 4, "verify_images": 16}}

    def __init__(
        self,
        oracle: Oracle,
        settings: ScanSettings | None = None,
        shard: bool = False,
        region_cache: ContentCache | None = None,
    ):
        self.oracle = oracle
        self.settings = settings or ScanSettings()
        self.shard = shard  # several processes: each examines its block of the images, all get every record
        self.stage_seconds: dict[str, float] = {}  # the last run's seconds per step (see :meth:`_stage`)
        self.region_cache = REGION_CACHE if region_cache is None else region_cache  # used in cascade mode

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Add the seconds spent inside to ``stage_seconds[name]`` (reported as the metrics' ``stage_seconds``)."""
        start = time.time()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.time() - start

    # ---- per image
    def region_key(self, image: torch.Tensor) -> str:
        """The region cache's key of ``image`` (at model size): its SHA-256 plus the oracle's name and settings."""
        return cache_key(self.oracle.name, self.oracle.settings(), content_hash(image))

    def _regions(self, image: torch.Tensor) -> list[Region]:
        """The oracle's regions, at most ``max_regions``. Cascade mode caches them by content (:data:`REGION_CACHE`)
        and seeds OpenCV's RNG from the image hash before segmenting, so cached regions equal fresh ones in any
        order (the fallback's GrabCut otherwise draws from a process-wide RNG; measured: 2 of 40 demo images change
        when segmented in reverse order)."""
        if not self.settings.cascade:
            return self.oracle.segment(image)[: self.settings.max_regions]
        key = self.region_key(image)

        def segment() -> list[Region]:
            _seed_opencv(key.rsplit(":", 1)[-1])
            return list(self.oracle.segment(image))

        return list(self.region_cache.get_or_compute(key, segment))[: self.settings.max_regions]

    def _trigger_box(self, heat: torch.Tensor, window: Box, size: int) -> Box:
        """The box of the connected area above ``box_threshold`` of the peak of ``heat`` (S x S) that holds the
        peak, searched within the decisive window and half its side around it."""
        x0, y0, x1, y1 = window
        margin = (x1 - x0) // 2
        X0, Y0, X1, Y1 = max(0, x0 - margin), max(0, y0 - margin), min(size, x1 + margin), min(size, y1 + margin)
        area = heat[Y0:Y1, X0:X1].numpy()
        peak = float(area.max())
        if peak <= 0:
            return window
        components, _ = ndimage.label(area >= self.settings.box_threshold * peak)
        py, px = np.unravel_index(int(area.argmax()), area.shape)
        ys, xs = np.nonzero(components == components[py, px])
        return (X0 + int(xs.min()), Y0 + int(ys.min()), X0 + int(xs.max()) + 1, Y0 + int(ys.max()) + 1)

    def _swept_boxes(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        pred: torch.Tensor,
        indices: list[int],
        windows: dict[int, Box],
    ) -> dict[int, Box]:
        """Trigger boxes where no gradient signal exists: a window a third as wide is swept with a 2-px stride over
        the decisive window and a quarter of its side around it; each pixel gets the mean logit drop of the
        placements covering it, and the box of that graded map is taken as in :meth:`_trigger_box`."""
        size = images.shape[-1]
        placements = {}
        for i in indices:
            x0, y0, x1, y1 = windows[i]
            w = x1 - x0
            small, margin = max(2, round(w / 3)), w // 4
            xs = _positions(size, small, 2, x0 - margin, min(size, x1 + margin) - small)
            ys = _positions(size, small, 2, y0 - margin, min(size, y1 + margin) - small)
            placements[i] = [(x, y, x + small, y + small) for y in ys for x in xs]
        jobs = [(i, b) for i in indices for b in placements[i]]
        logits = occluded_logits(model, images, class_emb, jobs, self.settings.batch_size)
        base = (
            zero_shot_logits_batched(model, images[indices], class_emb, self.settings.batch_size) if indices else None
        )
        out, offset = {}, 0
        for k, i in enumerate(indices):
            label = int(pred[i])
            drops = (base[k, label] - logits[offset : offset + len(placements[i]), label]).clamp(min=0)
            offset += len(placements[i])
            total, count = torch.zeros(size, size), torch.zeros(size, size)
            for (x0, y0, x1, y1), d in zip(placements[i], drops.tolist()):
                total[y0:y1, x0:x1] += d
                count[y0:y1, x0:x1] += 1
            out[i] = self._trigger_box(total / count.clamp(min=1), windows[i], size)
        return out

    def examine_images(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        class_names: list[str],
        progress: Progress | None = None,
        regions: list[list[Region]] | None = None,
    ) -> tuple[list[dict], torch.Tensor]:
        """Evidence for every image (a dict per image) and the occlusion attribution maps (N x S x S).

        Passes, each batched across images: oracle grounding; the estimated occlusion drop (one backward pass)
        and real occlusion of the windows it ranks highest; the trigger's box on that map, checked by occluding it.
        ``regions``: the oracle's regions per image when already segmented (else the oracle is asked here).
        """
        report = progress or (lambda f, m: None)
        if self.settings.cascade:
            return self._examine_cascade(model, images, class_emb, class_names, report)
        with self._stage("prediction and estimate"):
            full, estimate = self._first_pass(model, images, class_emb)
        pred = full.argmax(-1)
        with self._stage("grounding"):
            grounding = self._ground(model, images, class_emb, class_names, full, pred, report, regions)
        with self._stage("occluded windows"):
            sweep = self._sweep(model, images, class_emb, full, pred, report, estimate)
        with self._stage("localization"):
            hijack_boxes, decisive = self._localize(model, images, class_emb, full, pred, sweep)
        report(0.95, f"localized {len(hijack_boxes)} candidate hijacks")
        records = [
            self._record(class_names, full, int(pred[i]), grounding[i], sweep, i, hijack_boxes, decisive)
            for i in range(len(images))
        ]
        report(1.0, f"examined {len(images)} images")
        mx = sweep.maps.flatten(1).max(-1).values.clamp(min=1e-12)
        return records, sweep.maps / mx[:, None, None]

    def _first_pass(
        self, model: SuspectModel, images: torch.Tensor, class_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's probabilities and the estimated-drop map of its prediction: one forward+backward per batch
        gives both at one path point (the default); with more, the prediction comes first."""
        s = self.settings
        if s.estimate_steps == 1:
            return predict_and_estimate(model, images, class_emb, batch_size=s.batch_size)
        full = predict(model, images, class_emb, s.batch_size)
        estimate = occlusion_estimate_signed(
            model, images, class_emb, full.argmax(-1), steps=s.estimate_steps, batch_size=s.batch_size
        )
        return full, estimate

    def triage(
        self, images: torch.Tensor, full: torch.Tensor, estimate: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The cascade's choice from the cheap pass: which images are suspicious, which are sampled.

        Suspicious: the share of positive estimated-drop mass in the top grid window is a robust-z outlier over the
        probe (attention on one small area), or the predicted label is predicted for more images than the median
        label by ``cascade_label_z`` Poisson standard deviations (a label predictions pile onto; a robust z over
        labels measured too wide on small probes: 60 demo images left the target out). Sampled: a seeded random
        ``cascade_sample`` share of the others. Both rules are relative to this probe; nothing names a colour,
        position, target or trigger."""
        s = self.settings
        n, size = len(images), images.shape[-1]
        _, boxes = _window_grid(size, s)
        positive = estimate.clamp(min=0)
        top = _window_sums(positive, boxes).max(1).values
        focus = (top / positive.flatten(1).sum(1).clamp(min=1e-12)).numpy()
        pred = full.argmax(-1).numpy()
        counts = np.bincount(pred, minlength=full.shape[1]).astype(float)
        label_z = (counts - np.median(counts)) / np.sqrt(max(1.0, float(np.median(counts))))
        focus_z = _robust_z(focus)
        suspicious = (focus_z > s.cascade_focus_z) | (label_z[pred] > s.cascade_label_z)
        rest = np.flatnonzero(~suspicious)
        k = min(len(rest), int(np.ceil(s.cascade_sample * len(rest))))
        sampled = np.zeros(n, bool)
        if k:
            sampled[np.random.default_rng([s.seed, 0xCA5C]).choice(rest, size=k, replace=False)] = True
        info = {
            "suspicious": int(suspicious.sum()),
            "sampled": int(sampled.sum()),
            "focus_z": [round(float(v), 3) for v in focus_z],
            "label_z": {int(c): round(float(label_z[c]), 3) for c in np.unique(pred)},
        }
        return suspicious, sampled, info

    def _examine_cascade(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        class_names: list[str],
        report: Progress,
    ) -> tuple[list[dict], torch.Tensor]:
        """:meth:`examine` as a cascade: the prediction and the estimated-drop map (one forward, one forward+backward)
        for every image; grounding, occluded windows and localisation only for :meth:`triage`'s suspicious and
        sampled images, on exactly the code path of the full scan.

        Every image still gets a record: an unexamined one is marked ``examined: False``, is never captured, a victim
        or grounded, and its box and map come from the estimate alone. :meth:`flag` does not count it as an
        uncaptured image: it imputes the random sample's capture rate to it, so per-label counts stay unbiased
        (dropping such images would make the label medians too low; counting them as uncaptured, too)."""
        s = self.settings
        n, size = len(images), images.shape[-1]
        with self._stage("prediction and estimate"):
            full, estimate = self._first_pass(model, images, class_emb)
        pred = full.argmax(-1)
        suspicious, sampled, info = self.triage(images, full, estimate)
        chosen = np.flatnonzero(suspicious | sampled)
        report(0.1, f"cascade: {int(suspicious.sum())} suspicious + {int(sampled.sum())} sampled of {n} images")
        idx = torch.as_tensor(chosen, dtype=torch.long)
        sub = (lambda lo, hi: lambda f, m: report(lo + (hi - lo) * f, m))(0.1, 0.9)
        sub_images, sub_full, sub_pred = images[idx], full[idx], pred[idx]
        with self._stage("grounding"):
            grounding = self._ground(model, sub_images, class_emb, class_names, sub_full, sub_pred, sub)
        with self._stage("occluded windows"):
            sweep = self._sweep(
                model, sub_images, class_emb, sub_full, sub_pred, sub, estimate[idx], s.cascade_proposals
            )
        with self._stage("localization"):
            hijack_boxes, decisive = self._localize(model, sub_images, class_emb, sub_full, sub_pred, sweep)
        heat = _smoothed_heat(estimate, s)
        maps = heat.clone()
        maps[idx] = sweep.maps
        _, boxes = _window_grid(size, s)
        per_window = _window_sums(estimate, boxes)
        records: list[dict] = [{} for _ in range(n)]
        for k, i in enumerate(chosen.tolist()):
            records[i] = self._record(
                class_names, sub_full, int(pred[i]), grounding[k], sweep, k, hijack_boxes, decisive
            )
        focus_z = info["focus_z"]
        for i in range(n):
            if records[i]:
                records[i].update(examined=True, sampled=bool(sampled[i]), suspicion=focus_z[i])
                continue
            label = int(pred[i])
            box = boxes[int(per_window[i].argmax())]
            if float(heat[i].max()) > 0:
                box = self._trigger_box(heat[i], box, size)
            records[i] = {
                "predicted": class_names[label],
                "confidence": float(full[i, label]),
                "object_view_label": class_names[label],
                "object_view_support": float(full[i, label]),
                "region_labels": [],
                "grounded": False,
                "hijack_drop": 0.0,
                "hijack_box": tuple(int(v) for v in box),
                "hijack_flips": False,
                "hijack_new_label": class_names[label],
                "outside_mass": 0.0,
                "discrepancy": 0.0,
                "captured": False,
                "localized": False,
                "regions": [],
                "examined": False,
                "sampled": False,
                "suspicion": focus_z[i],
            }
        report(1.0, f"examined {len(chosen)} of {n} images")
        mx = maps.flatten(1).max(-1).values.clamp(min=1e-12)
        return records, maps / mx[:, None, None]

    def _ground(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        class_names: list[str],
        full: torch.Tensor,
        pred: torch.Tensor,
        report: Progress,
        given: list[list[Region]] | None = None,
    ) -> list[Grounding]:
        """Pass 1, grounding: the oracle's regions, CLIP on each region crop and on the objects alone.

        The views (objects alone, region crops) of ``batch_size`` images at a time go through CLIP together, not
        each image's handful of views as a batch of its own (the demo's warm cascade, 127 images under a profiler
        on 2 CPU cores: 1.22 s of grounding before, 0.77 s after; the same labels and probabilities)."""
        s = self.settings
        n, size = len(images), images.shape[-1]
        min_area = s.min_object_area * size * size
        grounding: list[Grounding] = []
        for lo in range(0, n, s.batch_size):
            chunk = range(lo, min(n, lo + s.batch_size))
            pending, views = [], []
            for i in chunk:
                regions = given[i] if given is not None else self._regions(images[i])
                big = [r for r in regions if r.area >= min_area]
                object_mask = torch.zeros(size, size, dtype=torch.bool)
                for r in big:
                    object_mask |= torch.from_numpy(r.mask)
                object_at = len(views) if big else None  # its objects-alone view in the chunk's batch (none: no object)
                if big:
                    views.append(_blank(images[i][None], object_mask[None])[0])
                crops_at = len(views)
                views += [crop_resize(images[i], r.box, size) for r in regions]
                pending.append((i, regions, object_mask, object_at, crops_at))
                report(0.25 * (i + 1) / n, f"oracle regions {i + 1}/{n}")
            view_probs = (
                predict(model, torch.stack(views), class_emb, s.batch_size)
                if views
                else torch.empty(0, len(class_names))
            )
            for i, regions, object_mask, object_at, crops_at in pending:
                label, has_objects = int(pred[i]), object_at is not None
                object_view = view_probs[object_at] if has_objects else full[i]
                crop_probs = view_probs[crops_at : crops_at + len(regions)]
                region_labels = [
                    {
                        "box": list(r.box),
                        "score": float(r.score),
                        "area": r.area,
                        "object": r.area >= min_area,
                        "label": class_names[int(p.argmax())],
                        "probability": float(p.max()),
                    }
                    for r, p in zip(regions, crop_probs)
                ]
                grounded = has_objects and (
                    int(object_view.argmax()) == label
                    or any(
                        rl["object"] and rl["label"] == class_names[label] and rl["probability"] >= 0.5
                        for rl in region_labels
                    )
                )
                grounding.append(Grounding(regions, has_objects, object_mask, object_view, region_labels, grounded))
        return grounding

    def _sweep(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        full: torch.Tensor,
        pred: torch.Tensor,
        report: Progress,
        estimate: torch.Tensor,
        proposals: int | None = None,
    ) -> Sweep:
        """Pass 2, the small-window hijack test: where would covering a window take the prediction away?

        ``estimate``, the first pass's first-order estimate for every pixel, ranks the windows of a grid and the top
        ``proposals`` (default ``settings.proposals``) are really occluded. Where the estimate carries no signal (a
        saturated model has no gradient), every window is.
        """
        s = self.settings
        proposals = s.proposals if proposals is None else proposals
        n, size = len(images), images.shape[-1]
        signal = estimate.abs().flatten(1).sum(1) > 1e-6
        report(0.35, "estimated occlusion drops")
        window, boxes = _window_grid(size, s)
        per_window = _window_sums(estimate, boxes)
        tried = [
            per_window[i].topk(min(proposals, len(boxes))).indices.tolist() if signal[i] else list(range(len(boxes)))
            for i in range(n)
        ]
        jobs = [(i, boxes[b]) for i in range(n) for b in tried[i]]
        probs = occluded_logits(
            model,
            images,
            class_emb,
            jobs,
            s.batch_size,
            lambda k: report(0.35 + 0.5 * k / len(jobs), f"occluding windows {k}/{len(jobs)}"),
        ).softmax(-1)
        results, offset = [], 0
        maps = torch.zeros(n, size, size)
        for i in range(n):
            label, p_label = int(pred[i]), float(full[i, int(pred[i])])
            mine = probs[offset : offset + len(tried[i])]
            offset += len(tried[i])
            drops = p_label - mine[:, label]
            k = int(drops.argmax())
            new_label, new_conf = int(mine[k].argmax()), float(mine[k].max())
            flips = new_label != label
            share = float(drops[k]) / p_label if p_label > 0 else 0.0
            candidate = flips and share >= s.hijack_share and new_conf >= s.new_confidence
            results.append(WindowResult(boxes[tried[i][k]], new_label, flips, share, candidate))
            if not signal[i]:  # attribution map from the full sweep (the estimator of captum's Occlusion)
                for b, d in zip(tried[i], drops.clamp(min=0).tolist()):
                    x0, y0, x1, y1 = boxes[b]
                    maps[i, y0:y1, x0:x1] += d
        return Sweep(results, estimate, signal, maps, window)

    def _localize(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        full: torch.Tensor,
        pred: torch.Tensor,
        sweep: Sweep,
    ) -> tuple[dict[int, Box], dict[int, bool]]:
        """Pass 3, the trigger's extent: the estimated-drop map around the decisive window (or, without signal, a
        graded map from a small occluder swept around it); then the box itself is occluded and must take the
        prediction away on its own. Fills ``sweep.maps`` with the smoothed estimate where it had signal."""
        s = self.settings
        size = images.shape[-1]
        signal = sweep.signal
        heat = _smoothed_heat(sweep.estimate, s)
        sweep.maps[signal] = heat[signal]
        candidates = [i for i, w in enumerate(sweep.windows) if w.candidate]
        hijack_boxes = {i: self._trigger_box(heat[i], sweep.windows[i].box, size) for i in candidates if signal[i]}
        hijack_boxes.update(
            self._swept_boxes(
                model,
                images,
                class_emb,
                pred,
                [i for i in candidates if not signal[i]],
                {i: sweep.windows[i].box for i in candidates},
            )
        )
        check_jobs = list(hijack_boxes.items())
        check = occluded_logits(model, images, class_emb, check_jobs, s.batch_size).softmax(-1)
        decisive = {}
        for (i, _), p in zip(check_jobs, check):
            label, p_label = int(pred[i]), float(full[i, int(pred[i])])
            decisive[i] = int(p.argmax()) != label and p_label - float(p[label]) >= s.hijack_share * p_label
        return hijack_boxes, decisive

    def _record(
        self,
        class_names: list[str],
        full: torch.Tensor,
        label: int,
        grounding: Grounding,
        sweep: Sweep,
        i: int,
        hijack_boxes: dict[int, Box],
        decisive: dict[int, bool],
    ) -> dict[str, Any]:
        """One image's evidence, as the reports and the compact set read it."""
        s = self.settings
        p_label = float(full[i, label])
        w = sweep.windows[i]
        hijack_box = hijack_boxes.get(i, w.box)
        total = float(sweep.maps[i].sum())
        if total > 0 and grounding.has_objects:
            outside = float(sweep.maps[i][~grounding.object_mask].sum() / total)
        else:
            outside = 1.0 if total > 0 else 0.0
        bw, bh = hijack_box[2] - hijack_box[0], hijack_box[3] - hijack_box[1]
        compact = bw * bh <= s.compact_share * sweep.window * sweep.window
        captured = bool(w.candidate and compact and decisive.get(i, False))
        discrepancy = float(np.clip(0.45 * w.share * w.flips + 0.3 * (not grounding.grounded) + 0.25 * outside, 0, 1))
        return {
            "predicted": class_names[label],
            "confidence": p_label,
            "object_view_label": class_names[int(grounding.object_view.argmax())],
            "object_view_support": float(grounding.object_view[label]),
            "region_labels": grounding.region_labels,
            "grounded": grounding.grounded,
            "hijack_drop": w.share,
            "hijack_box": tuple(int(v) for v in hijack_box),
            "hijack_flips": w.flips,
            "hijack_new_label": class_names[w.new_label],
            "outside_mass": outside,
            "discrepancy": discrepancy,
            "captured": captured,
            "localized": w.candidate,
            "regions": grounding.regions,
        }

    # ---- across the probe set
    def flag(self, records: list[dict], class_names: list[str]) -> list[FlaggedLabel]:
        """Labels whose captured predictions are an outlier among labels (none on a clean model)."""
        s = self.settings
        n = len(records)
        captured: dict[str, float] = {c: 0 for c in class_names}
        predicted = {c: 0 for c in class_names}
        unexamined = {c: 0 for c in class_names}
        sample = [r for r in records if r.get("sampled")]
        rate = sum(r["captured"] for r in sample) / len(sample) if sample else 0.0  # cascade: the sample's rate
        for r in records:
            predicted[r["predicted"]] += 1
            if r.get("examined", True):
                captured[r["predicted"]] += int(r["captured"])
            else:  # a cascade's unexamined image counts as the random sample's capture rate, not as uncaptured
                unexamined[r["predicted"]] += 1
                captured[r["predicted"]] += rate
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
                imputed = (
                    f" (cascade: {unexamined[c]} of them not examined, counted at the random sample's capture rate "
                    f"{rate:.2f})"
                    if unexamined[c]
                    else ""
                )
                flagged.append(
                    FlaggedLabel(
                        label=c,
                        score=round(score, 4),
                        captured=int(round(k)),
                        predicted=predicted[c],
                        explanation=(
                            f"{round(k, 1):g} of the {predicted[c]} images predicted as '{c}' lose that prediction "
                            f"when one small window (about {s.window:.0%} of the side) is covered, the decisive area "
                            f"is compact, and CLIP is then confidently another class; the median label has "
                            f"{round(median, 1):g} such images{imputed}"
                        ),
                    )
                )
        return sorted(flagged, key=lambda f: (-f.captured, -f.score))

    def reconstruct(
        self,
        model: SuspectModel,
        images: torch.Tensor,
        class_emb: torch.Tensor,
        class_names: list[str],
        label: str,
        victims: list[int],
        boxes: dict[int, Box],
        clean_pool: list[int],
    ) -> tuple[torch.Tensor, dict]:
        """Aggregate the victims' hijacking crops into one pattern and verify it on clean images of other classes."""
        s = self.settings
        size = images.shape[-1]
        sides = [max(boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]) for i in victims]
        side = int(np.median(sides))
        crops = torch.stack(
            [
                F.interpolate(
                    images[i][None, :, boxes[i][1] : boxes[i][3], boxes[i][0] : boxes[i][2]],
                    size=(side, side),
                    mode="bilinear",
                    align_corners=False,
                )[0]
                for i in victims
            ]
        )
        target = class_names.index(label)
        rng = np.random.default_rng(s.seed)
        pool = list(clean_pool)
        if len(pool) > s.verify_images:
            pool = sorted(rng.choice(pool, size=s.verify_images, replace=False).tolist())
        spots = [(int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))) for _ in pool]

        def flip_rate(pattern: torch.Tensor) -> float:
            if not pool:
                return 0.0
            h, w = pattern.shape[1:]
            pasted = torch.stack([paste(images[i], pattern, (x, y, x + w, y + h)) for i, (x, y) in zip(pool, spots)])
            return float((predict(model, pasted, class_emb, s.batch_size).argmax(-1) == target).float().mean())

        candidates = {"median of crops": crops.median(dim=0).values, "mean of crops": crops.mean(dim=0)}
        # single crops closest to the median are candidates too: aggregation blurs misaligned crops
        closeness = (crops - candidates["median of crops"]).abs().flatten(1).mean(-1)
        for rank, j in enumerate(closeness.argsort()[:3].tolist()):
            candidates[f"crop {rank + 1} nearest the median (image {victims[j]})"] = crops[j]
        rates = {name: flip_rate(p) for name, p in candidates.items()}
        best = max(rates, key=rates.get)
        return candidates[best], {
            "method": best,
            "rates": rates,
            "side": side,
            "size": side / size,
            "n_verified": len(pool),
            "crops": crops,
        }

    def examine(
        self, model: SuspectModel, probe: ProbeSet, images: torch.Tensor, progress: Progress | None = None
    ) -> Findings:
        """Scan ``probe`` with ``model``: the findings, with the images, maps and patterns in ``findings.artefacts``."""
        s = self.settings
        start = time.time()
        cache_before = (self.region_cache.hits, self.region_cache.misses)
        self.stage_seconds = {}
        class_names = list(probe.class_names)
        size = model.image_size
        part = (lambda lo, hi: lambda f, m: progress(lo + (hi - lo) * f, m)) if progress else (lambda lo, hi: None)
        class_emb = class_text_embeddings(model, class_names, s.templates)
        # the per-image pass shared out; the rest sees all, as in one process. The cascade is not shared out: its
        # triage needs the whole probe, and what it leaves to examine is small
        if self.shard and world_size() > 1 and not s.cascade:
            lo, hi = shard_range(len(images))
            # the fallback oracle's GrabCut draws from OpenCV's process-wide RNG, so an image's regions depend on the
            # images segmented before it: segment in the one-process order up to this block, keep the block's
            regions = [self._regions(images[i]) for i in range(hi)][lo:]
            mine = (
                self.examine_images(model, images[lo:hi], class_emb, class_names, part(0.05, 0.9), regions)
                if hi > lo
                else ([], torch.zeros(0, size, size))
            )
            shares = gather(mine)
            records, maps = [r for share, _ in shares for r in share], torch.cat([m for _, m in shares])
        else:
            records, maps = self.examine_images(model, images, class_emb, class_names, part(0.05, 0.9))
        flagged = self.flag(records, class_names)
        flagged_names = {f.label for f in flagged}

        evidence = []
        for i, r in enumerate(records):
            item = probe.items[i]
            evidence.append(
                ImageEvidence(
                    index=i,
                    image=str(item.image),
                    predicted=r["predicted"],
                    confidence=round(r["confidence"], 4),
                    true_label=class_names[item.label] if item.label is not None else None,
                    object_view_label=r["object_view_label"],
                    object_view_support=round(r["object_view_support"], 4),
                    region_labels=r["region_labels"],
                    grounded=r["grounded"],
                    hijack_drop=round(r["hijack_drop"], 4),
                    hijack_box=r["hijack_box"],
                    hijack_flips=r["hijack_flips"],
                    outside_mass=round(r["outside_mass"], 4),
                    discrepancy=round(r["discrepancy"], 4),
                    captured=r["captured"],
                    triggered=item.triggered,
                )
            )

        victims: list[Victim] = []
        triggers: list[TriggerCandidate] = []
        artefacts: dict[str, Any] = {"images": images, "maps": maps, "records": records, "patterns": {}}
        for f in flagged:
            members = [i for i, r in enumerate(records) if r["captured"] and r["predicted"] == f.label]
            boxes = {i: records[i]["hijack_box"] for i in members}
            for i in members:
                victims.append(
                    Victim(
                        index=i,
                        image=str(probe.items[i].image),
                        label=f.label,
                        box=boxes[i],
                        grounded_label=records[i]["hijack_new_label"],
                        discrepancy=round(records[i]["discrepancy"], 4),
                    )
                )
            clean_pool = [
                i
                for i, r in enumerate(records)
                if not r["captured"] and r["predicted"] != f.label and r["predicted"] not in flagged_names
            ]
            with self._stage("trigger reconstruction"):
                pattern, info = self.reconstruct(
                    model, images, class_emb, class_names, f.label, members, boxes, clean_pool
                )
            name = trigger_file_name(len(triggers), f.label)
            artefacts["patterns"][name] = {"pattern": pattern, **info}
            triggers.append(
                TriggerCandidate(
                    label=f.label,
                    pattern=name,
                    size=round(info["size"], 4),
                    n_crops=len(members),
                    verified_asr=round(info["rates"][info["method"]], 4),
                    n_verified=info["n_verified"],
                )
            )
        victims.sort(key=lambda v: -v.discrepancy)
        findings = Findings(
            flagged_labels=flagged,
            triggers=triggers,
            victims=victims,
            images=evidence,
            metrics=self._metrics(probe, records, victims, size),
            settings=s.to_dict(),
            artefacts=artefacts,
        )
        if s.cascade:
            findings.metrics["cascade"] = {
                "suspicious": sum(1 for r in records if r["examined"] and not r["sampled"]),
                "sampled": sum(1 for r in records if r["sampled"]),
                "skipped": sum(1 for r in records if not r["examined"]),
                "proposals": s.cascade_proposals,  # windows occluded per examined image (full scan: proposals)
                "region_cache": {
                    "hits": self.region_cache.hits - cache_before[0],
                    "misses": self.region_cache.misses - cache_before[1],
                },
            }
        # where the time went (this process's share under a launcher); the rest: text, flagging, records (the
        # template adds the image loading to the detector's seconds)
        stages = {name: round(v, 2) for name, v in self.stage_seconds.items()}
        findings.metrics["stage_seconds"] = {
            **stages,
            "rest": round(time.time() - start - sum(stages.values()), 2),
        }
        findings.metrics["images_per_second"] = round(len(probe) / max(1e-9, time.time() - start), 3)
        verification = calibration("verification")
        findings.metrics["thresholds"] = {k: verification[k] for k in ("verified_flip", "refuted_flip")}
        findings.metrics["calibrated_on"] = verification.get("calibrated_on")
        return findings

    @classmethod
    def stored_evidence(cls, findings: Findings, classes: list[str]) -> dict[str, Any]:
        """The flags, the reconstructed triggers' verification, and per label the predicted and captured counts."""
        return {
            "flags": [f.to_dict() for f in findings.flagged_labels],
            "triggers": [
                {k: getattr(t, k) for k in ("label", "size", "n_crops", "verified_asr", "n_verified")}
                for t in findings.triggers
            ],
            "labels": [
                {
                    "label": c,
                    "predicted": sum(e.predicted == c for e in findings.images),
                    "captured": sum(e.predicted == c and e.captured for e in findings.images),
                }
                for c in classes
            ],
        }

    @classmethod
    def replayed(cls, stored: dict[str, Any], classes: list[str], cuts: Any) -> Findings:
        """The stored flags are fixed evidence (their verification rates are measured); ``cuts`` gives the flip
        rates that verify or refute them."""
        flags = [FlaggedLabel(**x) for x in stored.get("flags", [])]
        triggers = [
            TriggerCandidate(t["label"], "", t.get("size", 0.0), t.get("n_crops", 0), t["verified_asr"], 0)
            for t in stored.get("triggers", [])
        ]
        thresholds = {"verified_flip": cuts.verified_flip, "refuted_flip": cuts.refuted_flip}
        return Findings(flags, triggers, [], [], metrics={"thresholds": thresholds})

    @classmethod
    def evidence(cls, findings: Findings, probe: ProbeSet) -> Evidence:
        """A flag is strong when its reconstructed trigger flips at least the calibrated ``verified_flip`` of held-out
        clean images of other classes, refuted below ``refuted_flip`` (its captured predictions follow no shared
        trigger), weak between or without a trigger. Every reconstructed trigger is an option for its label."""
        cuts = findings.metrics.get("thresholds") or calibration("verification")
        verified, refuted = cuts["verified_flip"], cuts["refuted_flip"]
        claims = []
        for f in findings.flagged_labels:
            rates = [t.verified_asr for t in findings.triggers if t.label == f.label]
            best = max(rates) if rates else None
            margins = {} if best is None else {"verified_flip": round(best - verified, 4)}
            if best is not None and best >= verified:
                claims.append(LabelClaim(f.label, STRONG, f.explanation, margins))
            elif best is not None and best < refuted:
                reason = (
                    f"the oracle flag on '{f.label}' is refuted: its reconstructed trigger flips {best:.0%} of "
                    f"held-out clean images of other classes (< {refuted:.0%})"
                )
                claims.append(LabelClaim(f.label, REFUTED, reason, {"refuted_flip": round(refuted - best, 4)}))
            else:
                claims.append(LabelClaim(f.label, WEAK, f"unverified oracle flag on '{f.label}'", margins))
        method = f"{cls.name}/local"
        triggers = [
            TriggerOption(cls.name, t.label, t.verified_asr, {"detector": cls.name, "method": method, **t.to_dict()})
            for t in findings.triggers
        ]
        return Evidence(cls.name, claims, triggers)

    @staticmethod
    def _metrics(probe: ProbeSet, records: list[dict], victims: list[Victim], size: int) -> dict:
        """Precision/recall of victims and trigger-box IoU against the probe set's ground truth, when it has any."""
        out: dict[str, Any] = {
            "n_images": len(records),
            "examined": sum(1 for r in records if r.get("examined", True)),
            "n_captured": sum(r["captured"] for r in records),
            "n_victims": len(victims),
        }
        if not probe.has_trigger_flags:
            return out
        truth = {i for i, it in enumerate(probe.items) if it.triggered}
        found = {v.index for v in victims}
        tp = len(truth & found)
        out.update(
            victim_precision=tp / len(found) if found else (1.0 if not truth else 0.0),
            victim_recall=tp / len(truth) if truth else 1.0,
            n_triggered=len(truth),
        )
        ious = []
        for i in sorted(truth):
            true_box = probe.trigger_box_at(i, size)
            if true_box is not None:
                ious.append(box_iou(tuple(records[i]["hijack_box"]), true_box))
        if ious:
            out["box_iou_mean"] = float(np.mean(ious))
            out["box_iou_at_0.5"] = float(np.mean([v >= 0.5 for v in ious]))
        return out
