"""Clean-budget repair (no scan) and the `compare` command: same budget, same held-out images, one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forensics.core.data import load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.models import load_model
from forensics.core.zeroshot import evaluate
from forensics.defenses import DEFENSES
from forensics.pipelines.compare import PeakMemory, resolve_methods, run_compare
from forensics.pipelines.evaluate import default_trigger
from forensics.pipelines.repair import run_repair, split_clean_budget
from tests.test_cli import assert_one_line_error, run_cli

BUDGET = 120
FIRST = ("cleanclip", {"epochs": 2})  # small settings: the tests' time, not the methods' best
SECOND = ("cbpt", {})


@pytest.fixture(scope="module")
def cli_repair(tmp_path_factory):
    """`repair demo --method cleanclip --budget 120` without findings, through the CLI."""
    out = tmp_path_factory.mktemp("repair_budget")
    name, settings = FIRST
    params = [a for k, v in settings.items() for a in ("--param", f"{k}={v}")]
    result = json.loads(
        run_cli("repair", "demo", "--method", name, "--budget", str(BUDGET), *params, "--out", str(out)).stdout
    )
    return out, result, json.loads((out / "metrics.json").read_text())


def test_split_clean_budget_is_seeded_and_disjoint():
    probe = load_probe_set("demo")
    budget, held = split_clean_budget(probe, BUDGET, seed=0)
    assert len(budget) == BUDGET and len(held) == len(probe.clean_indices()) - BUDGET == 135
    assert not set(budget) & set(held) and sorted(budget + held) == probe.clean_indices()
    assert split_clean_budget(probe, BUDGET, seed=0) == (budget, held)
    assert split_clean_budget(probe, BUDGET, seed=1)[0] != budget
    assert not set(budget) & set(probe.triggered_indices())
    with pytest.raises(ForensicsError, match="leaves none"):
        split_clean_budget(probe, 255, seed=0)
    with pytest.raises(ForensicsError, match="positive"):
        split_clean_budget(probe, 0, seed=0)


def test_repair_without_findings_uses_the_budget_and_held_out_images(cli_repair):
    out, result, metrics = cli_repair
    assert result["clean_budget"] == BUDGET and metrics["eval_images"] == 135 == result["eval_images"]
    assert metrics["clean_budget"]["captions"] is True and metrics["samples_used"] == BUDGET
    before, after = metrics["before"], metrics["after"]
    # measured: CA 0.496 -> 0.519, ASR 0.966 -> 0.291 (cleanclip, 2 epochs on the 120-image budget)
    assert before["asr"] > 0.9 and after["asr"] < before["asr"] - 0.3, metrics
    assert after["ca"] >= before["ca"] - 0.1, metrics
    assert "held-out" in metrics["note"] and Path(result["model"]).is_file()
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["repair"]["findings"] is None and sidecar["repair"]["clean_budget"]["budget"] == BUDGET


def test_repair_and_compare_errors(tmp_path):
    assert_one_line_error(
        run_cli("repair", "demo", "--method", "oracle-finetune", "--out", str(tmp_path), check=False),
        "needs a scan's findings",
    )
    with pytest.raises(ForensicsError, match="leaves none"):
        run_repair("demo", None, tmp_path, method="cleanclip", budget=400)
    with pytest.raises(ForensicsError, match="unknown repair method"):
        run_compare("demo", "cleanclip,nosuch", tmp_path)
    with pytest.raises(ForensicsError, match="not compared"):
        run_compare("demo", "cleanclip", tmp_path, settings={"abd": {"epochs": 1}})
    with pytest.raises(ForensicsError, match="probe set is required"):
        run_compare("random:tiny-vit", "cleanclip", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written before the inputs are checked


@pytest.mark.slow
def test_compare_two_methods_and_an_error_row(cli_repair, tmp_path):
    _, _, metrics = cli_repair
    methods = [FIRST[0], SECOND[0], "oracle-finetune"]
    messages = []
    report = run_compare(
        "demo",
        methods,
        tmp_path,
        budget=BUDGET,
        seed=0,
        findings=tmp_path / "no_scan",
        settings=dict([FIRST, SECOND]),
        progress=lambda f, m: messages.append(f),
    )
    for name in ("compare.md", "compare.json", "report.html"):
        assert (tmp_path / name).is_file()
    assert messages and messages[-1] == 1.0 and all(0 <= f <= 1 for f in messages)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["rows"] == report["rows"] and saved["held_out"] == 135 and saved["budget"] == BUDGET
    rows = {r["method"]: r for r in report["rows"]}
    assert [r["method"] for r in report["rows"]] == methods

    # the "before" numbers are what `evaluate` gives on the same held-out images
    probe = load_probe_set("demo")
    _, held = split_clean_budget(probe, BUDGET, seed=0)
    model = load_model("demo")
    attack, target = default_trigger("demo")
    direct = evaluate(
        model,
        probe.load_images(model.image_size, held),
        [probe.items[i].label for i in held],
        probe.class_names,
        attack,
        target,
    )
    assert report["before"]["ca"] == pytest.approx(direct["ca"]) and report["before"]["asr"][
        "planted"
    ] == pytest.approx(direct["asr"])

    # the first method's row is the CLI repair's metrics (same budget, seed and settings)
    first = rows[FIRST[0]]
    assert first["status"] == "ok" and first["clean_samples"] == BUDGET
    assert first["ca_after"] == pytest.approx(metrics["after"]["ca"], abs=1e-6)
    assert first["asr_after"]["planted"] == pytest.approx(metrics["after"]["asr_true"], abs=1e-6)
    second = rows[SECOND[0]]
    assert second["status"] == "ok", second
    for row in (first, second):
        assert row["seconds"] > 0 and row["peak_mib"] is not None and row["ca_after"] >= row["ca_before"] - 0.15
        assert row["asr_after"]["planted"] < row["asr_before"]["planted"]

    # a method that fails is a row with its error, not a crash
    failed = rows["oracle-finetune"]
    assert failed["status"] == "error" and "does not exist" in failed["error"] and failed["ca_after"] is None

    md = (tmp_path / "compare.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith(f"| {FIRST[0]} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == [
        f"{first['ca_before']:.3f}",
        f"{first['ca_after']:.3f}",
        f"{first['asr_before']['planted']:.3f}",
        f"{first['asr_after']['planted']:.3f}",
    ]
    assert cells[5] == str(BUDGET) and "error: " in next(
        line for line in md.splitlines() if line.startswith("| oracle-finetune")
    )
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in html and f"{first['ca_after']:.3f}" in html and "held-out" in html


def test_compare_runs_on_a_vit_tower_with_a_failing_method(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from forensics.defenses import Defense

    @dataclass
    class BrokenSettings:
        seed: int = 0

    class Broken(Defense):
        name = "broken"
        summary = "always fails"
        settings_cls = BrokenSettings

        def fit(self, job):
            raise RuntimeError("no luck")

    monkeypatch.setitem(DEFENSES._entries, "broken", Broken)  # registered for this test only
    torch.manual_seed(0)
    vit = load_model("random:tiny-vit")
    report = run_compare(
        vit,
        "broken,cleanclip",
        tmp_path,
        probe="demo",
        budget=16,
        attacks=["badnet"],
        target="flower",
        settings={"cleanclip": {"epochs": 1, "batch_size": 8}},
    )
    broken, clean = report["rows"]
    assert broken["status"] == "error" and broken["error"] == "RuntimeError: no luck"
    assert clean["status"] == "ok" and clean["clean_samples"] == 16 and set(clean["asr_after"]) == {"badnet"}
    assert report["held_out"] == 255 - 16 and [a["key"] for a in report["attacks"]] == ["badnet"]
    assert "error: RuntimeError: no luck" in (tmp_path / "compare.md").read_text()


def test_resolve_methods_and_peak_memory():
    assert resolve_methods("all") == list(DEFENSES)
    assert resolve_methods("cleanclip, cleanclip") == ["cleanclip"]
    with pytest.raises(ForensicsError, match="no repair methods"):
        resolve_methods("")
    with PeakMemory() as memory:
        block = torch.ones(64, 1024, 1024)  # 256 MiB
        block += 1
    del block
    assert memory.peak_mib is not None and memory.peak_mib > 100
