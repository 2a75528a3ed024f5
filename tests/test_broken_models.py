"""A model whose weights are NaN or infinite is named in its facts and refused by scan, repair and compare."""

from __future__ import annotations

import torch

from forensics.cli import main
from forensics.core.models import load_model, save_model


def test_nan_weights_are_in_the_facts_and_refused_by_every_pipeline(tmp_path, capsys):
    model = load_model("demo")
    with torch.no_grad():
        next(model.clip.visual.parameters()).view(-1)[:3] = float("nan")
    path = save_model(model, tmp_path / "broken.safetensors")
    assert load_model(str(path)).facts.nonfinite_parameters == 3
    for args in (
        [
            "scan",
            str(path),
            "--detectors",
            "oracle-guided",
            "--probe",
            "demo",
            "--max-images",
            "8",
            "--out",
            str(tmp_path / "scan"),
        ],
        ["repair", str(path), "--method", "cleanclip", "--probe", "demo", "--out", str(tmp_path / "repair")],
        ["compare", str(path), "--methods", "cleanclip", "--probe", "demo", "--out", str(tmp_path / "compare")],
    ):
        capsys.readouterr()
        assert main(["--quiet", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            "error: the model's outputs are NaN or infinite (3 of its weights are non-finite); "
            "it cannot be scanned or repaired"
        ), err
        assert not (tmp_path / args[-1].rsplit("/", 1)[-1]).exists()
