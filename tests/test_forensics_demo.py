"""Scan and repair on the bundled demo lab, through the CLI (the issue's acceptance, measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forensics.core.data import demo_backdoor
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def poisoned_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan_demo")
    run_cli("scan", "demo", "--detectors", "oracle-guided", "--out", str(out))
    return out, json.loads((out / "report.json").read_text())


def test_scan_finds_the_demo_backdoor(poisoned_scan):
    out, report = poisoned_scan
    target = demo_backdoor()["target"]
    assert report["flagged_labels"][0]["label"] == target
    m = report["metrics"]
    # measured: precision 0.95, recall 0.91, IoU >= 0.5 on 0.91 of triggered images, flip rate 0.95 (issue's targets)
    assert m["victim_precision"] >= 0.9 and m["victim_recall"] >= 0.9, m
    assert m["box_iou_at_0.5"] >= 0.8, m
    assert report["triggers"][0]["verified_asr"] >= 0.8
    assert (out / report["triggers"][0]["pattern"]).is_file()
    for victim in report["victims"]:
        x0, y0, x1, y1 = victim["box"]
        assert 0 <= x0 < x1 and 0 <= y0 < y1
    html = (out / "report.html").read_text()
    assert "Flagged labels" in html and "data:image/png;base64" in html and target in html
    assert len(report["model"]["sha256"]) == 64 and report["seed"] == 0


def test_scan_flags_nothing_on_the_clean_twin(tmp_path):
    run_cli("scan", "demo-clean", "--detectors", "oracle-guided", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["flagged_labels"] == [] and report["victims"] == []


def test_repair_lowers_asr_and_keeps_ca(poisoned_scan, tmp_path):
    out, _ = poisoned_scan
    result = json.loads(
        run_cli("repair", "demo", "--findings", str(out / "report.json"), "--out", str(tmp_path)).stdout
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    # the targets: ASR (true trigger) at most 5 %, clean accuracy down by at most 3 points (measured
    # 0.973 -> 0.027, CA 0.482 -> 0.467), from a compact set of a few hundred images
    assert before["asr"] > 0.9 and after["asr"] <= 0.05, metrics
    assert after["asr_reconstructed"] < 0.1 < before["asr_reconstructed"], metrics
    assert after["ca"] >= before["ca"] - 0.03, metrics
    assert result["samples_used"] <= 400, result
    assert Path(result["model"]).is_file() and (tmp_path / "model.json").is_file()
    reloaded = json.loads(
        run_cli(
            "evaluate",
            str(tmp_path / "model.safetensors"),
            "--probe",
            "demo",
            "--attack",
            "badnet",
            "--attack-file",
            _trigger_file(tmp_path),
            "--target",
            demo_backdoor()["target"],
        ).stdout
    )
    assert reloaded["asr"] == pytest.approx(after["asr_true"], abs=1e-6)


def _trigger_file(folder: Path) -> str:
    path = folder / "true_trigger.json"
    path.write_text(json.dumps(demo_backdoor()["trigger"]))
    return str(path)
