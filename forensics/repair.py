"""Run a repair end to end: read the scan's findings, fine-tune, measure CA/ASR before and after, save safely."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .attacks import attack_from_dict, build_attack
from .data import demo_backdoor, load_image, load_probe_set
from .defenses import RepairData, build_defense
from .errors import ForensicsError
from .models import SuspectModel, load_model, save_model
from .report import before_after_chart, figure_html, table_html, write_html, write_json
from .zeroshot import ASR_NOTE, evaluate

Progress = Callable[[float, str], None]


def read_findings(path: str | Path) -> dict:
    """A scan's report.json, checked for the fields a repair needs."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ForensicsError(f"findings file {path} does not exist; run `python -m forensics scan` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ForensicsError(f"findings file {path} is not valid JSON: {exc}") from None
    for key in ("flagged_labels", "triggers", "victims", "compact_set", "probe", "model"):
        if key not in report:
            raise ForensicsError(f"findings file {path.name} lacks '{key}'; is it a scan report?")
    report["_dir"] = str(path.parent)
    return report


def _load_repair_data(report: dict, model: SuspectModel) -> RepairData:
    folder = Path(report["_dir"])
    csv_path = folder / report["compact_set"]["csv"]
    if not csv_path.is_file():
        raise ForensicsError(f"the compact fine-tuning set {csv_path} is missing beside the findings")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    class_names = report["probe"]["classes"]
    images = torch.stack([load_image(csv_path.parent / r["image"], model.image_size) for r in rows]) if rows \
        else torch.empty(0, 3, model.image_size, model.image_size)
    patterns = []
    for t in report["triggers"]:
        with Image.open(folder / t["pattern"]) as im:  # at its own size: the pattern is pasted, not resized
            patterns.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255)
    return RepairData(images=images, labels=[class_names.index(r["label"]) for r in rows], kinds=[r["kind"] for r in rows],
                      class_names=class_names, patterns=patterns, flagged=[f["label"] for f in report["flagged_labels"]])


def _measure(model: SuspectModel, images: torch.Tensor, labels: list[int], class_names: list[str],
             reconstructed: list[tuple[Any, str]], true_trigger: tuple[Any, str] | None) -> dict:
    out: dict[str, Any] = {}
    base = evaluate(model, images, labels, class_names)
    out["ca"] = base["ca"]
    for k, (attack, target) in enumerate(reconstructed):
        key = "asr_reconstructed" if k == 0 else f"asr_reconstructed_{k}"
        out[key] = evaluate(model, images, labels, class_names, attack, target)["asr"]
    if true_trigger:
        out["asr_true"] = evaluate(model, images, labels, class_names, *true_trigger)["asr"]
    out["asr"] = out.get("asr_true", out.get("asr_reconstructed"))
    return out


def run_repair(model: str | SuspectModel, findings: str | Path, out: str | Path, method: str = "oracle-finetune",
               settings: dict | None = None, arch: str | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
    """Repair ``model`` with ``method`` using the scan's findings; writes model.safetensors, metrics.json and a report."""
    start = time.time()
    report = read_findings(findings)
    spec = model if isinstance(model, str) else None
    loaded = load_model(model, arch=arch) if spec else model
    notes = []
    if report["model"].get("sha256") and loaded.facts.sha256 and report["model"]["sha256"] != loaded.facts.sha256:
        notes.append("the findings were made on a different model file (SHA-256 differs)")
    out = Path(out)
    source = Path(loaded.facts.source)
    if source.exists() and (out / "model.safetensors").resolve() == source.resolve():
        raise ForensicsError("refusing to overwrite the input model; choose another --out folder")
    data = _load_repair_data(report, loaded)
    probe = load_probe_set(report["probe"]["source"])
    clean_idx = probe.clean_indices()
    eval_images = probe.load_images(loaded.image_size, clean_idx)
    eval_labels = [probe.items[i].label for i in clean_idx]
    reconstructed = [(build_attack("optimized_patch", patch=p.tolist(), size=t["size"], position="random"), t["label"])
                     for p, t in zip(data.patterns, report["triggers"])]
    true_trigger = None
    planted = loaded.backdoor or (demo_backdoor() if spec in ("demo", "demo-clean") else None)
    if planted and planted.get("trigger") and planted.get("target") in probe.class_names:
        true_trigger = (attack_from_dict(planted["trigger"]), planted["target"])
    if progress:
        progress(0.02, "measuring CA/ASR before repair")
    before = _measure(loaded, eval_images, eval_labels, probe.class_names, reconstructed, true_trigger)
    defense = build_defense(method, **(settings or {}))
    result = defense.repair(loaded, data, (lambda f, m: progress(0.1 + 0.8 * f, m)) if progress else None, should_stop)
    if progress:
        progress(0.92, "measuring CA/ASR after repair")
    after = _measure(result.model, eval_images, eval_labels, probe.class_names, reconstructed, true_trigger)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process writes the outputs
        return {"before": before, "after": after}
    out.mkdir(parents=True, exist_ok=True)
    result.model.facts.source = f"repaired ({method})"
    model_path = save_model(result.model, out / "model.safetensors", backdoor=None,
                            extra={"repair": {"method": method, "settings": result.settings, "findings": str(findings),
                                              "original_sha256": loaded.facts.sha256}})
    metrics = {"before": before, "after": after, "method": method, "samples_used": result.samples_used,
               "seconds": round(time.time() - start, 2), "repair_seconds": result.seconds, "history": result.history,
               "settings": result.settings, "note": ASR_NOTE + "; measured on the probe set's clean images",
               "true_trigger_known": true_trigger is not None, "notes": notes + result.notes,
               "original_sha256": loaded.facts.sha256}
    write_json(out / "metrics.json", metrics)
    rows = [{"": "before", **{k: round(v, 4) for k, v in before.items() if v is not None}},
            {"": "after", **{k: round(v, 4) for k, v in after.items() if v is not None}}]
    write_html(out / "report.html", f"Repair of {spec or loaded.facts.source}",
               {"method": method, "samples used": result.samples_used, "seconds": metrics["seconds"],
                "original SHA-256": loaded.facts.sha256, "repaired model": str(model_path)},
               [("Before / after", figure_html(before_after_chart(metrics)) + table_html(rows, list(rows[0])))])
    if progress:
        progress(1.0, "done")
    return {"model": str(model_path), "metrics": str(out / "metrics.json"), "before": before, "after": after,
            "samples_used": result.samples_used, "seconds": metrics["seconds"]}
