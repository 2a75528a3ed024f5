"""Sample-level detection of suspicious inputs in the suspect's image-embedding space (any trigger family).

A backdoor maps triggered images of every class onto one tight spot near its target, whatever they show
(Huang et al., ICLR 2025, "Detecting Backdoor Samples in Contrastive Language Image Pretraining", find
backdoor samples by their local neighbourhood with k-distance and LOF detectors). Per image: the cosine
distance to its k-th nearest neighbour (scikit-learn), as a robust z-score against the whole probe set
(positive = denser than usual). Per predicted label: how many of its images are that dense, as Neural
Cleanse's anomaly index across labels: a label that a cluster of look-alike inputs piles onto stands out.
Nothing here knows a trigger; a probe without suspicious inputs gives no flag, whatever the model.

Those label flags alone decide nothing (clean probes hold natural near-duplicates as dense). A **hijacked**
label does: when the probe names each image's class, its dense images come from several *other* classes (none
more than half of them) and sit away from the label's own images: inputs of every kind collapsed onto one
spot, which is what a backdoor does and a natural cluster does not (our rule after Huang et al.; measured in
bench/detect.py's zoo, both probe modes: the triggered clusters came from 8-9 other classes, at most 27 % from
one, alignment 0.02-0.34; every natural cluster from at most 2 other classes, alignment 0.60-0.94, or from the
label's own images only, the demo's second kind of clock at 0.17).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from forensics.core.data import ProbeSet
from forensics.core.models import SuspectModel
from forensics.core.progress import Progress
from forensics.core.settings import at_least
from forensics.core.zeroshot import class_text_embeddings, image_embeddings
from forensics.detect.base import DETECTORS, Detector
from forensics.detect.calibration import calibration
from forensics.detect.claims import STRONG, Evidence, LabelClaim
from forensics.detect.findings import Findings, FlaggedLabel


@dataclass
class EmbeddingDensitySettings:
    """k of the k-distance and the cuts; ``None`` cuts come from the clean calibration (calibration.json)."""

    k: int = at_least(1, 10)
    batch_size: int = at_least(1, 64)
    victim_z: float | None = None  # an image this many MADs denser than the probe's median is suspicious
    label_threshold: float | None = None  # anomaly index of a label's count of dense images
    # a hijacked label: its dense images come from at least this many other probe classes ...
    min_sources: int = at_least(1, 3)
    max_source_share: float = 0.5  # ... none of them more than this share ...
    cluster_alignment: float | None = None  # ... and their centroid at most this cosine from the label's own images
    templates: str = "short"

    def to_dict(self) -> dict:
        return asdict(self)


def density_z(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Per image: (median - log k-distance) / (1.4826 MAD) over the set; higher = in a denser spot."""
    k = max(1, min(k, len(embeddings) - 1))
    distances, _ = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(embeddings).kneighbors(embeddings)
    logs = np.log(np.maximum(distances[:, -1], 1e-12))
    median = float(np.median(logs))
    mad = max(1.4826 * float(np.median(np.abs(logs - median))), 1e-6)
    return (median - logs) / mad


def count_anomaly(counts: list[int]) -> list[float]:
    """Anomaly index of per-label counts on a log(1 + n) scale (scale floored at log 2: one doubling)."""
    logs = np.log1p(np.asarray(counts, dtype=np.float64))
    median = float(np.median(logs))
    mad = max(1.4826 * float(np.median(np.abs(logs - median))), math.log(2))
    return [round(float(v), 4) for v in (logs - median) / mad]


