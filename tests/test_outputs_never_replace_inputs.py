"""Outputs never replace inputs: with --out the model's own folder (or the data's, the findings'), a command whose
output would land on the model, its sidecar, the data or the findings refuses in one line and writes nothing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from forensics.cli import main
from forensics.core.models import DEMO_MODELS, load_model


def _copy_demo(folder: Path, stem: str) -> Path:
    """The demo model saved as ``folder/stem.safetensors`` with its sidecar ``folder/stem.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    src = DEMO_MODELS["demo"]
    shutil.copy(src, folder / f"{stem}.safetensors")
    shutil.copy(src.with_suffix(".json"), folder / f"{stem}.json")
    return folder / f"{stem}.safetensors"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], folder: Path, capsys) -> str:
    before = _digest(folder)
    capsys.readouterr()
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    # refused as an input it would replace, or (earlier) as a folder holding files no run of this tool wrote
    reasons = (
        "would replace one of this command's inputs",
        "holds files no earlier run",
        "one of this command's inputs",
    )
    assert len(err.splitlines()) == 1 and any(r in err for r in reasons), err
    assert _digest(folder) == before  # nothing written, nothing replaced
    return err


@pytest.mark.parametrize(
    "stem,command",
    [
        (
            "report",
            [
                "scan",
                "{model}",
                "--detectors",
                "oracle-guided",
                "--probe",
                "demo",
                "--max-images",
                "8",
                "--out",
                "{folder}",
            ],
        ),
        ("metrics", ["repair", "{model}", "--method", "cleanclip", "--probe", "demo", "--out", "{folder}"]),
        ("model", ["repair", "{model}", "--method", "cleanclip", "--probe", "demo", "--out", "{folder}"]),
        ("compare", ["compare", "{model}", "--methods", "cleanclip", "--probe", "demo", "--out", "{folder}"]),
        ("model", ["implant", "--data", "{data}", "--base", "{model}", "--epochs", "1", "--out", "{folder}"]),
        ("m", ["train-patch", "{model}", "--probe", "demo-clean", "--target", "flower", "--out", "{folder}/m.json"]),
    ],
)
def test_an_output_named_like_an_input_is_refused(stem, command, tmp_path, capsys):
    from forensics.core.data import DEMO_PROBES

    model = _copy_demo(tmp_path / "models", stem)
    args = [a.format(model=model, folder=model.parent, data=DEMO_PROBES["demo-clean"]) for a in command]
    _refused(args, model.parent, capsys)
    assert load_model(str(model)).facts.sha256  # the model still loads


def test_audit_refuses_an_output_folder_holding_its_data(tmp_path, capsys):
    from forensics.core.data import DEMO_PROBES

    data = tmp_path / "audit.csv"
    rows = DEMO_PROBES["demo-clean"].read_text().splitlines()[:9]
    base = DEMO_PROBES["demo-clean"].parent
    header, body = rows[0], [str(base / r.split(",", 1)[0]) + "," + r.split(",", 1)[1] for r in rows[1:]]
    data.write_text("\n".join([header, *body]) + "\n")
    _refused(["audit", "demo", "--data", str(data), "--out", str(tmp_path)], tmp_path, capsys)


def test_repair_into_the_scan_folder_would_replace_the_findings(tmp_path, capsys):
    scan = tmp_path / "scan"
    assert (
        main(["--quiet", "scan", "demo", "--detectors", "oracle-guided", "--max-images", "30", "--out", str(scan)]) == 0
    )
    _refused(["repair", "demo", "--findings", str(scan), "--param", "epochs=1", "--out", str(scan)], scan, capsys)
    # a separate folder is fine
    assert (
        main(
            [
                "--quiet",
                "repair",
                "demo",
                "--findings",
                str(scan),
                "--param",
                "epochs=1",
                "--out",
                str(tmp_path / "repaired"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "command",
    [
        ["scan", "demo", "--detectors", "oracle-guided", "--max-images", "8", "--out", "{out}"],
        ["repair", "demo", "--method", "cleanclip", "--out", "{out}"],
        ["compare", "demo", "--methods", "cleanclip", "--out", "{out}"],
        ["implant", "--data", "{data}", "--base", "demo", "--epochs", "1", "--out", "{out}"],
        ["audit", "demo", "--data", "{data}", "--out", "{out}"],
    ],
)
@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_output_folder_that_cannot_be_one_is_refused_before_any_work(command, where, tmp_path, capsys):
    from forensics.core.data import DEMO_PROBES

    blocker = tmp_path / "taken.txt"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "sub"
    args = [a.format(out=out, data=DEMO_PROBES["demo-clean"]) for a in command]
    capsys.readouterr()
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err and "unexpected" not in err, err
    assert blocker.read_text() == "not a folder"
