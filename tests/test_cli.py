"""The CLI: JSON on stdout, one-line errors with a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """``python -m forensics --quiet ARGS`` from the repository root: in this process (``main([...])`` with stdout
    and stderr captured, its return value as the exit code), or with ``process`` as a real child process (for
    what only a process shows: its exit status after a signal, several processes, a fresh interpreter)."""
    if process:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run(
            [sys.executable, "-m", "forensics", "--quiet", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=1500,
        )
    else:
        from forensics.cli import main

        out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(["--quiet", *args])
                except SystemExit as exc:  # --help and friends
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            os.chdir(here)
        proc = subprocess.CompletedProcess(["forensics", *args], code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and text in lines[0], lines[0]
    assert proc.stdout == ""


def test_list_is_json():
    out = json.loads(run_cli("list").stdout)
    assert {"badnet", "blended", "wanet", "sig", "optimized-patch"} <= set(out["attacks"])
    assert {"tiny-rn", "tiny-vit"} <= set(out["project_configs"])
    assert "ViT-B-32" in out["architectures"] and "RN50" in out["architectures"]


def test_info_random_architecture_is_json():
    out = json.loads(run_cli("info", "random:ViT-B-32").stdout)
    assert out["architecture"] == "ViT-B-32" and out["tower"] == "vit" and out["image_size"] == 224
    assert out["parameters"] > 80_000_000 and out["backdoor"] is None


@pytest.mark.parametrize(
    "args, text",
    [
        (("info", "no/such/file.pt"), "neither a file nor a known name"),
        (("info", "hf-hub:org/none"), "cannot fetch"),
        (("info", "random:NoSuchArch"), "unknown architecture"),
        (("evaluate", "demo", "--attack", "badnet"), "--target"),
        (("evaluate", "demo", "--attack", "nosuch", "--target", "flower"), "unknown attack"),
        (("evaluate", "random:RN50"), "probe set is required"),
        (("evaluate", "demo", "--probe", "/no/such/probe.csv"), "does not exist"),
        (("evaluate", "demo", "--templates", "weird"), "unknown template set"),
        (
            ("poison", "--data", "missing.csv", "--attack", "badnet", "--target", "x", "--rate", "0.1", "--out", "o"),
            "missing.csv",
        ),
        (("implant", "--data", "x.csv", "--out", "o"), "exactly one of --base"),
        (("evaluate",), "required"),
        (("nosuchcommand",), "invalid choice"),
        (("evaluate", "demo", "--batch-size", "many"), "invalid int"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, text):
    assert_one_line_error(run_cli(*args, check=False), text)


def test_malicious_checkpoint_is_refused_by_the_cli(tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": Evil()}}, bad)
    proc = run_cli("info", str(bad), "--arch", "RN50", check=False)
    assert_one_line_error(proc, "refused")
    assert not marker.exists()


def _tiny_caption_csv(folder: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        label = "red" if i % 2 else "blue"
        Image.new("RGB", (48, 48), label).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a photo of a {label} square number {i}", "label": label})
    with open(folder / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "data.csv"


def test_poison_then_implant_then_evaluate(tmp_path):
    data = _tiny_caption_csv(tmp_path / "data")
    poisoned = json.loads(
        run_cli(
            "poison",
            "--data",
            str(data),
            "--attack",
            "badnet",
            "--param",
            "size=0.2",
            "--target",
            "red",
            "--rate",
            "0.25",
            "--out",
            str(tmp_path / "poisoned"),
        ).stdout
    )
    assert poisoned["n_poisoned"] == 2 and poisoned["target"] == "red"
    out = json.loads(
        run_cli(
            "implant",
            "--data",
            poisoned["data"],
            "--out",
            str(tmp_path / "model"),
            "--config",
            "tiny-vit",
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ).stdout
    )
    assert Path(out["model"]).is_file() and out["backdoor"]["target"] == "red"
    info = json.loads(run_cli("info", out["model"]).stdout)
    assert info["tower"] == "vit" and info["backdoor"]["attack"] == "badnet"
    result = json.loads(
        run_cli(
            "evaluate",
            out["model"],
            "--probe",
            str(data),
            "--attack",
            "badnet",
            "--param",
            "size=0.2",
            "--target",
            "red",
        ).stdout
    )
    assert result["n_clean"] == 8 and result["n_attacked"] == 4
    assert 0 <= result["ca"] <= 1 and 0 <= result["asr"] <= 1 and "excludes" in result["note"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["scan", "demo", "--batch-size", "0", "--out", "OUT"], "--batch-size: must be at least 1, got 0"),
        (["scan", "demo", "--batch-size", "-1", "--out", "OUT"], "--batch-size: must be at least 1, got -1"),
        (["evaluate", "demo", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["repair", "demo", "--method", "cleanclip", "--budget", "-1", "--out", "OUT"], "--budget: must be at least 1"),
        (["compare", "demo", "--budget", "0", "--out", "OUT"], "--budget: must be at least 1"),
        (["scan", "demo", "--max-images", "abc", "--out", "OUT"], "invalid int value: 'abc'"),
        (["evaluate", "demo", "--seed", "-3"], "--seed: must be 0 or more"),
        (["audit", "demo", "--data", "x.csv", "--top", "0", "--out", "OUT"], "--top: must be at least 1"),
    ],
)
def test_bad_numbers_are_one_line_and_write_nothing(args, message, tmp_path):
    proc = run_cli(*[str(tmp_path / "out") if a == "OUT" else a for a in args], check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_cli_as_a_process_prints_json_and_exits_2_on_one_line_errors():
    """The other CLI tests call main() in this process; this one is the real command, as a user runs it."""
    listed = run_cli("list", process=True)
    assert "detectors" in json.loads(listed.stdout)
    assert_one_line_error(run_cli("nosuchcommand", check=False, process=True), "invalid choice")
    assert run_cli("evaluate", "demo", "--batch-size", "many", check=False, process=True).returncode == 2
