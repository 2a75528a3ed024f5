"""Benchmark (not a test): what the trigger-inversion detector costs per label, on the demo and a real-size CLIP.

Side by side in one run, with the detector's default settings: for each model, the untargeted ranking pass
(what a scan with more classes than ``top_k`` runs once) and one label's inversion in each family (fit, choose
the size on the grid, verify), timed; the per-label cost is the two families together. The real-size model is a
random-weight open_clip CLIP at 224 px (no weights can be downloaded here): its triggers reach nothing, which
changes no cost (every step and every grid point runs either way). With ``C`` classes a scan costs about
``rank + min(C, top_k) x per label``; the table says so for ImageNet's 1,000 classes.

    python bench/inversion_cost.py          # demo and random:ViT-B-32 on the demo's 300 probe images
    python bench/inversion_cost.py --models demo,random:RN50 --images 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.data import load_probe_set  # noqa: E402
from forensics.core.models import atomic_write_text, frozen, load_model  # noqa: E402
from forensics.core.zeroshot import class_text_embeddings, image_embeddings  # noqa: E402
from forensics.detect.trigger_inversion import FAMILIES, TriggerInversion  # noqa: E402


def label_costs(arch: str, images_wanted: int) -> dict:
    """Seconds for the ranking pass and for one label's inversion per family on ``arch``."""
    model = load_model(arch)
    probe = load_probe_set("demo-clean")
    keep = torch.randperm(len(probe), generator=torch.Generator().manual_seed(0))[:images_wanted].tolist()
    images = probe.load_images(model.image_size, sorted(keep)).to(model.device)
    detector = TriggerInversion()
    names = list(probe.class_names)
    with frozen(model):
        class_emb = class_text_embeddings(model, names, detector.settings.templates).detach().to(model.device)
        embeddings = image_embeddings(model, images)
        predicted = (embeddings @ class_emb.t()).argmax(-1).cpu()
        start = time.perf_counter()
        detector.rank_labels(model, images, class_emb, torch.Generator().manual_seed(0))
        rank_seconds = time.perf_counter() - start
        label = next((t for t in range(len(names)) if detector.invertible(predicted, t)), None)
        if label is None:
            raise SystemExit(f"{arch}: every probe image goes to one label; nothing to invert")
        per_family = {}
        for family in FAMILIES:
            start = time.perf_counter()
            # own images default to those predicted as the label: the subset carries no probe labels here
            detector.invert_label(model, images, predicted, class_emb, label, family, embeddings=embeddings)
            per_family[family] = round(time.perf_counter() - start, 2)
    s = detector.settings
    per_label = round(sum(per_family.values()), 2)
    return {
        "model": arch,
        "image_size": model.image_size,
        "parameters": sum(p.numel() for p in model.clip.parameters()),
        "images": len(images),
        "label": names[label],
        "rank_seconds": round(rank_seconds, 2),
        "family_seconds": per_family,
        "per_label_seconds": per_label,
        "settings": {"steps": s.steps, "batch_size": s.batch_size, "grid_points": s.grid_points, "top_k": s.top_k},
        "imagenet_estimate_seconds": round(rank_seconds + s.top_k * per_label, 1),
    }


def write_table(rows: list[dict], out: Path) -> None:
    base = rows[0]["per_label_seconds"]
    lines = [
        "# Trigger inversion: cost per label",
        "",
        f"`python bench/inversion_cost.py` on {platform.platform()}, torch threads: {torch.get_num_threads()}, "
        "one run. Per label = one local and one global inversion (40 steps x 32 images, fewer when the probe's "
        "fit third is smaller; 11 grid points; held-out "
        "verification); rank = the untargeted pass that picks the top-k labels when there are more classes "
        "(run once per scan). ImageNet estimate = rank + top_k (10) x per label.",
        "",
        "| model | px | parameters | images | rank s | local s | global s | per label s | x demo | 1,000 classes s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['parameters'] / 1e6:.1f} M | {r['images']} | "
            f"{r['rank_seconds']} | {r['family_seconds']['local']} | {r['family_seconds']['global']} | "
            f"{r['per_label_seconds']} | {r['per_label_seconds'] / base:.1f}x | {r['imagenet_estimate_seconds']} |"
        )
    atomic_write_text(out / "inversion_cost.md", "\n".join(lines) + "\n")
    atomic_write_text(
        out / "inversion_cost.json", json.dumps({"rows": rows, "threads": torch.get_num_threads()}, indent=2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,random:ViT-B-32")
    parser.add_argument("--images", type=int, default=300, help="probe images (a seeded subset of the demo's 300)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    rows = []
    for arch in args.models.split(","):
        rows.append(label_costs(arch.strip(), args.images))
        print(json.dumps(rows[-1]), file=sys.stderr)
        write_table(rows, Path(args.out))


if __name__ == "__main__":
    main()
