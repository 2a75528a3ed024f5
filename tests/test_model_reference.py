"""One model reference: --quick-gelu (and --arch/--device) given to scan, repair, compare, audit and evaluate reach
the network the pipeline actually runs, from the CLI and from the workbench."""

from __future__ import annotations

import pytest

import forensics.core.models as models
from forensics.cli import main
from forensics.core.errors import ForensicsError
from forensics.core.models import ModelRef

REAL_LOAD = models.load_model


class Loaded(ForensicsError):
    """Raised by the recording loader once the model is built, so each command stops right there."""


@pytest.fixture
def loads(monkeypatch):
    """Every model the pipelines load: (spec, quick_gelu flag given, QuickGELU really in the network, device)."""
    seen = []

    def recording_load(spec, arch=None, quick_gelu=None, device="cpu"):
        model = REAL_LOAD(spec, arch=arch, quick_gelu=quick_gelu, device=device)
        acts = {type(m).__name__ for m in model.clip.modules()}
        seen.append(
            {
                "spec": spec,
                "quick_gelu": quick_gelu,
                "has_quick_gelu": "QuickGELU" in acts,
                "has_gelu": "GELU" in acts,
                "device": str(model.device),
            }
        )
        raise Loaded("model loaded")

    monkeypatch.setattr(models, "load_model", recording_load)
    # the UI's model cache may hold a model an earlier test loaded: every command here must really load
    from forensics.pipelines import evaluate

    monkeypatch.setattr(evaluate, "_MODEL_CACHE", {})
    return seen


@pytest.mark.parametrize(
    "command",
    [
        ["scan", "demo", "--detectors", "oracle-guided", "--out", "{tmp}/scan"],
        ["repair", "demo", "--method", "cleanclip", "--out", "{tmp}/repair"],
        ["compare", "demo", "--methods", "cleanclip", "--out", "{tmp}/compare"],
        ["audit", "demo", "--data", "{probe}", "--out", "{tmp}/audit"],
        ["evaluate", "demo"],
        ["info", "demo"],
        ["train-patch", "demo", "--target", "flower", "--out", "{tmp}/patch.json"],
    ],
)
def test_quick_gelu_from_the_cli_reaches_the_loaded_model(command, loads, tmp_path, capsys):
    from forensics.core.data import DEMO_PROBES

    args = [a.format(tmp=tmp_path, probe=DEMO_PROBES["demo-clean"]) for a in command]
    assert main(["--quiet", *args, "--quick-gelu", "--device", "cpu"]) == 2
    assert "model loaded" in capsys.readouterr().err
    assert loads and all(
        seen["quick_gelu"] is True and seen["has_quick_gelu"] and not seen["has_gelu"] and seen["device"] == "cpu"
        for seen in loads
    )
    assert main(["--quiet", *args]) == 2  # without the flag the checkpoint decides: the demo is plain GELU
    assert loads[-1]["quick_gelu"] is None and loads[-1]["has_gelu"] and not loads[-1]["has_quick_gelu"]


def test_quick_gelu_from_the_workbench_reaches_scan_repair_and_compare(loads, monkeypatch):
    gr = pytest.importorskip("gradio")
    from forensics.ui import compare_tab, investigate_tab, repair_tab
    from forensics.ui.common import initial_state, model_ref

    state = {**initial_state(), "quick_gelu": True}
    assert model_ref(state) == ModelRef("demo", quick_gelu=True)
    calls = {
        "scan": lambda: investigate_tab.scan(state, "demo", None, 20),
        "repair": lambda: repair_tab.repair(state, "cleanclip", 1, 1e-5, 60, ""),
        "compare": lambda: compare_tab.compare(state, ["cleanclip"], 60),
    }
    for name, call in calls.items():
        before = len(loads)
        with pytest.raises(gr.Error, match="model loaded"):
            call()
        assert len(loads) == before + 1, f"{name} loaded no model"
    assert loads and all(seen["quick_gelu"] is True and seen["has_quick_gelu"] for seen in loads)
