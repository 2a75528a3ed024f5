"""Detectors by name: each turns a suspect model and a probe set into typed findings."""
from __future__ import annotations

from forensics.core.errors import ForensicsError
from forensics.detect.findings import Findings, FlaggedLabel, ImageEvidence, TriggerCandidate, Victim
from forensics.detect.oracle_scan import OracleGuidedScan, ScanSettings

DETECTORS = {OracleGuidedScan.name: OracleGuidedScan}


def build_detector(name: str, oracle, settings: ScanSettings | None = None):
    """A detector from its registry name."""
    if name not in DETECTORS:
        raise ForensicsError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[name](oracle, settings)


__all__ = ["DETECTORS", "Findings", "FlaggedLabel", "ImageEvidence", "OracleGuidedScan", "ScanSettings",
           "TriggerCandidate", "Victim", "build_detector"]
