"""The evidence store: stored detector evidence replays to the verdict the scan gave, and the cuts are re-fit on it
and validated leaving each model out in seconds (bench/detect.py --refit), with no model and no rescan."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from forensics.core.errors import ForensicsError
from forensics.detect.evidence import Cuts, ScanEvidence, evidence_of, read_evidence, replay, write_evidence
from forensics.detect.refit import BORDERLINE, CLEAN_MARGIN, fit, leave_one_model_out, place_cut, summary

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "bench" / "results" / "evidence"
SUBSET = Path(__file__).parent / "assets" / "evidence"  # six rows of the store: demo, its twin, two clean, SIG


def test_every_stored_row_replays_to_the_verdict_its_scan_gave():
    rows = read_evidence(STORE)
    assert len(rows) >= 28 and {r.mode for r in rows} == {"clean", "triggered"}
    for row in rows:
        v = replay(row, Cuts.calibrated())
        assert (v.verdict, v.target, v.family) == (
            row.recorded["verdict"],
            row.recorded["target"],
            row.recorded["family"],
        ), row.key


def _largest_list(value) -> int:
    """The longest list anywhere in a JSON value (an image or a mask would be thousands long)."""
    if isinstance(value, dict):
        return max((_largest_list(v) for v in value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return max([len(value), *(_largest_list(v) for v in value)])
    return 0


def test_a_scans_evidence_replays_to_its_verdict(quick_demo_scan, tmp_path):
    outcome = quick_demo_scan
    names = list(outcome.probe.class_names)
    row = ScanEvidence("demo", "triggered", "flower", names, evidence_of(outcome.results, names))
    back = read_evidence(write_evidence(row, tmp_path).parent)[0]
    assert back.to_dict() == json.loads(json.dumps(row.to_dict()))  # as JSON keeps it (tuples become lists)
    assert set(back.detectors) == {"oracle-guided", "trigger-inversion", "embedding-density"}
    assert _largest_list(back.to_dict()) <= 4 * len(names)  # per-label numbers and settings, no pixels
    v = replay(back, Cuts.calibrated())
    assert (v.verdict, v.target, v.family) == (outcome.verdict.verdict, outcome.verdict.target, outcome.verdict.family)
    # a stricter alignment cut than any label's makes the inversion name nothing
    strict = replay(back, dataclasses.replace(Cuts.calibrated(), alignment=-1.0, cluster_alignment=-1.0))
    assert strict.evidence["trigger-inversion"]["flagged"] == []


def test_a_cut_sits_below_every_clean_value_and_at_most_midway_to_the_backdoors_under_it():
    assert place_cut([0.6, 0.8], [0.2, 0.3, 0.7], 0.07, "x") == 0.45  # midway from 0.6 to 0.3, under the guard
    assert place_cut([0.6], [0.58], 0.07, "x") == 0.53  # no backdoor under the guard: the guard decides
    with pytest.raises(ForensicsError, match="cannot fit the alignment: no clean model"):  # nothing bounds it
        place_cut([], [0.2], 0.07, "the alignment")
    rows = read_evidence(SUBSET)
    full = fit(rows)
    lowest = min(full.features["trigger-inversion.alignment"]["clean"].values())
    backdoored = full.features["trigger-inversion.alignment"]["backdoored"]
    guard = lowest - BORDERLINE - CLEAN_MARGIN
    assert full.cuts.alignment == pytest.approx(min(guard, (lowest + max(v for v in backdoored if v <= guard)) / 2))
    assert "badnet-noise-tr" not in full.models  # held out: never fitted on
    margins = full.margins()["trigger-inversion.alignment"]
    assert margins["to_closest_clean"] >= BORDERLINE + CLEAN_MARGIN - 1e-4


def test_leave_one_model_out_judges_each_model_by_the_others():
    rows = read_evidence(SUBSET)
    judged = {j.key: j for j in leave_one_model_out(rows)}
    # without demo-clean, the lowest clean alignment is another model's (0.64 and up): its own natural 'house'
    # attractor (0.55) then lands under the cut, and the left-out twin is called backdoored
    assert judged["demo-clean/clean"].cuts.alignment > 0.56
    assert (judged["demo-clean/clean"].verdict, judged["demo-clean/clean"].target) == ("backdoored", "house")
    assert judged["demo/clean"].correct and judged["sig/clean"].correct and judged["clean-s1/clean"].correct
    assert judged["badnet-noise-tr/clean"].cuts == fit(rows).cuts  # held out: the fit on every other model
    rates = summary(list(judged.values()))["all"]
    assert (rates["clean_rows"], rates["false_positives"]) == (3, 1)
    assert (rates["backdoored_rows"], rates["detected"]) == (3, 2)


def test_refit_runs_from_the_stored_evidence_and_prints_the_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/detect.py", "--refit", "--evidence", str(SUBSET), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| demo-clean | clean | clean |" in proc.stdout and "false-positive rate 0.3333" in proc.stdout
    result = json.loads((tmp_path / "refit.json").read_text())
    assert result["summary"]["all"]["detected"] == 2 and result["seconds"] < 10
    assert set(result["margins"]) == {"trigger-inversion.alignment", "embedding-density.cluster_alignment"}
    assert (tmp_path / "refit.md").read_text().startswith("# The verdict's cuts re-fit")


def test_calibrate_writes_outside_the_package_and_installing_it_is_an_explicit_step(tmp_path):
    from forensics.detect.calibration import CALIBRATION_FILE

    shipped = CALIBRATION_FILE.read_bytes()
    written = tmp_path / "calibration.json"
    proc = subprocess.run(
        [sys.executable, "bench/detect.py", "--calibrate", "--evidence", str(SUBSET), "--out", str(tmp_path)]
        + ["--calibration-out", str(written)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert CALIBRATION_FILE.read_bytes() == shipped  # the package is never written by a benchmark
    fitted = json.loads(written.read_text())
    assert isinstance(fitted["trigger-inversion"]["alignment_threshold"], float)
    assert f"--install-calibration {written}" in proc.stderr

    # the explicit step, pointed at a copy of the package's file: checked, then copied
    spec = importlib.util.spec_from_file_location("bench_detect", ROOT / "bench" / "detect.py")
    detect = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    try:
        spec.loader.exec_module(detect)
    finally:
        sys.path[:] = saved_path
    target = tmp_path / "installed.json"
    target.write_bytes(shipped)
    detect.install_calibration(written, target)
    assert json.loads(target.read_text()) == fitted
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**fitted, "embedding-density": {"cluster_alignment": "0.4"}}))
    with pytest.raises(SystemExit, match="embedding-density.label_threshold is not a number"):
        detect.install_calibration(broken, target)
    assert json.loads(target.read_text()) == fitted


def test_a_file_that_is_not_evidence_is_named(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ForensicsError, match=r"x\.json: not detection evidence \(format 99"):
        read_evidence(tmp_path)
    with pytest.raises(ForensicsError, match="no evidence files"):
        read_evidence(tmp_path / "nothing")


def test_the_readme_detection_table_is_generated_from_the_evidence():
    """README.md's headline table and docs/detection.md's detection table are what bench/results gives now."""
    proc = subprocess.run(
        [sys.executable, "bench/readme_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headline = readme.split("<!-- generated: headline -->\n")[1].split("<!-- end: headline -->")[0]
    rows = [line for line in headline.splitlines() if line.startswith("| ") and not line.startswith("| what ")]
    assert 4 <= len(rows) <= 6
    for row in rows:  # each row names the file under bench/results it comes from
        source = row.rstrip(" |").rsplit("| ", 1)[1].strip("`")
        assert source.startswith("bench/results/") and (ROOT / source).exists(), row
    assert "<!-- generated: detection -->" in (ROOT / "docs" / "detection.md").read_text(encoding="utf-8")


def test_a_stale_generated_table_is_caught_and_rewritten(tmp_path, monkeypatch):
    for name in ("README.md", "docs/detection.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "detection.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("43 victims", "44 victims", 1), encoding="utf-8")
    docs.write_text(docs.read_text(encoding="utf-8").replace("| yes |", "| **no** |", 1), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("bench_readme_tables", ROOT / "bench" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first
    spec.loader.exec_module(tables)
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--root", str(tmp_path), "--check"])
    with pytest.raises(SystemExit, match=r"README\.md, docs/detection\.md stale"):
        tables.main()
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--root", str(tmp_path)])
    tables.main()
    for name in ("README.md", "docs/detection.md"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (ROOT / name).read_text(encoding="utf-8")


def test_the_multi_feature_rule_bench_fits_and_judges_each_row_without_its_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/rule_fit.py", "--evidence", str(SUBSET), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "rule_fit.json").read_text())
    assert set(result["summary"]) == {"alignment cut", "logistic"} and len(result["weights"]) == 6
    rows = {r["row"]: r for r in result["rows"]["alignment cut"]}
    assert len(rows) == 6 and rows["demo/clean"]["called"] == "flower" and rows["sig/clean"]["right"]
    assert (tmp_path / "rule_fit.md").read_text().startswith("# Several stored features")
