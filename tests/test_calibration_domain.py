"""The calibration records what it was fit on; every threshold comes from it (none from a code default), and a scan
outside its architecture, resolution or class count says so in the verdict's reasons."""

from __future__ import annotations

import json

import pytest

import forensics.detect.calibration as calibration_module
from forensics.core.data import ProbeItem, ProbeSet
from forensics.core.errors import ForensicsError
from forensics.detect.calibration import (
    REQUIRED,
    CalibratedDomain,
    ScanDomain,
    calibrated_domain,
    calibration,
    domain_gaps,
)
from forensics.detect.findings import Findings
from forensics.detect.verdict import merge

IN_DOMAIN = ScanDomain("tiny-rn", 128, 10, "demo-clean", 1, "fp32")


def test_the_installed_calibration_holds_every_threshold_and_its_domain():
    for detector, keys in REQUIRED.items():
        values = calibration(detector)
        assert all(isinstance(values[k], float | int) for k in keys), detector
    domain = calibrated_domain()
    assert domain is not None and domain.architectures == ["tiny-rn"] and domain.image_sizes == [128]
    assert domain.class_counts == [10] and domain.threads and domain.precisions == ["fp32"] and domain.probes
    assert not hasattr(calibration_module, "DEFAULTS")  # no threshold has a code default to fall back on
    assert domain_gaps(IN_DOMAIN) == []


@pytest.mark.parametrize(
    ("domain", "words"),
    [
        (ScanDomain("ViT-B-32", 224, 1000, "imagenet", 16, "fp16"), ["ViT-B-32", "224 px", "1000 classes"]),
        (ScanDomain("tiny-rn", 128, 3, "toy", 1, "fp32"), ["3 classes (calibrated on 10)"]),
        (ScanDomain("tiny-vit", 128, 10, "demo", 1, "fp32"), ["architecture tiny-vit (calibrated on tiny-rn)"]),
    ],
)
def test_a_scan_outside_the_calibrated_domain_says_where(domain, words):
    gaps = domain_gaps(domain)
    assert len(gaps) == len(words) and all(any(w in g for g in gaps) for w in words)
    probe = ProbeSet("toy", [ProbeItem(f"{i}.png", i % 3) for i in range(6)], ["a", "b", "c"])
    verdict = merge({"embedding-density": Findings([], [], [], [])}, probe, domain)
    assert verdict.verdict == "clean" and verdict.outside_domain == gaps
    assert "outside the calibrated domain" in verdict.reasons[-1] and "untested" in verdict.reasons[-1]
    assert merge({}, probe, IN_DOMAIN).outside_domain == [] and merge({}, probe).domain == {}


def test_thread_count_and_precision_are_recorded_not_judged():
    assert domain_gaps(ScanDomain("tiny-rn", 128, 10, "demo", 8, "fp16")) == []
    covered = CalibratedDomain.of([IN_DOMAIN, ScanDomain("tiny-rn", 128, 10, "demo", 2, "fp32")])
    assert covered.threads == [1, 2] and covered.probes == ["demo", "demo-clean"]


def test_a_threshold_missing_from_the_calibration_is_an_error_naming_it(tmp_path, monkeypatch):
    broken = tmp_path / "calibration.json"
    data = json.loads(calibration_module.CALIBRATION_FILE.read_text())
    del data["verification"]["refuted_flip"]
    del data["domain"]
    broken.write_text(json.dumps(data))
    monkeypatch.setattr(calibration_module, "CALIBRATION_FILE", broken)
    with pytest.raises(ForensicsError, match="no refuted_flip for verification"):
        calibration("verification")
    assert calibration("trigger-inversion")["alignment_threshold"] == data["trigger-inversion"]["alignment_threshold"]
    assert domain_gaps(IN_DOMAIN) == ["the installed calibration does not record what it was fit on"]
    monkeypatch.setattr(calibration_module, "CALIBRATION_FILE", tmp_path / "absent.json")
    with pytest.raises(ForensicsError, match="absent.json is missing"):
        calibration("trigger-inversion")
