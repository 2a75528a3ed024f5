"""Findings belong to one model file: repair (and compare) refuse a scan of another model unless --force."""

from __future__ import annotations

import json

import pytest

from forensics.cli import main


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    assert (
        main(["--quiet", "scan", "demo", "--detectors", "oracle-guided", "--max-images", "40", "--out", str(out)]) == 0
    )
    return out


def test_repair_refuses_findings_of_another_model_unless_forced(demo_scan, tmp_path, capsys):
    capsys.readouterr()
    args = ["--quiet", "repair", "demo-clean", "--findings", str(demo_scan), "--param", "epochs=1"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the findings were made on another model file") and "--force" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "refused").exists()  # nothing written
    assert main([*args, "--out", str(tmp_path / "forced"), "--force"]) == 0
    metrics = json.loads((tmp_path / "forced" / "metrics.json").read_text())
    assert any("different model file" in note and "--force" in note for note in metrics["notes"])


def test_same_model_findings_are_accepted_without_a_note(demo_scan, tmp_path):
    assert (
        main(["--quiet", "repair", "demo", "--findings", str(demo_scan), "--param", "epochs=1", "--out", str(tmp_path)])
        == 0
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert not any("different model file" in note for note in metrics["notes"])


def test_compare_with_findings_of_another_model_makes_that_row_an_error(demo_scan, tmp_path):
    from forensics.pipelines.compare import run_compare

    report = run_compare(
        "demo-clean",
        "oracle-finetune",
        tmp_path,
        budget=120,
        findings=str(demo_scan),
        settings={"oracle-finetune": {"epochs": 1}},
    )
    (row,) = report["rows"]
    assert row["status"] == "error" and "another model file" in row["error"]


@pytest.mark.parametrize("identity", ["missing", "", None], ids=["no-key", "empty", "null"])
def test_findings_without_their_models_sha256_are_refused_unless_forced(demo_scan, tmp_path, capsys, identity):
    """Findings that do not say which model file they were made on cannot be shown to be this model's: refused in
    one line like a wrong identity, nothing written; --force uses them with a note (once: the same path each time)."""
    import shutil

    findings = tmp_path / "findings"
    shutil.copytree(demo_scan, findings)
    report = json.loads((findings / "report.json").read_text())
    if identity == "missing":
        del report["model"]["sha256"]
    else:
        report["model"]["sha256"] = identity
    (findings / "report.json").write_text(json.dumps(report))
    capsys.readouterr()
    args = ["--quiet", "repair", "demo", "--findings", str(findings), "--param", "epochs=1"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the findings do not name the model file they were made on") and "--force" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "refused").exists()
    if identity == "missing":
        assert main([*args, "--out", str(tmp_path / "forced"), "--force"]) == 0
        notes = json.loads((tmp_path / "forced" / "metrics.json").read_text())["notes"]
        assert any("do not name the model file" in n and "--force" in n for n in notes)


def test_a_model_without_a_file_identity_does_not_take_another_models_findings(demo_scan, tmp_path, capsys):
    """Random weights have no SHA-256: the demo's findings are refused for them, as for any other model."""
    capsys.readouterr()
    args = ["--quiet", "repair", "random:tiny-rn", "--findings", str(demo_scan), "--param", "epochs=1"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no SHA-256 to match" in err and len(err.splitlines()) == 1 and not (tmp_path / "refused").exists()
