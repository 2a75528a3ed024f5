"""SafeCLIP: the data-set audit (rank poisoned pairs) and the safe-training schedule.

Both run on a poisoned copy of the demo probe set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forensics.attacks import attack_from_dict, poison_dataset
from forensics.core.data import demo_backdoor
from forensics.core.errors import ForensicsError
from forensics.core.models import ASSETS_DIR, load_model
from forensics.detect.safeclip_audit import AuditSettings
from forensics.pipelines.audit import audit_dataset
from forensics.training.clip import TrainConfig, read_caption_csv
from forensics.training.safeclip import SafeClipSettings, augment_caption, gmm_risk, safe_train_clip, select_safe
from tests.test_cli import assert_one_line_error, run_cli

PROBE_CLEAN = ASSETS_DIR / "demo" / "probe" / "probe_clean.csv"


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """The 300 clean demo probe pairs.

    10 % (30) of them are poisoned with the demo's BadNet trigger and captioned with its target.
    """
    planted = demo_backdoor()
    out = tmp_path_factory.mktemp("poisoned")
    return poison_dataset(PROBE_CLEAN, attack_from_dict(planted["trigger"]), planted["target"], 0.1, out, seed=0)


def test_audit_with_the_clean_reference_ranks_poison_first(poisoned, tmp_path):
    result = json.loads(
        run_cli("audit", "demo", "--data", str(poisoned), "--reference", "demo-clean", "--out", str(tmp_path)).stdout
    )
    assert result["scored_with"] == "reference" and result["scoring_model"] == "demo-clean"
    m = result["metrics"]
    # measured (seed 0): AUROC 0.770, precision 0.196 and recall 0.70 at the GMM cut (107 pairs flagged)
    assert m["poisoned"] == 30 and result["pairs"] == 300
    assert m["auroc"] >= 0.72, m
    assert m["recall"] >= 0.6 and m["precision"] >= 0.15 > 30 / 300, m
    assert result["risky"] + result["safe"] == 300 and result["risky"] == m["flagged"]
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["metrics"] == m and len(saved["rows"]) == 300
    with open(tmp_path / "audit.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["rank"]) for r in rows] == list(range(1, 301))
    risks = [float(r["risk"]) for r in rows]
    assert risks == sorted(risks, reverse=True)
    assert sum(int(r["safe"]) for r in rows) == result["safe"]
    assert sum(int(r["poisoned"]) for r in rows if float(r["risk"]) > 0.5) == m["true_positives"]
    assert [r["caption"] for r in result["top"]] == [r["caption"] for r in rows[:10]]


def test_the_clean_reference_ranks_better_than_the_backdoored_suspect(poisoned):
    suspect = audit_dataset(poisoned, "demo", reference="demo-clean", score_with="suspect")
    # measured: AUROC 0.48 with the suspect, which matches its trigger with the target caption (0.77 with the reference)
    assert suspect["scored_with"] == "suspect" and "reference" in suspect["note"]
    assert suspect["metrics"]["auroc"] <= 0.6, suspect["metrics"]


def test_audit_errors_and_a_vit_smoke_run(poisoned, tmp_path):
    with pytest.raises(ForensicsError, match="reference model"):
        audit_dataset(poisoned, "demo", score_with="reference")
    with pytest.raises(ForensicsError, match="risk_threshold"):
        audit_dataset(poisoned, "demo", settings=AuditSettings(risk_threshold=1.5))
    rows = read_caption_csv(poisoned)[:3]
    small = tmp_path / "small.csv"
    with open(small, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ForensicsError, match="at least 4"):
        audit_dataset(small, "demo")
    assert_one_line_error(
        run_cli("audit", "demo", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path), check=False),
        "does not exist",
    )
    torch.manual_seed(0)
    vit = load_model("random:tiny-vit")
    subset = _subset_csv(poisoned, tmp_path / "vit", 40)
    result = audit_dataset(subset, vit, out=tmp_path / "vit_out")
    assert result["pairs"] == 40 and result["scored_with"] == "suspect"
    assert (tmp_path / "vit_out" / "audit.csv").is_file() and 0.0 <= result["metrics"]["auroc"] <= 1.0


def test_gmm_risk_picks_the_low_mean_component():
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.normal(0.7, 0.05, 90), rng.normal(0.2, 0.05, 10)])
    risk, fit = gmm_risk(cos, seed=0)
    assert fit["means"][0] < fit["means"][1]
    assert (risk[90:] > 0.5).all() and (risk[:90] < 0.5).all()
    safe, cut = select_safe(cos, 0, SafeClipSettings(), seed=0)
    assert cut == 0.9 and safe[:90].sum() >= 85 and not safe[90:].any()
    safe, ratio = select_safe(cos, 3, SafeClipSettings(filter_ratio=0.5), seed=0)
    assert ratio == pytest.approx(0.52) and safe.sum() == 52 and not safe[90:].any()
    capped = select_safe(cos, 100, SafeClipSettings(filter_ratio=0.5), seed=0)[1]
    assert capped == pytest.approx(0.85)
    view = augment_caption("a photo of a large red flower on the left.", np.random.default_rng(0))
    assert view and set(view.split()) <= set("a photo of a large red flower on the left .".split())


def _subset_csv(data: Path, folder: Path, n: int) -> Path:
    """The first ``n`` rows of a poisoned data.csv (absolute paths), with its poison.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = read_caption_csv(data)[:n]
    with open(folder / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "poison.json").write_text((data.parent / "poison.json").read_text())
    return folder / "data.csv"