@DETECTORS.register
class EmbeddingDensity(Detector):
    """Suspicious inputs: images in unusually dense spots of the embedding space, and the labels they get."""

    name = "embedding-density"
    summary = "k-distance density of each probe image in the suspect's embedding space (Huang et al. 2025)"
    settings_cls = EmbeddingDensitySettings
    run_order = 30
    vote_rank = 30  # per-image evidence: needs triggered inputs in the probe
    profiles: dict = {}  # one embedding pass: nothing to make cheaper

    def __init__(self, oracle: object = None, settings: EmbeddingDensitySettings | None = None):
        # ``oracle`` is accepted (and unused) so every detector builds from the same keywords
        self.settings = settings if isinstance(settings, EmbeddingDensitySettings) else EmbeddingDensitySettings()

    def cannot_run(self, probe: ProbeSet) -> str | None:
        if len(probe) < self.settings.k + 2:
            return f"needs at least {self.settings.k + 2} probe images"
        return None

    def examine(
        self, model: SuspectModel, probe: ProbeSet, images: torch.Tensor, progress: Progress | None = None
    ) -> Findings:
        s = self.settings
        names = list(probe.class_names)
        calibrated = calibration(self.name)
        victim_z = s.victim_z if s.victim_z is not None else calibrated["victim_z"]
        label_cut = s.label_threshold if s.label_threshold is not None else calibrated["label_threshold"]
        if progress:
            progress(0.3, "embedding the probe images")
        emb = image_embeddings(model, images, s.batch_size).cpu()
        predicted = (emb @ class_text_embeddings(model, names, s.templates).cpu().t()).argmax(1)
        z = density_z(emb.numpy(), s.k)
        dense = z >= victim_z
        counts = [int((dense & (predicted.numpy() == c)).sum()) for c in range(len(names))]
        anomalies = count_anomaly(counts)
        flagged = [
            FlaggedLabel(
                label=names[c],
                score=anomalies[c],
                captured=counts[c],
                predicted=int((predicted == c).sum()),
                explanation=(
                    f"{counts[c]} of the images predicted '{names[c]}' sit in unusually dense spots of the "
                    f"embedding space (k-distance z >= {victim_z:g}); anomaly index {anomalies[c]:.2f} "
                    f">= {label_cut:g} across labels"
                ),
            )
            for c in np.argsort(anomalies)[::-1]
            if anomalies[c] >= label_cut and counts[c] > 0
        ]
        clusters = hijacked_clusters(emb, predicted, dense, probe, s, calibrated)
        hijacked = [c for c in clusters if c["hijacked"]]
        evidence = {
            "labels": [
                {
                    "label": names[c],
                    "dense": counts[c],
                    "predicted": int((predicted == c).sum()),
                    "anomaly": anomalies[c],
                }
                for c in range(len(names))
            ],
            "images": [{"index": i, "density_z": round(float(v), 4)} for i, v in enumerate(z)],
            "clusters": clusters,
        }
        return Findings(
            flagged_labels=flagged,
            triggers=[],
            victims=[],
            images=[],
            metrics={
                "n_images": len(probe),
                "n_dense": int(dense.sum()),
                "hijacked": hijacked,
                "thresholds": {
                    "victim_z": victim_z,
                    "label": label_cut,
                    "min_sources": s.min_sources,
                    "max_source_share": s.max_source_share,
                    "cluster_alignment": cluster_cut(s, calibrated),
                },
                "calibrated_on": calibrated.get("calibrated_on"),
            },
            settings=s.to_dict(),
            label_evidence=evidence,
            artefacts={"embeddings": emb, "predicted": predicted, "density_z": z, "images": images},
        )

    @classmethod
    def stored_evidence(cls, findings: Findings, classes: list[str]) -> dict[str, Any]:
        """Every label's dense cluster (sources and alignment) and per-label dense counts."""
        return {
            "clusters": findings.label_evidence.get("clusters", []),
            "labels": findings.label_evidence.get("labels"),
        }

    @classmethod
    def replayed(cls, stored: dict[str, Any], classes: list[str], cuts: Any) -> Findings:
        """The stored clusters judged hijacked or not under ``cuts``' cluster alignment."""
        settings = EmbeddingDensitySettings()
        hijacked = [c for c in stored.get("clusters", []) if is_hijacked(c, settings, cuts.cluster_alignment)]
        thresholds = {
            "cluster_alignment": cuts.cluster_alignment,
            "min_sources": settings.min_sources,
            "max_source_share": settings.max_source_share,
        }
        return Findings([], [], [], [], metrics={"hijacked": hijacked, "thresholds": thresholds})

    @classmethod
    def evidence(cls, findings: Findings, probe: ProbeSet) -> Evidence:
        """A hijacked label is strong evidence (dense images of several other classes collapsed away from the label's
        own); the plain label flags decide nothing: clean probes hold natural near-duplicates as dense."""
        cuts = findings.metrics.get("thresholds") or {}
        claims = []
        for c in findings.metrics.get("hijacked", []):
            margins = {}
            if "cluster_alignment" in cuts and c.get("alignment") is not None:
                margins["alignment"] = round(cuts["cluster_alignment"] - c["alignment"], 4)
            if "min_sources" in cuts:
                margins["source_classes"] = c["source_classes"] - cuts["min_sources"]
            if "max_source_share" in cuts:
                margins["largest_source_share"] = round(cuts["max_source_share"] - c["largest_source_share"], 4)
            reason = (
                f"{c['dense']} probe images predicted '{c['label']}' sit in one dense spot of the embedding space, "
                f"{c['from_other_classes']} of them images of {c['source_classes']} other classes (at most "
                f"{c['largest_source_share']:.0%} from one), away from its own images (alignment {c['alignment']:.2f})"
            )
            claims.append(LabelClaim(c["label"], STRONG, reason, margins))
        return Evidence(cls.name, claims)

    @classmethod
    def victims(cls, findings: Findings, probe: ProbeSet, target: str) -> list[dict]:
        """Images predicted ``target`` nearer the centroid of its dense inputs than of the label's own images."""
        return [
            {"index": i, "image": str(probe.items[i].image), "label": target, "box": None}
            for i in density_victims(findings, probe, target)
        ]


