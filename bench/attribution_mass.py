"""Which attribution localizes? Share of attribution mass inside the object mask (clean images) and inside
the trigger box (triggered images), for Grad-CAM, occlusion, its first-order estimate and region ablation over the
oracle's segments.

    python bench/attribution_mass.py [--model demo] [--oracle fallback] [--out bench/results/attribution.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.attribution import gradcam, mass_inside, occlusion, occlusion_estimate, region_ablation_map  # noqa: E402
from forensics.core.data import load_probe_set  # noqa: E402
from forensics.core.models import load_model  # noqa: E402
from forensics.core.zeroshot import class_text_embeddings, predict  # noqa: E402
from forensics.oracles import build_oracle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--probe", default="demo")
    parser.add_argument("--oracle", default="fallback")
    parser.add_argument("--clean", type=int, default=40, help="clean images to use")
    parser.add_argument("--out", default="bench/results/attribution.json")
    args = parser.parse_args()
    model = load_model(args.model)
    probe = load_probe_set(args.probe)
    size = model.image_size
    oracle = build_oracle(args.oracle)
    class_emb = class_text_embeddings(model, probe.class_names)
    triggered = probe.triggered_indices()
    clean = probe.clean_indices()[:: max(1, len(probe.clean_indices()) // args.clean)][: args.clean]
    rows = {}
    for kind, indices in (
        ("clean: mass inside the object mask", clean),
        ("triggered: mass inside the trigger box", triggered),
    ):
        if not indices:
            continue
        images = probe.load_images(size, indices)
        targets = predict(model, images, class_emb).argmax(-1).tolist()
        if kind.startswith("clean"):
            masks = torch.stack([probe.load_mask(i, size) for i in indices])
        else:
            masks = torch.zeros(len(indices), size, size, dtype=torch.bool)
            for k, i in enumerate(indices):
                x0, y0, x1, y1 = probe.trigger_box_at(i, size)
                masks[k, y0:y1, x0:x1] = True
        regions = [
            torch.from_numpy(np.stack([r.mask for r in oracle.segment(img)] or [np.zeros((size, size), bool)]))
            for img in images
        ]
        for name, fn in (
            ("gradcam", lambda: gradcam(model, images, class_emb, targets)),
            ("occlusion", lambda: occlusion(model, images, class_emb, targets)),
            ("occlusion estimate (input x gradient)", lambda: occlusion_estimate(model, images, class_emb, targets)),
            ("region ablation", lambda: region_ablation_map(model, images, class_emb, targets, regions)),
        ):
            start = time.time()
            maps = fn()
            share = mass_inside(maps, masks)
            rows.setdefault(name, {})[kind] = {
                "mean": float(share.mean()),
                "median": float(share.median()),
                "seconds_per_image": (time.time() - start) / len(indices),
            }
        rows.setdefault("area share (chance level)", {})[kind] = {"mean": float(masks.float().mean())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "oracle": args.oracle, "rows": rows}, indent=2))
    kinds = list(next(iter(rows.values())))
    print("| method | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, cols in rows.items():
        print(f"| {name} | " + " | ".join(f"{cols[k]['mean']:.3f}" if k in cols else "" for k in kinds) + " |")


if __name__ == "__main__":
    main()
