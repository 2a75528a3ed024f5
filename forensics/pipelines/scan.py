"""Run a scan end to end: findings, trigger patterns, the compact fine-tuning set, report.json and report.html."""
from __future__ import annotations

import base64
import csv
import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from forensics.attribution import gradcam
from forensics.core.data import load_probe_set
from forensics.detect import ScanSettings, build_detector
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel, load_model
from forensics.oracles import build_oracle, default_oracle
from forensics.pipelines.report import (figure_html, flagged_chart, image_panels, table_html, to_pil, write_html, write_json)
from forensics.core.zeroshot import class_text_embeddings

Progress = Callable[[float, str], None]
PANELS = 12  # per-image panels in the HTML report (most discrepant first, then the top victims)


def neutralise(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The image with the box inpainted from its surroundings (OpenCV Telea), so the trigger is gone."""
    import cv2

    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    x0, y0, x1, y1 = box
    mask[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = 255
    out = cv2.inpaint(rgb, mask, 5, cv2.INPAINT_TELEA)
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255.0


def write_compact_set(out: Path, findings, artefacts: dict, class_names: list[str], anchors_per_victim: int = 2,
                      seed: int = 0, max_anchors_floor: int = 128) -> dict:
    """Victims with the trigger neutralised and as they are, labelled with their grounded class, plus clean anchors.

    Anchors: every grounded, uncaptured image up to ``max_anchors_floor`` (or twice the victims when more):
    with only a few anchors the repair overfits them and clean accuracy falls (measured: 16 anchors from a
    40-image scan cost 0.14 CA; see bench/scan_repair.py).
    """
    folder = out / "compact"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, records = artefacts["images"], artefacts["records"]
    rows = []
    victim_ids = {v.index for v in findings.victims}
    for v in findings.victims:
        for kind, image in (("victim-neutralised", neutralise(images[v.index], v.box)), ("victim", images[v.index])):
            name = f"images/{kind}_{v.index:05d}.png"
            to_pil(image).save(folder / name)
            rows.append({"image": name, "label": v.grounded_label, "kind": kind, "source_index": v.index,
                         "box": " ".join(map(str, v.box)), "caption": f"a photo of a {v.grounded_label}."})
    grounded = [i for i, r in enumerate(records) if r["grounded"] and not r["captured"] and i not in victim_ids]
    rng = np.random.default_rng(seed)
    want = min(len(grounded), max(max_anchors_floor, anchors_per_victim * len(findings.victims)))
    for i in sorted(rng.choice(grounded, size=want, replace=False).tolist()) if want else []:
        name = f"images/anchor_{i:05d}.png"
        to_pil(images[i]).save(folder / name)
        label = records[i]["predicted"]
        rows.append({"image": name, "label": label, "kind": "anchor", "source_index": i, "box": "",
                     "caption": f"a photo of a {label}."})
    with open(folder / "compact.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "kind", "source_index", "box"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.json").write_text(json.dumps({"classes": class_names}))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("victim-neutralised", "victim", "anchor")}
    return {"csv": "compact/compact.csv", "samples": len(rows), **kinds}


def run_scan(model: str | SuspectModel, out: str | Path, probe: str | None = None, oracle: str | None = None,
             sam_checkpoint: str | None = None, settings: ScanSettings | None = None, arch: str | None = None,
             max_images: int | None = None, progress: Progress | None = None) -> dict:
    """Scan ``model`` on ``probe`` and write ``out/report.json``, ``out/report.html``, trigger patterns and the compact set.

    ``max_images`` scans a seeded random subset (``settings.seed``) for a quicker first look.
    """
    start = time.time()
    settings = settings or ScanSettings()
    out = Path(out)
    spec = model if isinstance(model, str) else None
    probe = probe or ("demo" if spec in ("demo", "demo-clean") else None)
    if probe is None:
        raise ForensicsError("a probe set is required for models other than demo and demo-clean")
    probe_set = load_probe_set(probe).subset(max_images, settings.seed)
    loaded = load_model(model, arch=arch) if spec else model
    oracle_obj = build_oracle(oracle, **({"checkpoint": sam_checkpoint} if sam_checkpoint and oracle == "sam" else {})) \
        if oracle else default_oracle(sam_checkpoint)
    if oracle_obj.name == "ground-truth":
        raise ForensicsError("the ground-truth oracle needs known masks; use it through the library for teaching")
    out.mkdir(parents=True, exist_ok=True)
    detector = build_detector("oracle-guided", oracle_obj, settings)
    findings, artefacts = detector.run(loaded, probe_set, (lambda f, m: progress(0.9 * f, m)) if progress else None)

    for name, info in artefacts["patterns"].items():
        pattern = info["pattern"]
        to_pil(pattern).save(out / name)
        big = to_pil(pattern).resize((96, 96), resample=0)
        big.save(out / name.replace(".png", "_preview.png"))
    compact = write_compact_set(out, findings, artefacts, probe_set.class_names, seed=settings.seed)
    report = {
        "tool": "clip-backdoor-forensics", "detector": detector.name,
        "model": {"spec": spec or loaded.facts.source, **loaded.facts.to_dict()},
        "probe": {"name": probe_set.name, "source": str(probe), "images": len(probe_set), "classes": probe_set.class_names,
                  "subset_of": probe_set.meta.get("subset_of")},
        "oracle": {"name": oracle_obj.name, **oracle_obj.settings()},
        **findings.to_dict(), "compact_set": compact, "seed": settings.seed,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(loaded.device)},
    }
    report["metrics"]["seconds_total"] = round(time.time() - start, 2)
    write_json(out / "report.json", report)
    if progress:
        progress(0.92, "drawing the report")
    _write_scan_html(out, report, findings, artefacts, loaded, probe_set)
    if progress:
        progress(1.0, "done")
    return {"report": str(out / "report.json"), "html": str(out / "report.html"),
            "flagged_labels": report["flagged_labels"], "triggers": report["triggers"],
            "n_victims": len(report["victims"]), "metrics": report["metrics"]}


def _write_scan_html(out: Path, report: dict, findings, artefacts: dict, model: SuspectModel, probe_set) -> None:
    records, images, maps = artefacts["records"], artefacts["images"], artefacts["maps"]
    class_names = probe_set.class_names
    order = sorted(range(len(records)), key=lambda i: -records[i]["discrepancy"])[:PANELS]
    class_emb = class_text_embeddings(model, class_names, findings.settings.get("templates", "short"))
    targets = [class_names.index(records[i]["predicted"]) for i in order]
    cams = gradcam(model, images[order], class_emb, targets) if order else []
    panels = []
    for k, i in enumerate(order):
        r = records[i]
        true_box = probe_set.trigger_box_at(i, model.image_size)
        title = (f"#{i}: CLIP says '{r['predicted']}' ({r['confidence']:.2f}); objects say '{r['object_view_label']}'; "
                 f"discrepancy {r['discrepancy']:.2f}{' — captured' if r['captured'] else ''}")
        fig = image_panels(images[i], [reg.mask for reg in r["regions"]], cams[k], maps[i], title,
                           r["hijack_box"] if r["captured"] else None, true_box)
        panels.append(figure_html(fig, f"image {i}"))
    flagged = [f["label"] for f in report["flagged_labels"]]
    patterns = "".join(
        f'<div class="pattern"><img src="data:image/png;base64,{_b64_file(out / t["pattern"].replace(".png", "_preview.png"))}"><br>'
        f'{t["label"]}: verified flip rate {t["verified_asr"]:.0%} on {t["n_verified"]} clean images</div>'
        for t in report["triggers"])
    metrics = {k: v for k, v in report["metrics"].items()}
    summary = {"model": report["model"]["spec"], "SHA-256": report["model"]["sha256"],
               "architecture": report["model"]["architecture"], "probe set": report["probe"]["name"],
               "oracle": report["oracle"]["name"], "flagged labels": ", ".join(flagged) or "none",
               "victims": len(report["victims"]), "seconds": metrics.get("seconds_total")}
    sections = [
        ("Flagged labels", figure_html(flagged_chart(records, class_names, flagged)) +
         (table_html(report["flagged_labels"], ["label", "score", "captured", "predicted", "explanation"]) if flagged
          else "<p>No label is flagged: no label collects predictions that a small non-object window decides.</p>")),
        ("Trigger candidates", patterns or "<p>None.</p>"),
        ("Victims", table_html(report["victims"][:50], ["index", "image", "label", "box", "grounded_label", "discrepancy"])),
        ("Metrics", table_html([metrics], list(metrics))),
        ("Images (most discrepant first): image | oracle regions | Grad-CAM | estimated occlusion drop; red = localized trigger, "
         "green = true trigger",
         "".join(panels)),
    ]
    write_html(out / "report.html", f"Backdoor scan of {report['model']['spec']}", summary, sections)


def _b64_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()
