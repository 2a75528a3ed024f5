"""Measure segmentation oracles against exact object masks: mask IoU and seconds per image.

For each oracle, over N images of a probe CSV with a ``mask`` column (the demo probe set by
default): IoU of the union of its regions with the ground-truth mask, IoU of its best (first)
region, how many regions it returns, and seconds per image (wall clock and CPU time of this
process; on a shared machine CPU time is the steadier figure). Prints a markdown table; ``--out``
also writes JSON.

    python bench/oracle_iou.py                                   # every weight-free oracle, all images
    python bench/oracle_iou.py /work/build/demo/probe/probe_clean.csv -n 50 --oracles fallback,background
    python bench/oracle_iou.py --oracles sam --sam-checkpoint sam_vit_b_01ec64.pth -n 20 --out sam.json

Images are read at their own size (no resize); masks are white = object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from forensics.core.errors import ForensicsError  # noqa: E402
from forensics.oracles import ORACLES, build_oracle, list_oracles, mask_iou, union_mask  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CSV = "forensics/assets/demo/probe/probe_clean.csv"  # relative to the repository root


def load_pairs(csv_path: Path, n: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HxWx3 uint8 image, HxW bool mask) for up to ``n`` rows spread evenly over the CSV."""
    if not csv_path.is_file():
        raise ForensicsError(f"probe CSV {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mask")]
    if not rows:
        raise ForensicsError(f"{csv_path} has no rows with a 'mask' column")
    if n is not None and n < len(rows):  # the CSV is sorted by class: take an even spread, not the first n
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]
    out = []
    for r in rows:
        with Image.open(csv_path.parent / r["image"]) as im:
            img = np.asarray(im.convert("RGB"))
        with Image.open(csv_path.parent / r["mask"]) as im:
            m = np.asarray(im.convert("L")) > 127
        if m.shape != img.shape[:2]:
            raise ForensicsError(f"{r['mask']}: mask {m.shape} does not match image {img.shape[:2]}")
        out.append((r["image"], img, m))
    return out


def measure(oracle, pairs, per_image: bool = False) -> dict:
    union_ious, best_ious, counts = [], [], []
    wall = cpu = 0.0
    for _, img, m in pairs:
        t0, c0 = time.perf_counter(), time.process_time()
        regions = oracle.segment(img)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        union_ious.append(mask_iou(union_mask(regions, m.shape), m))
        best_ious.append(mask_iou(regions[0].mask, m) if regions else 0.0)
        counts.append(len(regions))
    u, b = np.array(union_ious), np.array(best_ious)
    rows = [
        {"image": name, "union_iou": float(x), "best_iou": float(y), "regions": int(c)}
        for (name, _, _), x, y, c in zip(pairs, union_ious, best_ious, counts)
    ]
    return {
        "oracle": oracle.describe(),
        "images": len(pairs),
        "union_iou_mean": float(u.mean()),
        "union_iou_median": float(np.median(u)),
        "union_iou_p10": float(np.percentile(u, 10)),
        "union_iou_below_0.5": int((u < 0.5).sum()),
        "best_iou_mean": float(b.mean()),
        "best_iou_median": float(np.median(b)),
        "regions_mean": float(np.mean(counts)),
        "empty": int(sum(c == 0 for c in counts)),
        "seconds_per_image_wall": wall / len(pairs),
        "seconds_per_image_cpu": cpu / len(pairs),
        **({"per_image": rows} if per_image else {}),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| oracle | images | union IoU mean | median | p10 | <0.5 | best-region IoU mean | regions/img | empty | "
        "s/img (cpu) | s/img (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['oracle']['name']} | {r['images']} | {r['union_iou_mean']:.3f} | {r['union_iou_median']:.3f} | "
            f"{r['union_iou_p10']:.3f} | {r['union_iou_below_0.5']} | {r['best_iou_mean']:.3f} | "
            f"{r['regions_mean']:.2f} | {r['empty']} | {r['seconds_per_image_cpu']:.4f} | "
            f"{r['seconds_per_image_wall']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "csv", nargs="?", default=DEFAULT_CSV, help=f"probe CSV with image and mask columns (default {DEFAULT_CSV})"
    )
    ap.add_argument(
        "--oracles",
        default=None,
        help="comma-separated oracle names (default: every weight-free one except ground_truth)",
    )
    ap.add_argument("-n", type=int, default=None, help="number of images, spread over the CSV (default: all)")
    ap.add_argument("--sam-checkpoint", default=None, help="SAM checkpoint path, for --oracles sam")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenCV threads (default 1)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--per-image", action="store_true", help="also store every image's IoUs in the JSON")
    args = ap.parse_args(argv)
    try:
        import cv2
        import torch

        torch.set_num_threads(max(1, args.threads))
        cv2.setNumThreads(max(1, args.threads))
        names = (
            args.oracles.split(",")
            if args.oracles
            else [n for n in list_oracles(weight_free=True) if n != "ground-truth"]
        )
        csv_path = Path(args.csv)
        if args.csv == DEFAULT_CSV and not csv_path.is_file():
            csv_path = REPO / DEFAULT_CSV
        pairs = load_pairs(csv_path, args.n)
        results = []
        for name in (s.strip() for s in names):
            kwargs = {}
            if name == "sam":
                kwargs["checkpoint"] = args.sam_checkpoint
            oracle = build_oracle(name, **kwargs)
            if oracle.name == "ground-truth":  # a sanity row: the truth against itself
                lookup = {id(img): m for _, img, m in pairs}
                oracle = build_oracle("ground_truth", mask_lookup=lambda image: lookup[id(image)])
            results.append(measure(oracle, pairs, args.per_image))
            print(f"{name}: done", file=sys.stderr, flush=True)
    except ForensicsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(results))
    if args.out:
        meta = {
            "csv": str(csv_path),
            "threads": args.threads,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "oracles_known": sorted(ORACLES),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
