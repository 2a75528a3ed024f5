"""Decision thresholds calibrated on clean models (fit by ``bench/detect.py --calibrate``, put here by its
``--install-calibration`` after review).

Each detector's thresholds sit in ``calibration.json`` beside this file, with the clean models they were set
on and the margin to the closest clean value, so a report can say why a model was (not) flagged. Values a
caller passes in settings win over the file; the file's defaults hold when it lacks a detector.
"""

from __future__ import annotations

import json
from typing import Any

from forensics.core.resources import package_path

CALIBRATION_FILE = package_path("detect", "calibration.json")

DEFAULTS: dict[str, dict[str, Any]] = {
    # Neural Cleanse's anomaly index cut (2). Alignment of the natural attractors measured on clean models: the
    # clean twin's local 'house' 0.53 (bench/detect.py; 0.57 in another run) and global 'house' 0.60-0.86, a
    # second clean tiny CLIP's local 'house' 0.94; of backdoors: the demo's 0.36, a Blended model's 0.42 (its
    # local 'house', 0.55, is natural too). The cut sits between, with thin margins (borderline: up to 0.49,
    # inconclusive); bench/detect.py --calibrate replaces it from more clean models.
    "trigger-inversion": {"anomaly_threshold": 2.0, "alignment_threshold": 0.46, "borderline": 0.03},
    # cluster_alignment: a hijacked cluster's centroid against the label's own images; measured in bench/detect.py's
    # zoo (11 models x 2 probe modes): triggered clusters 0.02-0.34, natural ones fed by other classes 0.60-0.94
    "embedding-density": {"label_threshold": 3.0, "victim_z": 2.0, "cluster_alignment": 0.46},
}


def calibration(detector: str) -> dict[str, Any]:
    """The thresholds (and their provenance, under ``"calibrated_on"``) for ``detector``."""
    values = dict(DEFAULTS.get(detector, {}))
    if CALIBRATION_FILE.is_file():
        values.update(json.loads(CALIBRATION_FILE.read_text(encoding="utf-8")).get(detector, {}))
    return values
