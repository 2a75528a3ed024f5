"""The model-zoo audit (scan-many): one row per model with its SHA-256 and the verdict a scan of it gives; re-runs
skip what is done with the same settings, an interrupted audit resumes with the rest, a broken file gets an error
row and the audit goes on; nothing is written into the models folder, and nothing earlier is half-overwritten."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import forensics.pipelines.scan as scan_pipeline
import forensics.pipelines.scan_many as zoo
from forensics.cli import main
from forensics.core.errors import ForensicsError
from forensics.core.models import DEMO_MODELS, sha256_of
from forensics.detect import ScanSettings

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROBE = ROOT / "forensics" / "assets" / "demo" / "probe" / "probe.csv"
FAST = "oracle-guided"  # one detector: about 5 s per model on the 30-image probe (the others take a minute)


def _state(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> SHA-256 of its bytes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of an interrupted write anywhere under (and beside) ``folder``."""
    return [str(p) for p in folder.parent.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    """30 demo probe images, 12 of them carrying the planted trigger: enough for the oracle-guided scan to find
    the demo's target (flower) and nothing on the clean twin, in a few seconds a model."""
    rows = list(csv.DictReader(DEMO_PROBE.open(encoding="utf-8")))
    chosen = [r for r in rows if r["triggered"] == "1"][:12] + [r for r in rows if r["triggered"] != "1"][::12][:18]
    folder = tmp_path_factory.mktemp("probe")
    shutil.copy(DEMO_PROBE.parent / "classes.json", folder / "classes.json")
    with open(folder / "probe.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in chosen:
            for column in ("image", "mask"):
                r[column] = str(DEMO_PROBE.parent / r[column]) if r[column] else ""
            writer.writerow(r)
    return str(folder / "probe.csv")


@pytest.fixture(scope="module")
def audited(probe, tmp_path_factory):
    """The audit of both bundled models on the small probe (the run later tests compare with)."""
    out = tmp_path_factory.mktemp("zoo") / "audit"
    seen: list[tuple[float, str]] = []
    audit = zoo.scan_many(["demo", "demo-clean"], probe, out, detectors=FAST, progress=lambda f, m: seen.append((f, m)))
    return SimpleNamespace(audit=audit, out=out, progress=seen)


def _counting(monkeypatch, fail: bool = False) -> list[str]:
    """Record which models scan-many scans (and, with ``fail``, make every scan fail at once)."""
    calls: list[str] = []
    real = zoo.scan

    def counted(model, *args, **kwargs):
        calls.append(model.spec)
        if fail:
            raise ForensicsError(f"stub scan of {model.spec}")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(zoo, "scan", counted)
    return calls


def test_one_row_per_model_with_its_sha256_and_a_direct_scans_verdict(audited, probe):
    rows, out = audited.audit.rows, audited.out
    assert [r["model"] for r in rows] == ["demo", "demo-clean"]
    for row in rows:
        direct = scan_pipeline.scan(row["model"], probe, detectors=FAST).report
        assert row["status"] == "done" and not row["reused"] and row["error"] == ""
        assert row["sha256"] == sha256_of(DEMO_MODELS[row["model"]]) == direct["model"]["sha256"]
        assert row["verdict"] == direct["verdict"]["verdict"]
        assert row["target"] == (direct["verdict"]["target"] or "")
        assert row["flagged"] == [f["label"] for f in direct["flagged_labels"]]
        assert row["scores"][FAST] == max((f["score"] for f in direct["flagged_labels"]), default=None)
        own = json.loads((out / row["report"]).read_text())  # the model's own scan report, as `scan` writes it
        assert own["model"]["sha256"] == row["sha256"] and own["verdict"]["verdict"] == row["verdict"]
        assert (out / row["report"]).with_name("report.html").is_file()
    demo, clean = rows
    assert (demo["verdict"], demo["target"], demo["flagged"]) == ("backdoored", "flower", ["flower"])
    assert demo["trigger_flip"] > 0.5 and demo["victims"] > 0
    assert (clean["verdict"], clean["target"], clean["flagged"]) == ("clean", "", [])
    assert demo["sha256"] != clean["sha256"] and demo["report"] != clean["report"]

    table = list(csv.DictReader(io.StringIO((out / "audit.csv").read_text())))
    assert [(t["model"], t["sha256"], t["verdict"], t["target"], t["flagged"]) for t in table] == [
        (r["model"], r["sha256"], r["verdict"], r["target"], ";".join(r["flagged"])) for r in rows
    ]
    assert float(table[0][f"score:{FAST}"]) == demo["scores"][FAST] and table[1][f"score:{FAST}"] == ""
    data = json.loads((out / "audit.json").read_text())
    assert data["rows"] == rows and data["done"] == 2 and data["error"] == 0 and data["detectors"] == [FAST]
    md = (out / "audit.md").read_text().splitlines()
    assert any(line.startswith("| demo | demo_poisoned.safetensors | " + demo["sha256"]) for line in md)
    assert any(line.startswith("| demo-clean | demo_clean.safetensors | ") and "| clean |" in line for line in md)
    fractions = [f for f, _ in audited.progress]  # one bar: each model its half, then the tables
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("1/2 demo: ") for _, m in audited.progress)
    assert any(m.startswith("2/2 demo-clean: ") and f >= 0.5 for f, m in audited.progress)


def test_a_rerun_scans_nothing_and_keeps_every_row(audited, probe, monkeypatch):
    reports = {k: v for k, v in _state(audited.out).items() if k.startswith("models/")}
    calls = _counting(monkeypatch, fail=True)
    again = zoo.scan_many(["demo", "demo-clean"], probe, audited.out, detectors=FAST)
    assert calls == []
    assert [r["reused"] for r in again.rows] == [True, True] and again.count("scanned") == 0
    keep = ("model", "sha256", "status", "verdict", "target", "flagged", "scores", "report", "settings_key")
    assert [{k: r[k] for k in keep} for r in again.rows] == [{k: r[k] for k in keep} for r in audited.audit.rows]
    assert {k: v for k, v in _state(audited.out).items() if k.startswith("models/")} == reports
    # a copy of the same file (same SHA-256) under another name is not scanned either
    copy = audited.out.parent / "copies" / "suspect.safetensors"
    copy.parent.mkdir()
    shutil.copy(DEMO_MODELS["demo"], copy)
    shutil.copy(DEMO_MODELS["demo"].with_suffix(".json"), copy.with_suffix(".json"))
    audit = zoo.scan_many([str(copy)], probe, audited.out, detectors=FAST)
    assert calls == [] and audit.rows[0]["reused"] and audit.rows[0]["verdict"] == "backdoored"
    assert audit.rows[0]["model"] == str(copy) and audit.rows[0]["file"] == "suspect.safetensors"


@pytest.mark.parametrize(
    "change",
    [
        {"settings": ScanSettings(seed=1)},
        {"detectors": "oracle-guided,embedding-density"},
        {"max_images": 20},
        {"oracle": "superpixel"},
        {"probe": "fewer images"},
    ],
    ids=["seed", "detectors", "max-images", "oracle", "probe"],
)
def test_a_changed_setting_scans_again(audited, probe, change, monkeypatch, tmp_path):
    calls = _counting(monkeypatch, fail=True)  # a stub: which models would be scanned, without scanning
    assert zoo.scan_many(["demo"], probe, audited.out, detectors=FAST).rows[0]["reused"] and calls == []
    kwargs = {"detectors": FAST, **change}
    if change.get("probe"):
        lines = Path(probe).read_text().splitlines()
        (tmp_path / "probe.csv").write_text("\n".join(lines[:-1]) + "\n")  # the same images but one
        shutil.copy(Path(probe).with_name("classes.json"), tmp_path / "classes.json")
        kwargs["probe"] = str(tmp_path / "probe.csv")
    audit = zoo.scan_many(["demo"], kwargs.pop("probe", probe), audited.out, **kwargs)
    assert calls == ["demo"]
    row = audit.rows[0]
    assert (row["status"], row["error"]) == ("error", "stub scan of demo") and not row["reused"]
    assert row["settings_key"] != audited.audit.rows[0]["settings_key"]


def test_the_same_probe_under_another_path_is_the_same_setting(audited, probe, monkeypatch, tmp_path):
    calls = _counting(monkeypatch, fail=True)
    moved = tmp_path / "elsewhere.csv"
    shutil.copy(probe, moved)
    shutil.copy(Path(probe).with_name("classes.json"), tmp_path / "classes.json")
    audit = zoo.scan_many(["demo"], str(moved), audited.out, detectors=FAST)
    assert calls == [] and audit.rows[0]["reused"]


def test_an_interrupted_audit_resumes_with_the_rest(probe, monkeypatch, tmp_path):
    out = tmp_path / "zoo"
    calls = _counting(monkeypatch)

    def first_model_done() -> bool:  # the Cancel button, pressed once the first model's row is on disk
        path = out / "rows" / "rank-0-of-1.json"
        return path.is_file() and len(json.loads(path.read_text())["rows"]) >= 1

    with pytest.raises(ForensicsError, match="audit cancelled: 1 of 2 models done .* run it again"):
        zoo.scan_many(["demo-clean", "demo"], probe, out, detectors=FAST, cancel=first_model_done)
    assert calls == ["demo-clean"]
    assert not [n for n in zoo.TABLE_FILES if (out / n).exists()]  # no table of a half-done audit
    assert not _leftovers(out)
    audit = zoo.scan_many(["demo-clean", "demo"], probe, out, detectors=FAST)
    assert calls == ["demo-clean", "demo"]
    assert [r["reused"] for r in audit.rows] == [True, False]
    assert [r["verdict"] for r in audit.rows] == ["clean", "backdoored"]


def test_cancel_during_a_scan_stops_it_without_an_error_row(probe, tmp_path):
    out = tmp_path / "zoo"
    pressed: list[str] = []

    def progress(fraction: float, message: str) -> None:  # Cancel is pressed once the detector is under way
        if FAST in message:
            pressed.append(message)

    with pytest.raises(ForensicsError, match="audit cancelled: 0 of 1 models"):
        zoo.scan_many(["demo"], probe, out, detectors=FAST, progress=progress, cancel=lambda: bool(pressed))
    assert len(pressed) == 1  # the scan stopped at its next step
    assert not (out / "models").exists() or not any((out / "models").iterdir())
    assert not _leftovers(out)


def test_an_interrupted_rerun_leaves_every_earlier_file_whole(audited, probe, monkeypatch, tmp_path):
    out = tmp_path / "audit"
    shutil.copytree(audited.out, out)
    before = _state(out)

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the new report is drawn

    monkeypatch.setattr(scan_pipeline, "write_scan_html", interrupt)
    with pytest.raises(KeyboardInterrupt):
        zoo.scan_many(["demo", "demo-clean"], probe, out, detectors=FAST, settings=ScanSettings(seed=3))
    assert _state(out) == before and not _leftovers(out)
    # Ctrl-C while the new tables are written (audit.csv is done, audit.md is not): the earlier tables stay
    real_write = zoo.atomic_write_text

    def table_interrupt(path, text):
        if Path(path).name == "audit.md":
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(zoo, "atomic_write_text", table_interrupt)
    with pytest.raises(KeyboardInterrupt):
        zoo.scan_many(["demo"], probe, out, detectors=FAST)  # reused: only the tables are written
    after = _state(out)
    assert [after[n] for n in zoo.TABLE_FILES] == [before[n] for n in zoo.TABLE_FILES]  # all three, not a mix
    assert not _leftovers(out)


def test_models_dir_via_the_cli_with_a_broken_file(probe, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(DEMO_MODELS["demo-clean"], models / "clean_copy.safetensors")
    shutil.copy(DEMO_MODELS["demo-clean"].with_suffix(".json"), models / "clean_copy.json")
    (models / "x.safetensors").write_bytes(os.urandom(4096))
    (models / "notes.txt").write_text("not a checkpoint")
    (models / "nested").mkdir()
    shutil.copy(DEMO_MODELS["demo"], models / "nested" / "deeper.safetensors")  # not recursive: not audited
    before = _state(models)
    out = tmp_path / "audit"
    args = ["--quiet", "scan-many", "demo-clean", "--models-dir", str(models), "--probe", probe]
    assert main([*args, "--detectors", FAST, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = json.loads((out / "audit.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [
        "demo-clean",
        str(models / "clean_copy.safetensors"),
        str(models / "x.safetensors"),
    ]
    clean, copy, broken = rows
    assert clean["status"] == copy["status"] == "done" and clean["verdict"] == copy["verdict"] == "clean"
    assert clean["sha256"] == copy["sha256"] == sha256_of(models / "clean_copy.safetensors")
    assert copy["reused"] and not clean["reused"]  # the copy has the same SHA-256: scanned once
    assert (
        broken["status"] == "error"
        and broken["verdict"] == ""
        and broken["sha256"] == sha256_of(models / "x.safetensors")
    )
    assert "x.safetensors" in broken["error"] and "\n" not in broken["error"] and "Traceback" not in broken["error"]
    assert (summary["models"], summary["scanned"], summary["reused"], summary["errors"]) == (3, 1, 1, 1)
    assert summary["audit_csv"] == str(out / "audit.csv")
    assert _state(models) == before  # nothing written into (or beside) the models
    assert not [p for p in models.parent.iterdir() if p.name not in ("models", "audit")]
    # an output folder that is the models folder is refused before anything runs
    assert main(["--quiet", "scan-many", "--models-dir", str(models), "--detectors", FAST, "--out", str(models)]) == 2
    assert "lies in the models folder" in capsys.readouterr().err
    assert main(["--quiet", "scan-many", str(models / "x.safetensors"), "--out", str(models)]) == 2
    assert "is the folder of the model x.safetensors" in capsys.readouterr().err
    assert _state(models) == before
    assert main(["--quiet", "scan-many", "--out", str(tmp_path / "none")]) == 2
    assert "name the models to audit" in capsys.readouterr().err
    assert main(["--quiet", "scan-many", "--models-dir", str(models / "nested" / "no"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_processes_share_the_models_out_and_rank_0_merges(probe, monkeypatch, tmp_path):
    """Two ranks run one after the other (no torch.distributed: no barrier): each does models i % 2 == rank and
    writes its own rows; rank 0 lists the other's models as pending until their rows exist, then merges them."""
    calls = _counting(monkeypatch, fail=True)
    out = tmp_path / "zoo"
    models = ["demo", "demo-clean", "random:tiny-rn"]
    first = zoo.scan_many(models, probe, out, detectors=FAST, rank=0, world_size=2)
    assert calls == ["demo", "random:tiny-rn"] and first.merged
    assert [r["status"] for r in first.rows] == ["error", "pending", "error"]
    assert "not finished by rank 1" in first.rows[1]["error"]
    second = zoo.scan_many(models, probe, out, detectors=FAST, rank=1, world_size=2)
    assert calls[2:] == ["demo-clean"] and not second.merged and [r["model"] for r in second.rows] == ["demo-clean"]
    assert not second.files  # only rank 0 writes the tables
    merged = zoo.scan_many(models, probe, out, detectors=FAST, rank=0, world_size=2)
    assert [r["error"] for r in merged.rows] == [f"stub scan of {m}" for m in models]
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["rank-0-of-2.json", "rank-1-of-2.json"]
    with pytest.raises(ForensicsError, match="rank 2 of world size 2"):
        zoo.scan_many(models, probe, out, detectors=FAST, rank=2, world_size=2)


def test_the_workbench_audits_uploads_in_the_sessions_own_folder(monkeypatch, tmp_path):
    gr = pytest.importorskip("gradio")
    from forensics.ui import common, zoo_tab

    monkeypatch.setattr(common, "WORK_ROOT", tmp_path / "work")
    monkeypatch.setattr(common, "_SESSIONS", {})
    uploads = tmp_path / "uploads"  # where Gradio left the user's files
    uploads.mkdir()
    shutil.copy(DEMO_MODELS["demo-clean"], uploads / "mine.safetensors")
    shutil.copy(DEMO_MODELS["demo-clean"].with_suffix(".json"), uploads / "mine.json")
    (uploads / "broken.pt").write_bytes(os.urandom(2048))
    files = [str(uploads / n) for n in ("mine.safetensors", "mine.json", "broken.pt")]
    before = _state(uploads)
    state = common.initial_state()
    session = SimpleNamespace(session_hash="session-zoo")
    table, downloads, text = zoo_tab.audit_zoo(
        state, files, [], "demo", [FAST], 20, request=session, progress=lambda *a, **k: None
    )
    assert list(table["model"]) == ["broken.pt", "mine.safetensors"]  # names, never server paths
    assert list(table["status"]) == ["error", "done"] and table["verdict"][1] == "clean"
    assert table["sha256"][1] == sha256_of(DEMO_MODELS["demo-clean"])[:12]
    assert "broken.pt" in table["error"][0] and str(tmp_path) not in table["error"][0]
    assert "2 models: 1 clean, 1 could not be scanned" in text
    folder = common.session_dir(session)
    assert [Path(d).name for d in downloads] == ["audit.csv", "audit.json"]
    assert all(Path(d).parent.parent == folder and Path(d).parent.name.startswith("zoo-") for d in downloads)
    rows = list(csv.DictReader(open(downloads[0], encoding="utf-8")))
    assert [r["status"] for r in rows] == ["error", "done"]
    assert _state(uploads) == before
    with pytest.raises(gr.Error, match="notes.txt is no checkpoint"):
        (uploads / "notes.txt").write_text("x")
        zoo_tab.audit_zoo(state, [str(uploads / "notes.txt")], [], "demo", [FAST], 20, request=session)
    with pytest.raises(gr.Error, match="upload checkpoints or tick a bundled model"):
        zoo_tab.audit_zoo(state, [], [], "demo", [FAST], 20, request=session)
    with pytest.raises(gr.Error, match="server paths are disabled"):
        zoo_tab.audit_zoo(state, [], ["demo"], str(DEMO_PROBE), [FAST], 20, request=session)
