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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forensics.core.data import ProbeSet
from forensics.core.errors import ForensicsError
from forensics.detect.base import DETECTORS
from forensics.detect.calibration import calibration
from forensics.detect.findings import Findings, Record
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
    """Each detector's findings reduced to the evidence its decision rests on (JSON-able, no images; each detector's
    :meth:`~forensics.detect.base.Detector.stored_evidence`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, f in results.items():
        if "skipped" in f.metrics:
            out[name] = {"skipped": f.metrics["skipped"]}
        elif name in DETECTORS:
            out[name] = DETECTORS.get(name).stored_evidence(f, classes)
    return out


def replay(row: ScanEvidence, cuts: Cuts) -> Verdict:
    """The verdict the stored evidence gets under ``cuts``: each detector's findings rebuilt from it (its
    :meth:`~forensics.detect.base.Detector.replayed`), then merged. A detector missing from the row did not run
    or was not stored, and counts as not run; one no longer registered is left out."""
    classes = list(row.classes)
    results: dict[str, Findings] = {}
    for name, ev in row.detectors.items():
        if "skipped" in ev:
            results[name] = Findings([], [], [], [], metrics={"skipped": ev["skipped"]})
        elif name in DETECTORS:
            results[name] = DETECTORS.get(name).replayed(ev, classes, cuts)
    return merge(results, ProbeSet(row.model, [], classes))


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
