"""Interrupted work leaves nothing half-written: outputs are staged beside --out and moved into place at the end,
so Ctrl-C, SIGTERM (or a failure) during a scan, repair or compare leaves the previous result, or nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forensics.pipelines.repair as repair_pipeline
import forensics.pipelines.scan as scan_pipeline
from forensics.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _state(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def older_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("older") / "scan"
    assert (
        main(["--quiet", "scan", "demo", "--detectors", "oracle-guided", "--max-images", "30", "--out", str(out)]) == 0
    )
    return out


def test_an_interrupted_rescan_keeps_the_previous_result(older_scan, monkeypatch, capsys):
    before = _state(older_scan)
    monkeypatch.setattr(scan_pipeline, "write_scan_html", _interrupt)  # Ctrl-C while the report is drawn
    assert (
        main(
            [
                "--quiet",
                "scan",
                "demo",
                "--detectors",
                "oracle-guided",
                "--max-images",
                "40",
                "--seed",
                "1",
                "--out",
                str(older_scan),
            ]
        )
        == 130
    )
    assert "interrupted" in capsys.readouterr().err
    assert _state(older_scan) == before and _no_partials(older_scan.parent)


def test_an_interrupted_first_scan_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_pipeline, "write_compact_set", _interrupt)  # after the trigger PNGs were written
    assert (
        main(
            [
                "--quiet",
                "scan",
                "demo",
                "--detectors",
                "oracle-guided",
                "--max-images",
                "30",
                "--out",
                str(tmp_path / "new"),
            ]
        )
        == 130
    )
    assert not (tmp_path / "new").exists() and _no_partials(tmp_path)


def test_a_failed_repair_writes_no_model_and_no_metrics(older_scan, tmp_path, monkeypatch):
    monkeypatch.setattr(repair_pipeline, "write_repair_html", _interrupt)  # the model and metrics.json are staged
    out = tmp_path / "repair"
    args = ["--quiet", "repair", "demo", "--findings", str(older_scan), "--param", "epochs=1", "--out", str(out)]
    assert main(args) == 130
    assert not out.exists() and _no_partials(tmp_path)


def _wait_for_cpu_seconds(proc: subprocess.Popen, seconds: float, wall_limit: float = 180.0) -> None:
    """Wait until ``proc`` has used ``seconds`` of CPU (or ended): a fixed sleep on a loaded machine can land the
    signal in the interpreter's imports, before the command handles Ctrl-C at all."""
    stat = Path(f"/proc/{proc.pid}/stat")
    if not stat.exists():  # not Linux: a sleep as long as the fixed one was
        time.sleep(12)
        return
    tick, start = os.sysconf("SC_CLK_TCK"), time.time()
    while proc.poll() is None and time.time() - start < wall_limit:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / tick >= seconds:  # utime + stime
            return
        time.sleep(0.2)


@pytest.mark.parametrize(
    "signum,code,said",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 128 + signal.SIGTERM, "terminated (SIGTERM)")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_during_a_real_scan_leaves_nothing(tmp_path, signum, code, said):
    """Ctrl-C, and SIGTERM (which the command turns into the same clean-up), end a real scan leaving nothing."""
    out = tmp_path / "scan"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forensics",
            "--quiet",
            "scan",
            "demo",
            "--detectors",
            "oracle-guided",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_cpu_seconds(proc, 10.0)  # well into the 300-image scan (imports take about 4 CPU s, the scan 30)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal: then the result must be whole
        assert (out / "report.json").is_file() and (out / "report.html").is_file()
    else:
        assert proc.returncode == code and said in err and not out.exists(), (proc.returncode, err)
    assert _no_partials(tmp_path)


def test_an_interrupted_poisoning_leaves_nothing(tmp_path, monkeypatch):
    import forensics.attacks.poison as poison
    from forensics.attacks import build_attack
    from forensics.core.data import DEMO_PROBES

    calls = {"n": 0}
    real = poison.to_pil

    def interrupt_on_third(image):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(poison, "to_pil", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        poison.poison_dataset(DEMO_PROBES["demo-clean"], build_attack("badnet"), "flower", 0.1, tmp_path / "poisoned")
    assert not (tmp_path / "poisoned").exists() and _no_partials(tmp_path)
