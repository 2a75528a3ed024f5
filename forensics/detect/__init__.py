"""Detectors by name: each turns a suspect model and a probe set into typed findings (``DETECTORS.build``)."""

from __future__ import annotations

from typing import Any

from forensics.detect.base import DETECTORS, Detector
from forensics.detect.embedding_density import EmbeddingDensity, EmbeddingDensitySettings
from forensics.detect.findings import Findings, FlaggedLabel, ImageEvidence, InvertedTrigger, TriggerCandidate, Victim
from forensics.detect.oracle_scan import OracleGuidedScan, ScanSettings
from forensics.detect.trigger_inversion import TriggerInversion, TriggerInversionSettings


def build_detector(name: str, oracle: Any, settings: ScanSettings | None = None) -> Detector:
    """A registered detector from its name (unknown names give the valid ones)."""
    return DETECTORS.build(name, oracle=oracle, settings=settings)


__all__ = [
    "DETECTORS",
    "Detector",
    "EmbeddingDensity",
    "EmbeddingDensitySettings",
    "Findings",
    "FlaggedLabel",
    "ImageEvidence",
    "InvertedTrigger",
    "OracleGuidedScan",
    "ScanSettings",
    "TriggerCandidate",
    "TriggerInversion",
    "TriggerInversionSettings",
    "Victim",
    "build_detector",
]
