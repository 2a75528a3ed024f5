"""An output folder holds exactly its last run's files: a run replaces the folder whole (nothing stale from an
earlier run stays beside the new report), refuses a folder holding files no run of this tool wrote (a user's files
are never deleted), and SIGTERM or SIGHUP, like Ctrl-C, leaves no half-written staging folder behind."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from forensics.cli import main
from forensics.core.errors import ForensicsError
from forensics.core.files import (
    OUTPUT_MANIFEST,
    Terminated,
    check_output_folder,
    staged_output,
    termination_as_interrupt,
)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _write(stage: Path, names: list[str]) -> None:
    for name in names:
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_text(name)


def _no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(
    "first,second",
    [
        (["report.json", "trigger_0_flower.png", "trigger_0_flower_preview.png"], ["report.json"]),
        (["report.json", "compact/compact.csv", "compact/img_1.png"], ["report.json", "compact/compact.csv"]),
        (["a.txt"], ["b.txt", "sub/c.txt"]),
    ],
)
def test_a_rerun_leaves_exactly_its_own_files(tmp_path, first, second):
    out = tmp_path / "out"
    with staged_output(out) as stage:
        _write(stage, first)
    assert _files(out) == {*first, OUTPUT_MANIFEST}
    with staged_output(out) as stage:
        _write(stage, second)
    assert _files(out) == {*second, OUTPUT_MANIFEST}  # nothing of the first run is left
    assert json.loads((out / OUTPUT_MANIFEST).read_text())["files"] == sorted(second)
    assert all((out / n).read_text() == n for n in second) and _no_partials(tmp_path)


@pytest.mark.parametrize("foreign", ["notes.txt", "deep/er/photo.png", ".hidden"])
def test_a_folder_with_a_users_files_is_refused_before_any_work(tmp_path, foreign):
    out = tmp_path / "out"
    with staged_output(out) as stage:
        _write(stage, ["report.json"])
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("mine")
    with pytest.raises(ForensicsError, match="holds files no earlier run of this tool wrote there") as err:
        check_output_folder(out)
    assert foreign in str(err.value) and len(str(err.value).splitlines()) == 1
    ran = []
    with pytest.raises(ForensicsError):
        with staged_output(out):
            ran.append(1)
    assert not ran and (out / foreign).read_text() == "mine" and _no_partials(tmp_path)


def test_an_empty_folder_and_a_linked_folder_are_used_in_place(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output(empty) as stage:
        _write(stage, ["x.txt"])
    assert _files(empty) == {"x.txt", OUTPUT_MANIFEST}
    target, link = tmp_path / "target", tmp_path / "link"
    with staged_output(target) as stage:
        _write(stage, ["old.txt"])
    link.symlink_to(target)
    with staged_output(link) as stage:
        _write(stage, ["new.txt"])
    assert link.is_symlink() and _files(target) == {"new.txt", OUTPUT_MANIFEST}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_cleans_up_like_ctrl_c(tmp_path, signum):
    out = tmp_path / "out"
    previous = signal.signal(signum, signal.SIG_DFL)  # as a terminal leaves it (under nohup SIGHUP is ignored)
    with pytest.raises(Terminated) as err:
        with termination_as_interrupt(), staged_output(out) as stage:
            _write(stage, ["half.txt"])
            os.kill(os.getpid(), signum)
    try:
        assert err.value.signum == signum
        assert not out.exists() and _no_partials(tmp_path)
        assert signal.getsignal(signum) in (signal.SIG_DFL, None)  # the previous handler is back
    finally:
        signal.signal(signum, previous)


def test_an_ignored_hangup_stays_ignored(tmp_path):
    """Under nohup SIGHUP is ignored: the command keeps it so (it only takes over signals left at their default)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with termination_as_interrupt(), staged_output(tmp_path / "out") as stage:
            _write(stage, ["whole.txt"])
            os.kill(os.getpid(), signal.SIGHUP)
        assert _files(tmp_path / "out") == {"whole.txt", OUTPUT_MANIFEST}
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_rescan_of_another_model_into_the_same_folder_leaves_no_stale_trigger(tmp_path):
    out = tmp_path / "scan"
    scan = ["--quiet", "scan", "--detectors", "oracle-guided", "--out", str(out)]
    assert main([*scan[:2], "demo", *scan[2:], "--max-images", "80"]) == 0
    first = _files(out)
    assert {"trigger_0_flower.png", "trigger_0_flower_preview.png"} <= first  # the backdoored demo's trigger
    assert main([*scan[:2], "demo-clean", *scan[2:], "--max-images", "30", "--seed", "1"]) == 0
    second = _files(out)
    assert second == {*json.loads((out / OUTPUT_MANIFEST).read_text())["files"], OUTPUT_MANIFEST}
    assert json.loads((out / "report.json").read_text())["model"]["spec"] == "demo-clean"
    assert not any(name.startswith("trigger_") for name in second)  # the first scan's trigger is gone
    assert len(first - second) > 2 and _no_partials(tmp_path)
