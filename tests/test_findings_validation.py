"""Findings are untrusted input too: wrong types and files outside the findings' folder are one clear line."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from forensics.cli import main
from forensics.core.errors import ForensicsError
from forensics.core.models import load_model
from forensics.pipelines.repair import load_repair_data, read_findings


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "scan"
    assert (
        main(["--quiet", "scan", "demo", "--detectors", "oracle-guided", "--max-images", "60", "--out", str(out)]) == 0
    )
    return out


def _copy(scan_dir, tmp_path):
    folder = tmp_path / "findings"
    shutil.copytree(scan_dir, folder)
    return folder, json.loads((folder / "report.json").read_text())


def _write(folder, report):
    (folder / "report.json").write_text(json.dumps(report))


TRIGGER = {
    "label": "flower",
    "pattern": "trigger_0_flower.png",
    "size": 0.1,
    "n_crops": 1,
    "verified_asr": 1.0,
    "n_verified": 1,
}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.update(triggers="many"), "'triggers' must be a list of objects"),
        (lambda r: r.update(victims=[1, 2]), "'victims' must be a list of objects"),
        (lambda r: r.update(probe=[]), "'probe' must be an object"),
        (lambda r: r["probe"].update(classes="flower"), "'probe.classes' must be a non-empty list"),
        (lambda r: r["compact_set"].update(csv=7), "'compact_set.csv' must be a path"),
        (lambda r: r.update(triggers=[{**TRIGGER, "size": "big"}]), "'triggers[].size' must be a number"),
        (lambda r: r.update(triggers=[{**TRIGGER, "label": "nothing-like-it"}]), "'triggers[].label' must be one of"),
        (lambda r: r.update(triggers=[{**TRIGGER, "pattern": "../../../etc/passwd"}]), "trigger pattern outside"),
        (lambda r: r.update(triggers=[{**TRIGGER, "pattern": "/etc/passwd"}]), "trigger pattern outside"),
        (lambda r: r["compact_set"].update(csv="/etc/passwd"), "compact set outside"),
        (lambda r: r["compact_set"].update(csv="../scan/compact/compact.csv"), "compact set outside"),
    ],
)
def test_bad_findings_are_refused_in_one_line(scan_dir, tmp_path, change, message):
    folder, report = _copy(scan_dir, tmp_path)
    change(report)
    _write(folder, report)
    with pytest.raises(ForensicsError, match=re.escape(message)) as excinfo:
        read_findings(folder)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    "row,message",
    [
        ("../../../../etc/hostname,a photo of a flower.,flower,anchor,0,", "is outside its folder"),
        ("images/x.png,a photo.,not-a-class,anchor,0,", "a label among the probe's classes"),
        ("images/x.png,a photo.,flower,mystery,0,", "a kind"),
    ],
)
def test_compact_rows_that_leave_their_folder_or_lie_are_refused(scan_dir, tmp_path, row, message):
    folder, _ = _copy(scan_dir, tmp_path)
    csv_path = folder / "compact" / "compact.csv"
    csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n" + row + "\n")
    with pytest.raises(ForensicsError, match=message):
        load_repair_data(read_findings(folder), load_model("demo"))


def test_a_symlinked_pattern_pointing_out_is_refused(scan_dir, tmp_path):
    folder, report = _copy(scan_dir, tmp_path)
    (folder / "evil.png").symlink_to("/etc/hostname")
    report["triggers"] = [{**TRIGGER, "pattern": "evil.png"}]
    _write(folder, report)
    with pytest.raises(ForensicsError, match="trigger pattern outside"):
        read_findings(folder)


def test_the_cli_says_it_in_one_line(scan_dir, tmp_path, capsys):
    folder, report = _copy(scan_dir, tmp_path)
    report["triggers"] = [{**TRIGGER, "pattern": "../../../etc/passwd"}]
    _write(folder, report)
    capsys.readouterr()
    assert main(["--quiet", "repair", "demo", "--findings", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the findings name a trigger pattern outside") and len(err.splitlines()) == 1


def test_stamped_rows_read_back_know_their_clean_source(scan_dir, tmp_path):
    folder, _ = _copy(scan_dir, tmp_path)
    csv_path = folder / "compact" / "compact.csv"
    lines = csv_path.read_text().splitlines()
    image = lines[1].split(",")[0]  # any image of the set stands in for a stamped one and its source
    extra = [
        f"{image},a photo of a clock.,clock,inverted-source,42,",
        f"{image},a photo of a clock.,clock,inverted-trigger,42,",
        f"{image},a photo of a clock.,clock,inverted-trigger,43,",  # its source is not in the set
    ]
    csv_path.write_text("\n".join(lines + extra) + "\n")
    data = load_repair_data(read_findings(folder), load_model("demo"))
    n = len(lines) - 1
    assert data.sources == [-1] * n + [-1, n, -1]
