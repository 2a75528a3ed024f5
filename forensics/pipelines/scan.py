"""Run a scan end to end: findings, trigger patterns, the compact fine-tuning set, report.json and report.html.

:func:`scan` runs the detector and keeps everything in memory (:class:`ScanOutcome`); :func:`write_scan` writes
the files once at the end; :func:`run_scan` is both, for the CLI and the UI. Other pipelines (compare) take the
outcome directly, so nothing is written only to be read back.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forensics.core.data import ProbeSet, load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.files import check_output_folder, model_files, refuse_overwriting_inputs, staged_output
from forensics.core.images import inpaint_box, to_pil
from forensics.core.models import ModelRef, SuspectModel, check_finite_outputs, resolve_model
from forensics.core.progress import Progress, sub_progress
from forensics.defenses import RepairData
from forensics.detect import DETECTORS, Findings, ScanSettings
from forensics.oracles import Oracle, build_oracle, default_oracle
from forensics.pipelines.report import write_json, write_scan_html


@dataclass
class ScanOutcome:
    """A finished scan in memory: the model and probe it ran on, the findings (with their artefacts), the report."""

    model: SuspectModel
    ref: ModelRef | None
    probe: ProbeSet
    oracle: Oracle
    findings: Findings
    report: dict[str, Any]

    @property
    def patterns(self) -> list[torch.Tensor]:
        """Reconstructed trigger patterns (3 x h x w, 8-bit values as saved), in the order of ``report["triggers"]``."""
        saved = self.findings.artefacts["patterns"]
        return [quantized(saved[t["pattern"]]["pattern"]) for t in self.report["triggers"]]


def quantized(image: torch.Tensor) -> torch.Tensor:
    """The image as its 8-bit PNG holds it (so in-memory and read-back repairs see the same pixels)."""
    return image.detach().float().cpu().clamp(0, 1).mul(255).round().div(255)


def compact_rows(
    findings: Findings, class_names: list[str], anchors_per_victim: int = 2, seed: int = 0, max_anchors_floor: int = 128
) -> list[dict[str, Any]]:
    """Victims with the trigger neutralised and as they are, labelled with their grounded class, plus clean anchors.

    Anchors: every grounded, uncaptured image up to ``max_anchors_floor`` (or twice the victims when more):
    with only a few anchors the repair overfits them and clean accuracy falls (measured: 16 anchors from a
    40-image scan cost 0.14 CA; see bench/scan_repair.py). Each row holds its image tensor under ``tensor``.
    """
    images, records = findings.artefacts["images"], findings.artefacts["records"]
    rows = []
    victim_ids = {v.index for v in findings.victims}
    for v in findings.victims:
        for kind, image in (("victim-neutralised", inpaint_box(images[v.index], v.box)), ("victim", images[v.index])):
            rows.append(
                {
                    "image": f"images/{kind}_{v.index:05d}.png",
                    "label": v.grounded_label,
                    "kind": kind,
                    "source_index": v.index,
                    "box": " ".join(map(str, v.box)),
                    "caption": f"a photo of a {v.grounded_label}.",
                    "tensor": image,
                }
            )
    grounded = [i for i, r in enumerate(records) if r["grounded"] and not r["captured"] and i not in victim_ids]
    rng = np.random.default_rng(seed)
    want = min(len(grounded), max(max_anchors_floor, anchors_per_victim * len(findings.victims)))
    for i in sorted(rng.choice(grounded, size=want, replace=False).tolist()) if want else []:
        label = records[i]["predicted"]
        rows.append(
            {
                "image": f"images/anchor_{i:05d}.png",
                "label": label,
                "kind": "anchor",
                "source_index": i,
                "box": "",
                "caption": f"a photo of a {label}.",
                "tensor": images[i],
            }
        )
    return rows


def compact_repair_data(outcome: ScanOutcome) -> RepairData:
    """The scan's compact set and trigger patterns as RepairData, straight from memory (what a repair with
    ``--findings`` reads back from disk, pixel for pixel)."""
    class_names = outcome.probe.class_names
    rows = compact_rows(outcome.findings, class_names, seed=outcome.report["seed"])
    size = outcome.model.image_size
    images = torch.stack([quantized(r["tensor"]) for r in rows]) if rows else torch.empty(0, 3, size, size)
    return RepairData(
        images=images,
        labels=[class_names.index(r["label"]) for r in rows],
        kinds=[r["kind"] for r in rows],
        class_names=list(class_names),
        patterns=outcome.patterns,
        flagged=[f["label"] for f in outcome.report["flagged_labels"]],
    )


def write_compact_set(out: Path, rows: list[dict[str, Any]], class_names: list[str]) -> dict:
    """compact/compact.csv, its images and classes.json: the set ``repair --findings`` fine-tunes on."""
    folder = out / "compact"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        to_pil(r["tensor"]).save(folder / r["image"])
    with open(folder / "compact.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "kind", "source_index", "box"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "tensor"} for r in rows)
    (folder / "classes.json").write_text(json.dumps({"classes": class_names}))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("victim-neutralised", "victim", "anchor")}
    return {"csv": "compact/compact.csv", "samples": len(rows), **kinds}


def pick_oracle(oracle: str | Oracle | None = None, sam_checkpoint: str | None = None) -> Oracle:
    """The oracle to scan with: one given by name (or built), else SAM with a checkpoint, else the fallback."""
    if isinstance(oracle, Oracle):
        chosen = oracle
    elif oracle:
        chosen = build_oracle(oracle, **({"checkpoint": sam_checkpoint} if sam_checkpoint and oracle == "sam" else {}))
    else:
        chosen = default_oracle(sam_checkpoint)
    if chosen.name == "ground-truth":
        raise ForensicsError("the ground-truth oracle needs known masks; use it through the library for teaching")
    return chosen


def scan(
    model: str | ModelRef | SuspectModel,
    probe: str | ProbeSet | None = None,
    oracle: str | Oracle | None = None,
    sam_checkpoint: str | None = None,
    settings: ScanSettings | None = None,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> ScanOutcome:
    """Scan ``model`` on ``probe`` in memory (no file is written); ``max_images`` scans a seeded random subset."""
    start = time.time()
    settings = settings or ScanSettings()
    ref = None if isinstance(model, SuspectModel) else (model if isinstance(model, ModelRef) else ModelRef(str(model)))
    if isinstance(probe, ProbeSet):
        probe_set, probe_source = probe, probe.meta.get("source", probe.name)
    else:
        probe = probe or (ref.default_probe() if ref else None)
        if probe is None:
            raise ForensicsError("a probe set is required for models other than demo and demo-clean")
        probe_set, probe_source = load_probe_set(probe), str(probe)
    probe_set = probe_set.subset(max_images, settings.seed)
    oracle_obj = pick_oracle(oracle, sam_checkpoint)
    loaded, _ = resolve_model(ref or model)
    check_finite_outputs(loaded)  # a NaN model would scan as 'nothing flagged'
    detector = DETECTORS.build("oracle-guided", oracle=oracle_obj, settings=settings)
    findings = detector.run(loaded, probe_set, sub_progress(progress, 0.0, 0.9))
    report = {
        "tool": "clip-backdoor-forensics",
        "detector": detector.name,
        "model": {"spec": ref.spec if ref else loaded.facts.source, **loaded.facts.to_dict()},
        "probe": {
            "name": probe_set.name,
            "source": probe_source,
            "images": len(probe_set),
            "classes": probe_set.class_names,
            "subset_of": probe_set.meta.get("subset_of"),
        },
        "oracle": {"name": oracle_obj.name, **oracle_obj.settings()},
        **findings.to_dict(),
        "seed": settings.seed,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(loaded.device),
        },
    }
    report["metrics"]["seconds_total"] = round(time.time() - start, 2)
    return ScanOutcome(model=loaded, ref=ref, probe=probe_set, oracle=oracle_obj, findings=findings, report=report)


def write_scan(outcome: ScanOutcome, out: str | Path, progress: Progress | None = None) -> dict:
    """Write report.json, report.html, the trigger patterns and the compact set under ``out``; the CLI's summary."""
    out = Path(out)
    report = outcome.report
    rows = compact_rows(outcome.findings, outcome.probe.class_names, seed=report["seed"])
    patterns = list(outcome.findings.artefacts["patterns"])
    outputs = [out / "report.json", out / "report.html", out / "compact" / "compact.csv"]
    outputs += [out / "compact" / "classes.json", *(out / "compact" / r["image"] for r in rows)]
    outputs += [out / n for n in patterns] + [out / n.replace(".png", "_preview.png") for n in patterns]
    refuse_overwriting_inputs(outputs, model_files(outcome.model.facts.source) + outcome.probe.files())
    start = time.time()
    with staged_output(out) as stage:  # an interrupted write leaves the previous result, or nothing
        for name, info in outcome.findings.artefacts["patterns"].items():
            pattern = to_pil(info["pattern"])
            pattern.save(stage / name)
            pattern.resize((96, 96), resample=0).save(stage / name.replace(".png", "_preview.png"))
        report["compact_set"] = write_compact_set(stage, rows, outcome.probe.class_names)
        report["metrics"]["seconds_total"] = round(report["metrics"]["seconds_total"] + time.time() - start, 2)
        write_json(stage / "report.json", report)
        if progress:
            progress(0.92, "drawing the report")
        write_scan_html(stage, report, outcome.findings, outcome.model, outcome.probe)
    if progress:
        progress(1.0, "done")
    return {
        "report": str(out / "report.json"),
        "html": str(out / "report.html"),
        "flagged_labels": report["flagged_labels"],
        "triggers": report["triggers"],
        "n_victims": len(report["victims"]),
        "metrics": report["metrics"],
    }


def run_scan(
    model: str | ModelRef | SuspectModel,
    out: str | Path,
    probe: str | ProbeSet | None = None,
    oracle: str | Oracle | None = None,
    sam_checkpoint: str | None = None,
    settings: ScanSettings | None = None,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Scan ``model`` on ``probe`` and write ``out/report.json``, ``out/report.html``, trigger patterns and the
    compact set; returns the summary (paths, flagged labels, triggers, victim count, metrics)."""
    check_output_folder(out)  # before the scan, not after it
    outcome = scan(model, probe, oracle, sam_checkpoint, settings, max_images, progress)
    return write_scan(outcome, out, progress)
