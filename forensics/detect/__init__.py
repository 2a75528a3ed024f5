"""Detectors by name: each turns a suspect model and a probe set into typed findings (:func:`build_detector`)."""

from __future__ import annotations

from forensics.detect.base import (
    DETECTORS,
    PROFILES,
    Detector,
    all_detectors,
    build_detector,
    detector_settings,
    profile_name,
)
from forensics.detect.embedding_density import EmbeddingDensity, EmbeddingDensitySettings
from forensics.detect.findings import Findings, FlaggedLabel, ImageEvidence, InvertedTrigger, TriggerCandidate, Victim
from forensics.detect.oracle_scan import OracleGuidedScan, ScanSettings
from forensics.detect.trigger_inversion import TriggerInversion, TriggerInversionSettings

__all__ = [
    "DETECTORS",
    "PROFILES",
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
    "all_detectors",
    "build_detector",
    "detector_settings",
    "profile_name",
]
