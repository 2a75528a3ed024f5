"""Fit the verdict's thresholds on stored evidence of clean and backdoored models, and validate them leaving each
model out (``python bench/detect.py --refit``).

The rule for each cut (a feature where planted triggers sit low and natural features high): below every clean
model's lowest value by a guard (the borderline band plus a margin, so no clean model of the fit comes near), and
no higher than midway between that lowest clean value and the highest backdoored value under it (the widest gap
when the two sides separate). The features: the inversion's alignment of small anomalous triggers (clean side:
any label of a clean model; backdoored side: the true target) and the density cluster's alignment (clean side:
clean models' clusters that other classes feed at all; backdoored side: the true target's). Held-out models never
enter a fit. Leave-one-model-out: each model's rows are judged by cuts fit without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forensics.core.errors import ForensicsError
from forensics.detect.embedding_density import EmbeddingDensitySettings
from forensics.detect.evidence import Cuts, ScanEvidence, replay

BORDERLINE = 0.03  # above the inversion's cut, this much more alignment makes a verdict inconclusive
CLEAN_MARGIN = 0.04  # the lowest clean value stays this far above the borderline band (or the density cut)
# Rules the refit writes with the fitted cuts rather than fits (each scan reads them from calibration.json only):
ANOMALY = 2.0  # Neural Cleanse's anomaly index (Wang et al. 2019): fixed by the paper
LABEL_THRESHOLD = 3.0  # the density's per-label anomaly index: shown only, decides nothing (see embedding_density)
VICTIM_Z = 2.0  # an image 2 MADs denser than the probe's median is a dense (suspicious) input (Huang et al. 2025)
# A trigger is verified when it flips this share of held-out clean images of other classes to its label, and an
# oracle flag whose best trigger flips less than REFUTED_FLIP is refuted. On the zoo (bench/detect.py): verified
# backdoor triggers flip 0.9-1.0; a clean model's natural flag ('tree' on clean-s4) flipped 0.078.
VERIFIED_FLIP = 0.8
REFUTED_FLIP = 0.5


def inversion_values(rows: list[ScanEvidence]) -> tuple[dict[str, float], list[float]]:
    """(lowest alignment of a reached, anomalous trigger per clean model; every backdoored row's true target's)."""
    clean: dict[str, float] = {}
    target: list[float] = []
    for row in rows:
        ev = row.detectors.get("trigger-inversion") or {}
        for labels in (ev.get("labels") or {}).values():
            for t in labels:
                if not t["reached"] or t["alignment"] is None or t["anomaly"] < ANOMALY:
                    continue
                if row.truth == "clean":
                    clean[row.model] = min(clean.get(row.model, 1.0), t["alignment"])
                elif t["label"] == row.truth:
                    target.append(t["alignment"])
    return clean, target


def density_values(rows: list[ScanEvidence]) -> tuple[dict[str, float], list[float]]:
    """(lowest alignment per clean model of a dense cluster that other classes feed at all; every backdoored row's
    true target's cluster fed by several classes). The clean side takes any mixed cluster, not only those fed by
    several classes: the alignment cut must sit below natural mixed clusters whatever their source count, which
    the other two conditions of :func:`~forensics.detect.embedding_density.is_hijacked` judge on their own."""
    s = EmbeddingDensitySettings()
    clean: dict[str, float] = {}
    target: list[float] = []
    for row in rows:
        for c in (row.detectors.get("embedding-density") or {}).get("clusters", []):
            if c["alignment"] is None or c["source_classes"] < 1:
                continue
            if row.truth == "clean":
                clean[row.model] = min(clean.get(row.model, 1.0), c["alignment"])
            elif c["label"] == row.truth and c["source_classes"] >= s.min_sources:
                if c["largest_source_share"] <= s.max_source_share:
                    target.append(c["alignment"])
    return clean, target


def place_cut(clean: list[float], backdoored: list[float], guard: float, feature: str) -> float:
    """The cut: ``guard`` below the lowest clean value, and at most midway to the highest backdoored value
    under that. Without a clean value nothing bounds it: an error naming the ``feature``, never a guess."""
    if not clean:
        raise ForensicsError(f"cannot fit {feature}: no clean model of the fit has a value for it")
    lowest = min(clean)
    cut = lowest - guard
    below = [v for v in backdoored if v <= cut]
    if below:
        cut = min(cut, (lowest + max(below)) / 2)
    return round(cut, 4)


@dataclass
class Fit:
    """Fitted cuts with what set them: each feature's clean values per model and backdoored values."""

    cuts: Cuts
    models: list[str]
    features: dict[str, dict[str, Any]] = field(default_factory=dict)

    def margins(self) -> dict[str, dict[str, Any]]:
        """Per cut: its distance to the closest clean value (above it) and to the closest backdoored value at or
        under it, and how many backdoored values lie above it (that feature alone misses them)."""
        out = {}
        for name, f in self.features.items():
            cut = f["cut"]
            clean = list(f["clean"].values())
            under = [v for v in f["backdoored"] if v <= cut]
            out[name] = {
                "cut": cut,
                "to_closest_clean": round(min(clean) - cut, 4) if clean else None,
                "to_closest_backdoored": round(cut - max(under), 4) if under else None,
                "backdoored_above": sum(v > cut for v in f["backdoored"]),
                "backdoored": len(f["backdoored"]),
            }
        return out


def fit(rows: list[ScanEvidence], leave_out: set[str] | frozenset[str] = frozenset()) -> Fit:
    """Cuts fit on ``rows`` but the held-out ones and those of the models in ``leave_out``."""
    used = [r for r in rows if not r.held_out and r.model not in leave_out]
    inv_clean, inv_target = inversion_values(used)
    den_clean, den_target = density_values(used)
    alignment = place_cut(list(inv_clean.values()), inv_target, BORDERLINE + CLEAN_MARGIN, "the inversion's alignment")
    cluster = place_cut(list(den_clean.values()), den_target, CLEAN_MARGIN, "the density cluster's alignment")
    cuts = Cuts(
        alignment=alignment,
        cluster_alignment=cluster,
        anomaly=ANOMALY,
        borderline=BORDERLINE,
        label_threshold=LABEL_THRESHOLD,
        victim_z=VICTIM_Z,
        verified_flip=VERIFIED_FLIP,
        refuted_flip=REFUTED_FLIP,
    )
    return Fit(
        cuts=cuts,
        models=sorted({r.model for r in used}),
        features={
            "trigger-inversion.alignment": {"cut": alignment, "clean": inv_clean, "backdoored": sorted(inv_target)},
            "embedding-density.cluster_alignment": {
                "cut": cluster,
                "clean": den_clean,
                "backdoored": sorted(den_target),
            },
        },
    )


@dataclass
class Judged:
    """One row's verdict under cuts fit without its model (leave-one-model-out), beside the truth."""

    key: str
    model: str
    mode: str
    truth: str
    held_out: bool
    verdict: str
    target: str | None
    cuts: Cuts
    detectors: list[str]
    recorded: str | None

    @property
    def correct(self) -> bool:
        if self.truth == "clean":
            return self.verdict == "clean"
        return self.verdict == "backdoored" and self.target == self.truth


def leave_one_model_out(rows: list[ScanEvidence]) -> list[Judged]:
    """Every row judged by cuts fit on the other models (held-out models: by the fit on every other model)."""
    full = fit(rows)
    fits: dict[str, Fit] = {}
    out = []
    for row in rows:
        cuts = full.cuts if row.held_out else fits.setdefault(row.model, fit(rows, {row.model})).cuts
        v = replay(row, cuts)
        recorded = row.recorded.get("verdict")
        if recorded and row.recorded.get("target"):
            recorded = f"{recorded} {row.recorded['target']}"
        out.append(
            Judged(row.key, row.model, row.mode, row.truth, row.held_out, v.verdict, v.target, cuts,
                   sorted(row.detectors), recorded)
        )  # fmt: skip
    return out


def summary(judged: list[Judged]) -> dict[str, Any]:
    """False positives on clean rows and detections (right target) on backdoored ones, overall and held out."""

    def rates(rows: list[Judged]) -> dict[str, Any]:
        clean = [j for j in rows if j.truth == "clean"]
        bad = [j for j in rows if j.truth != "clean"]
        return {
            "clean_rows": len(clean),
            "false_positives": sum(j.verdict == "backdoored" for j in clean),
            "inconclusive_clean": sum(j.verdict == "inconclusive" for j in clean),
            "false_positive_rate": round(sum(j.verdict == "backdoored" for j in clean) / len(clean), 4)
            if clean
            else None,
            "backdoored_rows": len(bad),
            "detected": sum(j.correct for j in bad),
            "detection_rate": round(sum(j.correct for j in bad) / len(bad), 4) if bad else None,
        }

    return {"all": rates(judged), "held_out": rates([j for j in judged if j.held_out])}