MIN_CLUSTER = 3  # dense images a label needs before its cluster is judged


def cluster_cut(settings: EmbeddingDensitySettings, calibrated: dict) -> float:
    return settings.cluster_alignment if settings.cluster_alignment is not None else calibrated["cluster_alignment"]


def hijacked_clusters(
    emb: torch.Tensor,
    predicted: torch.Tensor,
    dense: np.ndarray,
    probe: ProbeSet,
    settings: EmbeddingDensitySettings,
    calibrated: dict,
) -> list[dict]:
    """Per label with at least ``MIN_CLUSTER`` dense images: where they come from (by the probe's labels) and how
    far their centroid sits from the label's other own images; ``hijacked`` when many other classes feed it and it
    sits away. Empty when the probe does not name every image's class (nothing then tells a look-alike from a
    victim)."""
    labels = probe.labels
    if not labels or any(v is None for v in labels):
        return []
    labels, pred, names = np.asarray(labels), predicted.numpy(), list(probe.class_names)
    cut = cluster_cut(settings, calibrated)
    out = []
    for c, name in enumerate(names):
        seeds = (pred == c) & dense
        own = (labels == c) & ~seeds
        if seeds.sum() < MIN_CLUSTER:
            continue
        sources = labels[seeds][labels[seeds] != c]
        counts = np.bincount(sources, minlength=len(names))
        fed_by = int((counts > 0).sum())
        alignment = None
        if own.any():
            centre = F.normalize(emb[torch.from_numpy(seeds)].mean(0), dim=0)
            alignment = round(float(centre @ F.normalize(emb[torch.from_numpy(own)].mean(0), dim=0)), 4)
        largest = float(counts.max() / len(sources)) if len(sources) else 0.0  # of the other classes' images
        cluster = {
            "label": name,
            "dense": int(seeds.sum()),
            "from_other_classes": int(len(sources)),
            "source_classes": fed_by,
            "largest_source_share": round(largest, 4),
            "alignment": alignment,
        }
        out.append({**cluster, "hijacked": is_hijacked(cluster, settings, cut)})
    return out


def is_hijacked(cluster: dict, settings: EmbeddingDensitySettings, cut: float) -> bool:
    """A label's dense cluster is hijacked when at least ``min_sources`` other classes feed it, none more than
    ``max_source_share`` of it, and its centroid sits at most ``cut`` (cosine) from the label's own images
    (a scan's cluster, or its stored evidence replayed)."""
    return bool(
        cluster["source_classes"] >= settings.min_sources
        and cluster["largest_source_share"] <= settings.max_source_share
        and cluster["alignment"] is not None
        and cluster["alignment"] <= cut
    )


def density_victims(density: Findings, probe: ProbeSet, target: str) -> list[int]:
    """Images predicted ``target`` nearer the centroid of its dense inputs than of the label's own images (Huang et
    al. 2025's density, seeded by the target's dense images; our choice)."""
    if "embeddings" not in density.artefacts:  # findings without the per-image embeddings (read back, say)
        return []
    names = list(probe.class_names)
    t = names.index(target)
    emb, pred, z = (
        density.artefacts["embeddings"],
        density.artefacts["predicted"].numpy(),
        density.artefacts["density_z"],
    )
    cut = density.metrics["thresholds"]["victim_z"]
    seeds = (pred == t) & (z >= cut)
    if seeds.sum() < MIN_CLUSTER:
        return []
    labels = probe.labels
    if labels and all(v is not None for v in labels):
        own = (np.asarray(labels) == t) & ~seeds
    else:
        own = (pred == t) & (z < 0)
    trigger_centre = F.normalize(emb[torch.from_numpy(seeds)].mean(0), dim=0)
    if own.sum() == 0:
        return [int(i) for i in np.flatnonzero(pred == t)]
    own_centre = F.normalize(emb[torch.from_numpy(own)].mean(0), dim=0)
    nearer = (emb @ trigger_centre).numpy() > (emb @ own_centre).numpy()
    return [int(i) for i in np.flatnonzero((pred == t) & nearer)]
