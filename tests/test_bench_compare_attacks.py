"""The per-attack benchmark's own logic: attack settings, the merged table, argument checks (no training here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_attacks", ROOT / "bench" / "compare_attacks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attack_spec_takes_params_and_keeps_the_demo_trigger(bench, tmp_path):
    assert bench.attack_spec("badnet", tmp_path, "flower", 0)["pattern"] == "checkerboard"
    warp = bench.attack_spec("wanet", tmp_path, "flower", 0, {"strength": 4})
    assert warp["attack"] == "wanet" and warp["strength"] == 4
    assert bench.attack_spec("wanet", tmp_path, "flower", 0)["strength"] == 0.5  # the lab's (paper's) default


def _row(method: str, asr_after: float) -> dict:
    return {
        "method": method,
        "status": "ok",
        "error": None,
        "ca_before": 0.43,
        "ca_after": 0.45,
        "asr_before": {"planted": 0.97},
        "asr_after": {"planted": asr_after},
        "seconds": 12.5,
        "peak_mib": 100.0,
    }


def test_table_lists_every_attack_with_how_its_model_was_made(bench, tmp_path):
    legacy_args = {
        "train": "scratch",
        "epochs": 14,
        "train_per_class": 200,
        "rate": 0.1,
        "lr": None,
        "reuse_demo": True,
        "budget": 120,
        "seed": 0,
    }
    results = {
        "args": legacy_args,
        "attacks": {
            "badnet": {
                "model": "demo",
                "attack": {"attack": "badnet", "size": 0.1},
                "seconds": 700,
                "rows": [_row("cbpt", 0.03)],
            },
            "wanet": {
                "model": "/tmp/w/model.safetensors",
                "attack": {"attack": "wanet", "strength": 4},
                "seconds": 300,
                "training": "scratch, 14 epochs, 200 images per class, poison rate 0.1",
                "budget": 120,
                "rows": [_row("abd", 0.5), {**_row("invertune", 0.0), "status": "error", "error": "boom"}],
            },
        },
    }
    bench.write_table(results, tmp_path)
    text = (tmp_path / "compare_attacks.md").read_text()
    assert "| badnet | cbpt | 0.430 | 0.450 | 0.970 | 0.030 |" in text
    assert "| wanet | abd | 0.430 | 0.450 | 0.970 | 0.500 |" in text
    assert "error: boom" in text
    assert '- badnet ({"size": 0.1}): the bundled demo model' in text
    assert '- wanet ({"strength": 4}): scratch, 14 epochs, 200 images per class, poison rate 0.1' in text
    assert "target" in text  # says ASR leaves out target-class images


def test_training_record_names_the_recipe(bench):
    args = argparse.Namespace(reuse_demo=False, train="finetune", epochs=3, train_per_class=50, rate=0.2, lr=1e-4)
    assert (
        bench.training_record("blended", args) == "finetune, 3 epochs, 50 images per class, poison rate 0.2, lr 0.0001"
    )


def test_attack_params_for_an_attack_not_run_is_refused(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "compare_attacks.py"),
            "--attacks",
            "wanet",
            "--attack-params",
            json.dumps({"sig": {"delta": 0.1}}),
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--attack-params names attacks not being run: ['sig']" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # refused before anything is written
