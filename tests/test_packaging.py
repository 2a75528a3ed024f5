"""`pip install .` gives the `forensics` command and the library from any directory, carrying every data file the
library reads (demo lab, model configs, calibration, the v2 catalogue) inside the package.

The package is built from a copy of the checkout (so no build/ or egg-info lands in it) and installed without
network into a temporary target; the commands then run from another directory with only that target on
PYTHONPATH, so the checkout cannot be imported by accident."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "requirements.txt", "README.md")


def _data_files(package: Path) -> set[str]:
    """The non-Python files under ``package``, relative to it (no byte code)."""
    files = (p.relative_to(package) for p in package.rglob("*") if p.is_file())
    return {f.as_posix() for f in files if "__pycache__" not in f.parts and f.suffix not in {".py", ".pyc"}}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --no-build-isolation --no-index --target T`` of a copy of the checkout; yields T."""
    base = tmp_path_factory.mktemp("packaging")
    src, target = base / "src", base / "target"
    src.mkdir()
    for name in SOURCES:
        shutil.copy2(REPO / name, src / name)
    # a locally rebuilt training set (make-demo) is ignored by git and never shipped; no need to copy it
    shutil.copytree(
        REPO / "forensics", src / "forensics", ignore=shutil.ignore_patterns("__pycache__", "train", "train_poisoned")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--target", str(target), str(src)],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _run_elsewhere(target: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_installed_command_loads_the_demo_from_inside_the_package(installed, tmp_path):
    script = installed / "bin" / "forensics"
    assert script.is_file()
    facts = json.loads(_run_elsewhere(installed, tmp_path, str(script), "info", "demo").stdout)
    assert Path(facts["source"]).is_relative_to(installed.resolve()), facts["source"]
    assert facts["architecture"] == "tiny-rn" and facts["backdoor"]["target"] == "flower"


def test_the_installed_library_imports_and_reads_its_data_from_another_directory(installed, tmp_path):
    code = (
        "import json, forensics\n"
        "print(forensics.scan)\n"
        "from forensics.core.data import load_probe_set\n"
        "from forensics.core.models import PROJECT_CONFIG_DIR, project_configs\n"
        "from forensics.demo.catalogue import CATALOGUE_PATH\n"
        "from forensics.detect.calibration import CALIBRATION_FILE, calibration\n"
        "probe = load_probe_set('demo-clean')\n"
        "print(json.dumps({'package': forensics.__file__, 'probe': str(probe.items[0].image), 'n': len(probe),\n"
        "  'configs': sorted(project_configs()), 'calibration': str(CALIBRATION_FILE),\n"
        "  'catalogue': str(CATALOGUE_PATH), 'alignment': calibration('trigger-inversion')['alignment_threshold']}))\n"
    )
    lines = _run_elsewhere(installed, tmp_path, sys.executable, "-c", code).stdout.splitlines()
    assert lines[0].startswith("<function run_scan")
    got = json.loads(lines[1])
    root = installed.resolve()
    for key in ("package", "probe", "calibration", "catalogue"):
        assert Path(got[key]).is_relative_to(root), (key, got[key])
    assert got["n"] == 300 and got["configs"] == ["tiny-rn", "tiny-vit"]
    shipped = json.loads((REPO / "forensics" / "detect" / "calibration.json").read_text())
    assert got["alignment"] == shipped["trigger-inversion"]["alignment_threshold"]


def test_the_installed_package_carries_every_data_file_and_nothing_else(installed):
    package = installed / "forensics"
    data = _data_files(package)
    # every data file of the tree it was built from (the checkout less __pycache__ and a rebuilt training set)
    assert data == _data_files(installed.parent / "src" / "forensics")
    for name in ("detect/calibration.json", "model_configs/tiny-rn.json", "model_configs/tiny-vit.json"):
        assert (package / name).read_bytes() == (REPO / "forensics" / name).read_bytes(), name
    assert "assets/demo/models/demo_poisoned.safetensors" in data and "assets/demo/PROVENANCE.md" in data
    assert sum(f.startswith("assets/demo/probe/images/") for f in data) == 300
    assert {p.name for p in installed.iterdir()} <= {"forensics", "bin"} | {
        p.name for p in installed.glob("*.dist-info")
    }  # no tests, bench or app.py


def test_pyproject_agrees_with_the_requirements_files(installed):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    runtime = [ln for ln in runtime if ln and not ln.startswith("#")]
    # setuptools reads requirements.txt line by line: a comment after a requirement would break the build
    assert all("#" not in ln for ln in runtime) and {"torch==2.14.1", "open_clip_torch==3.3.0"} <= set(runtime)
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    dev = [ln.strip() for ln in (REPO / "requirements-dev.txt").read_text().splitlines()]
    assert dev[0] == "-r requirements.txt"
    assert project["project"]["optional-dependencies"]["dev"] == [ln for ln in dev[1:] if ln and ln[0] != "#"]
    assert project["project"]["scripts"] == {"forensics": "forensics.cli:main"}
    (metadata,) = installed.glob("clip_backdoor_forensics-*.dist-info/METADATA")
    requires = [ln.split(": ", 1)[1] for ln in metadata.read_text().splitlines() if ln.startswith("Requires-Dist: ")]
    assert [r for r in requires if "extra ==" not in r] == runtime
