"""A model whose weights, embeddings or logits are NaN or infinite is named in its facts and refused by scan, repair
and compare; a repair checks the file it writes (finite, loads back, computes what it computed) before handing
it over."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from forensics.cli import main
from forensics.core.errors import ForensicsError
from forensics.core.models import load_model, save_model
from forensics.defenses import DEFENSES, Defense, Fitted


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


@pytest.mark.parametrize(
    "log_scale,why",
    [
        (float("inf"), "1 of its weights is non-finite"),
        (float("nan"), "1 of its weights is non-finite"),
        (1.0e4, "its logit scale exp(1e+04) overflows"),  # every weight finite, its temperature is not
    ],
)
def test_a_broken_logit_scale_is_refused_by_scan_and_repair(tmp_path, capsys, log_scale, why):
    model = load_model("demo")
    with torch.no_grad():
        model.clip.logit_scale.fill_(log_scale)
    path = save_model(model, tmp_path / "broken.safetensors")
    for command in (
        ["scan", str(path), "--detectors", "oracle-guided", "--probe", "demo", "--max-images", "8"],
        ["repair", str(path), "--method", "cleanclip", "--probe", "demo", "--param", "epochs=1"],
    ):
        capsys.readouterr()
        assert main(["--quiet", *command, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: the model's outputs are NaN or infinite ({why}); it cannot be scanned or repaired", err
        assert not (tmp_path / "out").exists()


@dataclass
class _BreakSettings:
    how: str = "nan"
    seed: int = 0


class _BreakingRepair(Defense):
    """A repair that ruins its copy (NaN weights, or an overflowing temperature): its output must never be written."""

    name = "breaking-test-repair"
    summary = "test defense"
    settings_cls = _BreakSettings

    def fit(self, job) -> Fitted:
        with torch.no_grad():
            if self.settings.how == "nan":
                for param in job.repaired.clip.parameters():
                    param.fill_(float("nan"))
            else:
                job.repaired.clip.logit_scale.fill_(1.0e4)
        return Fitted(samples_used=len(job.data.images), history=[])


@pytest.mark.parametrize("how,why", [("nan", "of its weights are non-finite"), ("scale", "logit scale exp(1e+04)")])
def test_a_repair_whose_output_is_broken_writes_nothing(tmp_path, capsys, monkeypatch, how, why):
    monkeypatch.setitem(DEFENSES._entries, _BreakingRepair.name, _BreakingRepair)
    out = tmp_path / "repair"
    args = ["repair", "demo", "--method", _BreakingRepair.name, "--param", f"how={how}", "--out", str(out)]
    capsys.readouterr()
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the repaired model's outputs are NaN or infinite (") and why in err, err
    assert err.endswith("nothing was written (try fewer epochs or a smaller learning rate)")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_good_repair_records_its_output_check(tmp_path):
    out = tmp_path / "repair"
    assert main(["--quiet", "repair", "demo", "--method", "cleanclip", "--param", "epochs=1", "--out", str(out)]) == 0
    check = json.loads((out / "metrics.json").read_text())["output_check"]
    assert check["finite"] and check["reloads"] and check["images"] == 16
    assert check["max_embedding_difference"] <= 1e-5  # fp32 written, fp32 read back


def test_a_written_file_that_computes_something_else_is_refused(tmp_path):
    from forensics.pipelines.repair import check_written_model

    model = load_model("demo")
    images = torch.rand(4, 3, model.image_size, model.image_size)
    path = save_model(model, tmp_path / "m.safetensors")
    assert check_written_model(model, path, images)["reloads"]
    with torch.no_grad():
        next(model.clip.visual.parameters()).mul_(3.0)  # the model in memory no longer matches the file
    with pytest.raises(ForensicsError, match="computes other embeddings than the repaired model"):
        check_written_model(model, path, images)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:1000])
    (tmp_path / "cut.json").write_bytes(path.with_suffix(".json").read_bytes())
    with pytest.raises(ForensicsError, match="the repaired model does not load back"):
        check_written_model(model, tmp_path / "cut.safetensors", images)