@pytest.mark.slow
def test_safeclip_training_keeps_the_poisoned_pairs_in_the_risky_set(poisoned, tmp_path):
    data = _subset_csv(poisoned, tmp_path / "data", 200)
    n_poison = sum(r["poisoned"] == "1" for r in read_caption_csv(data))
    assert n_poison >= 15
    out = json.loads(
        run_cli(
            "implant",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "model"),
            "--base",
            "demo-clean",
            "--mode",
            "safeclip",
            "--epochs",
            "3",
            "--lr",
            "1e-4",
            "--safe-param",
            "warmup_epochs=1",
        ).stdout
    )
    history = out["history"]
    assert out["mode"] == "safeclip" and [h["phase"] for h in history] == ["unimodal warm-up", "safe", "safe"]
    for h in history[1:]:
        # measured: 18 then 19 of the 21 poisoned pairs risky (90, then 100 of 200 risky); 3 then 2 in the safe set
        assert h["poisoned_risky"] >= 0.75 * n_poison, h
        assert h["risky"] <= 0.6 * 200, h
        assert h["poisoned_safe"] / max(1, h["safe"]) < 0.5 * n_poison / 200, h
    sidecar = json.loads(Path(out["model"]).with_suffix(".json").read_text())
    assert sidecar["training"]["mode"] == "safeclip" and sidecar["training"]["safeclip"]["first_threshold"] == 0.9
    assert sidecar["backdoor"]["target"] == demo_backdoor()["target"]
    proc = run_cli(
        "implant",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "m2"),
        "--base",
        "demo-clean",
        "--safe-param",
        "warmup_epochs=1",
        check=False,
    )
    assert_one_line_error(proc, "--mode safeclip")


def test_safe_training_runs_on_a_vit_tower(poisoned):
    torch.manual_seed(0)
    model = load_model("random:tiny-vit")
    rows = read_caption_csv(poisoned)[:24]
    history = safe_train_clip(
        model, rows, TrainConfig(epochs=2, batch_size=8, lr=1e-4, warmup_steps=1), SafeClipSettings(warmup_epochs=1)
    )
    assert len(history) == 2 and history[1]["safe"] + history[1]["risky"] == 24
    assert all(np.isfinite(h["loss"]) for h in history)
