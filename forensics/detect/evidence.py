"""Stored detection evidence: what every detector measured on one model and probe, per label, without images.

A scan's findings are reduced to :class:`ScanEvidence` (a few kilobytes of JSON: every label's inverted trigger
sizes, alignments, anomaly indices and flip rates; the oracle scan's flags, captured counts and verified trigger
rates; the density clusters), which ``bench/detect.py`` keeps under ``bench/results/evidence/``. :func:`replay`
applies the verdict's decision rule to stored evidence with any thresholds (:class:`Cuts`), through the same code
a scan uses (:func:`forensics.detect.trigger_inversion.conclude`, :func:`~forensics.detect.embedding_density.
is_hijacked`, :func:`forensics.detect.verdict.merge`), so a rule is re-fit and validated in seconds without a
model or a rescan (:mod:`forensics.detect.calibration`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forensics.core.data import ProbeSet
from forensics.core.errors import ForensicsError
from forensics.detect.calibration import calibration
from forensics.detect.embedding_density import EmbeddingDensitySettings, is_hijacked
from forensics.detect.findings import Findings, FlaggedLabel, Record, TriggerCandidate
from forensics.detect.trigger_inversion import LabelTrigger, TriggerInversionSettings, conclude
from forensics.detect.verdict import Verdict, merge

EVIDENCE_FORMAT = 1


@dataclass
class Cuts(Record):
    """The decision rule's thresholds: the inversion's alignment cut (a small trigger landing at most this close to
    the label's own images is planted, not natural) with its borderline band and anomaly index, the density
    detector's cluster alignment, label and victim cuts, and the flip rates that verify or refute a trigger."""

    alignment: float
    cluster_alignment: float
    anomaly: float
    borderline: float
    label_threshold: float
    victim_z: float
    verified_flip: float
    refuted_flip: float

    @classmethod
    def calibrated(cls) -> "Cuts":
        """The cuts a scan uses now (the installed calibration.json)."""
        inversion, density = calibration("trigger-inversion"), calibration("embedding-density")
        verification = calibration("verification")
        return cls(
            alignment=inversion["alignment_threshold"],
            cluster_alignment=density["cluster_alignment"],
            anomaly=inversion["anomaly_threshold"],
            borderline=inversion["borderline"],
            label_threshold=density["label_threshold"],
            victim_z=density["victim_z"],
            verified_flip=verification["verified_flip"],
            refuted_flip=verification["refuted_flip"],
        )


@dataclass
class ScanEvidence(Record):
    """One model scanned on one probe: the truth (target label or ``clean``) and each detector's evidence."""

    model: str
    mode: str  # the probe: clean (clean images only) or triggered (some carry the model's trigger)
    truth: str
    classes: list[str]
    detectors: dict[str, dict[str, Any]]
    held_out: bool = False  # built after the rule was set: validated on, never fitted on
    recorded: dict[str, Any] = field(default_factory=dict)  # the verdict the scan itself gave
    source: str = ""  # how this evidence was made
    format: int = EVIDENCE_FORMAT
    domain: dict[str, Any] = field(default_factory=dict)  # what the scan ran on (a ScanDomain's fields)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.mode}"


def evidence_of(results: dict[str, Findings], classes: list[str]) -> dict[str, dict[str, Any]]:
    """Each detector's findings reduced to the evidence its decision rests on (JSON-able, no images)."""
    out: dict[str, dict[str, Any]] = {}
    for name, f in results.items():
        if "skipped" in f.metrics:
            out[name] = {"skipped": f.metrics["skipped"]}
        elif name == "trigger-inversion":
            predicted = f.artefacts.get("predicted")
            counts = [int((predicted == c).sum()) for c in range(len(classes))] if predicted is not None else None
            out[name] = {
                "labels": f.label_evidence,
                "predicted": counts,
                "not_inverted": f.metrics.get("not_inverted", {}),
                "settings": f.settings,
            }
        elif name == "oracle-guided":
            out[name] = {
                "flags": [dataclasses.asdict(x) for x in f.flagged_labels],
                "triggers": [
                    {k: getattr(t, k) for k in ("label", "size", "n_crops", "verified_asr", "n_verified")}
                    for t in f.triggers
                ],
                "labels": [
                    {
                        "label": c,
                        "predicted": sum(e.predicted == c for e in f.images),
                        "captured": sum(e.predicted == c and e.captured for e in f.images),
                    }
                    for c in classes
                ],
            }
        elif name == "embedding-density":
            out[name] = {"clusters": f.label_evidence.get("clusters", []), "labels": f.label_evidence.get("labels")}
        else:  # a detector without a replay here: its flags as recorded
            out[name] = {"flags": [dataclasses.asdict(x) for x in f.flagged_labels]}
    return out


def replay(row: ScanEvidence, cuts: Cuts) -> Verdict:
    """The verdict the stored evidence gets under ``cuts``: each detector's findings rebuilt from it, then merged.

    The oracle scan's flags are fixed evidence (their verification rates are measured, not thresholded here);
    a detector missing from the row did not run or was not stored, and counts as not run."""
    classes = list(row.classes)
    results: dict[str, Findings] = {}
    for name, ev in row.detectors.items():
        if "skipped" in ev:
            results[name] = Findings([], [], [], [], metrics={"skipped": ev["skipped"]})
        elif name == "trigger-inversion":
            stored = {k: v for k, v in (ev.get("settings") or {}).items() if k in _fields(TriggerInversionSettings)}
            settings = dataclasses.replace(
                TriggerInversionSettings(**stored), anomaly_threshold=cuts.anomaly, alignment_threshold=cuts.alignment
            )
            per_family = {fam: [LabelTrigger(**t) for t in ts] for fam, ts in ev["labels"].items()}
            counts = ev.get("predicted") or [0] * len(classes)
            results[name] = conclude(per_family, classes, counts, settings, ev.get("not_inverted"), cuts.borderline)
        elif name == "oracle-guided":
            flags = [FlaggedLabel(**x) for x in ev.get("flags", [])]
            triggers = [
                TriggerCandidate(t["label"], "", t.get("size", 0.0), t.get("n_crops", 0), t["verified_asr"], 0)
                for t in ev.get("triggers", [])
            ]
            thresholds = {"verified_flip": cuts.verified_flip, "refuted_flip": cuts.refuted_flip}
            results[name] = Findings(flags, triggers, [], [], metrics={"thresholds": thresholds})
        elif name == "embedding-density":
            settings = EmbeddingDensitySettings()
            hijacked = [c for c in ev.get("clusters", []) if is_hijacked(c, settings, cuts.cluster_alignment)]
            results[name] = Findings([], [], [], [], metrics={"hijacked": hijacked})
    return merge(results, ProbeSet(row.model, [], classes))


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def write_evidence(row: ScanEvidence, folder: Path) -> Path:
    """``folder/<model>__<mode>.json``, written atomically."""
    from forensics.core.models import atomic_write_text

    path = Path(folder) / f"{row.model}__{row.mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(row.to_dict(), indent=1, sort_keys=False) + "\n")
    return path


def read_evidence(folder: str | Path) -> list[ScanEvidence]:
    """Every ``*.json`` evidence file in ``folder``, sorted by model and mode; a file that is not evidence of this
    format is a one-line error naming it."""
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != EVIDENCE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {EVIDENCE_FORMAT}")
            rows.append(ScanEvidence(**data))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ForensicsError(f"{path}: not detection evidence ({exc})") from None
    if not rows:
        raise ForensicsError(f"no evidence files (*.json) in {folder}")
    return sorted(rows, key=lambda r: (r.model, r.mode))
