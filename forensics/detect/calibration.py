"""Decision thresholds fit on clean and backdoored models (``bench/detect.py --calibrate``, put here by its
``--install-calibration`` after review), and the domain they were fit on.

Every threshold a scan applies comes from ``calibration.json`` beside this file (a caller's settings may override
one); none has a code default, so a threshold the refit did not write is an error, not a silent guess. The file also
records what the fit saw (:class:`CalibratedDomain`: architectures, input resolution, class count, probe sets,
thread count, precision): a scan of another architecture, resolution or class count is outside what the thresholds
were measured on, and its verdict says so (:func:`domain_gaps`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from forensics.core.errors import ForensicsError
from forensics.core.resources import package_path
from forensics.detect.findings import Record

CALIBRATION_FILE = package_path("detect", "calibration.json")

REQUIRED: dict[str, tuple[str, ...]] = {
    "trigger-inversion": ("anomaly_threshold", "alignment_threshold", "borderline"),
    "embedding-density": ("label_threshold", "victim_z", "cluster_alignment"),
    # a reconstructed or inverted trigger is verified at this flip rate on clean images of other classes, and an
    # oracle flag whose best trigger flips less than refuted_flip is refuted (read by the oracle scan and inversion)
    "verification": ("verified_flip", "refuted_flip"),
}
"""The thresholds each detector reads from the calibration (``--install-calibration`` refuses a file without one)."""


@dataclass
class ScanDomain(Record):
    """What one scan ran on: the model's architecture and input resolution, the probe's class count and name, and
    the machine's thread count and the model's precision (which move the inversion's numbers slightly)."""

    architecture: str
    image_size: int
    classes: int
    probe: str
    threads: int
    precision: str

    @classmethod
    def of(cls, model: Any, probe: Any) -> "ScanDomain":
        """The domain of scanning ``model`` (a SuspectModel) on ``probe`` (a ProbeSet) here."""
        return cls(
            architecture=model.facts.architecture,
            image_size=int(model.image_size),
            classes=len(probe.class_names),
            probe=str(probe.name),
            threads=torch.get_num_threads(),
            precision=model.facts.precision,
        )


@dataclass
class CalibratedDomain(Record):
    """Every value the calibration's scans took, per field of :class:`ScanDomain` (sorted, each once)."""

    architectures: list[str] = field(default_factory=list)
    image_sizes: list[int] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, domains: list[ScanDomain]) -> "CalibratedDomain":
        """The domain a fit on scans of ``domains`` covers."""
        return cls(
            architectures=sorted({d.architecture for d in domains}),
            image_sizes=sorted({d.image_size for d in domains}),
            class_counts=sorted({d.classes for d in domains}),
            probes=sorted({d.probe for d in domains}),
            threads=sorted({d.threads for d in domains}),
            precisions=sorted({d.precision for d in domains}),
        )


@lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> dict[str, Any]:
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ForensicsError(f"{path}: cannot read the detectors' calibration ({exc})") from None
    if not isinstance(data, dict):
        raise ForensicsError(f"{path}: the detectors' calibration must be a JSON object")
    return data


def calibration_data() -> dict[str, Any]:
    """The whole calibration file (thresholds per detector, and ``domain``)."""
    if not CALIBRATION_FILE.is_file():
        raise ForensicsError(
            f"{CALIBRATION_FILE} is missing: the detectors have no thresholds (python bench/detect.py --calibrate, "
            "then --install-calibration)"
        )
    return _read(str(CALIBRATION_FILE), CALIBRATION_FILE.stat().st_mtime)


def calibration(detector: str) -> dict[str, Any]:
    """The thresholds (and their provenance, under ``"calibrated_on"``) for ``detector``; every threshold the
    detector reads (:data:`REQUIRED`) must be there."""
    values = dict(calibration_data().get(detector) or {})
    missing = [key for key in REQUIRED.get(detector, ()) if key not in values]
    if missing:
        raise ForensicsError(
            f"{CALIBRATION_FILE.name}: no {', '.join(missing)} for {detector} (re-run python bench/detect.py "
            "--calibrate and install it)"
        )
    return values


def calibrated_domain() -> CalibratedDomain | None:
    """What the installed thresholds were fit on (None for a file from before domains were recorded)."""
    domain = calibration_data().get("domain")
    return CalibratedDomain(**domain) if isinstance(domain, dict) else None


def domain_gaps(domain: ScanDomain, calibrated: CalibratedDomain | None = None) -> list[str]:
    """Where a scan leaves the calibrated domain (architecture, input resolution, class count), one phrase each;
    the thresholds were measured there only, so the verdict says it rests on them untested."""
    calibrated = calibrated if calibrated is not None else calibrated_domain()
    if calibrated is None:
        return ["the installed calibration does not record what it was fit on"]
    gaps = []
    if calibrated.architectures and domain.architecture not in calibrated.architectures:
        gaps.append(f"architecture {domain.architecture} (calibrated on {', '.join(calibrated.architectures)})")
    if calibrated.image_sizes and domain.image_size not in calibrated.image_sizes:
        sizes = ", ".join(f"{s} px" for s in calibrated.image_sizes)
        gaps.append(f"input resolution {domain.image_size} px (calibrated on {sizes})")
    if calibrated.class_counts and domain.classes not in calibrated.class_counts:
        counts = ", ".join(str(c) for c in calibrated.class_counts)
        gaps.append(f"{domain.classes} classes (calibrated on {counts})")
    return gaps
