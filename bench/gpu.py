"""Device figures (not a test): scan, repair and compare times for random-weight ViT-B-32 and RN50 at 224 px.

The oracle-guided scan is timed in full and as a cascade (cold, then warm region cache), each with its cost
in forward+backward passes of the same images (issue 14's goal: at most 2x).

One run, every row on the same device, in bench/scan_repair.py's table format (rates side by side with the
bare forward+backward, so the ratios read without a reference machine). Random weights: the figures are
speed only (no backdoor to find or repair). Run by bench/gpu.sh on a machine with a GPU:

    python bench/gpu.py --device cuda --out bench/results/gpu    # a few minutes on one GPU
    python bench/gpu.py --device cpu --archs RN50 --images 4 --budget 8 --out /tmp/gpu  # a smoke run here
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.models import ModelRef, atomic_write_text  # noqa: E402
from forensics.detect import ScanSettings  # noqa: E402
from forensics.detect.oracle_scan import REGION_CACHE  # noqa: E402
from forensics.pipelines.compare import run_compare  # noqa: E402
from forensics.pipelines.repair import run_repair  # noqa: E402
from forensics.pipelines.scan import scan  # noqa: E402


def forward_backward_rate(model, batch: int, steps: int = 3) -> float:
    """Images/s of a forward+backward pass through the image tower alone (the physical limit of a scan)."""
    x = torch.rand(batch, 3, model.image_size, model.image_size, device=model.device)
    model.clip.visual.train()
    for i in range(steps + 1):
        if i == 1:
            _sync(model.device)
            start = time.time()
        model.clip.visual(model.normalize(x)).sum().backward()
    _sync(model.device)
    rate = batch * steps / (time.time() - start)
    model.clip.visual.eval()
    model.clip.zero_grad(set_to_none=True)
    return rate


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, what: str, errors: list[str]) -> float | None:
    """Seconds ``fn()`` takes, or None when it fails (the failure is added to ``errors``: the bench goes on to
    the next step). Says what it times on stderr first, so a long run shows where it is."""
    print(f"timing {what}", file=sys.stderr, flush=True)
    start = time.time()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a bench row records what failed and keeps measuring
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"  failed: {errors[-1]}", file=sys.stderr, flush=True)
        return None
    return time.time() - start


def rate(n: int, seconds: float | None) -> float | None:
    return None if seconds is None else n / seconds


def arch_row(arch: str, device: str, images: int, budget: int, methods: str, work: Path) -> dict:
    """One architecture's row: fwd+bwd, the oracle scan in full and as a cascade, the scan with every detector,
    a CleanCLIP repair and a compare; a step that fails leaves its cell empty and its error in ``errors``."""
    spec = arch if arch in ("demo", "demo-clean") else f"random:{arch}"  # the bundled tiny CLIPs, or random weights
    ref = ModelRef(spec, device=device)
    model = ref.load()
    n = images
    errors: list[str] = []
    fwd_bwd = forward_backward_rate(model, batch=min(32, max(2, n)))
    row = {"model": spec.replace(":", " "), "device": str(model.device), "image px": model.image_size}
    row.update({"probe images": n, "fwd+bwd img/s": fwd_bwd})
    oracle_s = timed(
        lambda: scan(model, "demo", max_images=n, detectors="oracle-guided"), f"{arch} oracle scan", errors
    )
    row["scan img/s (oracle)"] = rate(n, oracle_s)
    cascade = ScanSettings(cascade=True)
    REGION_CACHE.clear()  # process-wide: an earlier row's images at this size would warm the cold run
    for cache in ("cold", "warm"):  # the second cascade finds every examined image's regions in the cache
        row[f"scan img/s (oracle, cascade {cache})"] = rate(
            n,
            timed(
                lambda: scan(model, "demo", max_images=n, detectors="oracle-guided", settings=cascade),
                f"{arch} cascade scan ({cache} cache)",
                errors,
            ),
        )
    for name, key in (("full scan", "scan img/s (oracle)"), ("cascade cold", "scan img/s (oracle, cascade cold)")):
        row[f"{name} / fwd+bwd"] = fwd_bwd / row[key] if row[key] else None
    all_s = timed(lambda: scan(model, "demo", max_images=n), f"{arch} scan with every detector", errors)
    row["scan img/s (all detectors)"] = rate(n, all_s)
    row["repair s (cleanclip)"] = timed(
        lambda: run_repair(ref, method="cleanclip", probe="demo", budget=budget, out=work / f"repair_{arch}"),
        f"{arch} CleanCLIP repair",
        errors,
    )
    row["compare s"] = timed(
        lambda: run_compare(ref, methods, work / f"compare_{arch}", probe="demo", budget=budget, target="flower"),
        f"{arch} compare ({methods})",
        errors,
    )
    row["errors"] = "; ".join(errors)
    return row


def write_tables(out: Path, machine: str, rows: list[dict]) -> str:
    """Write gpu.md and gpu.json (each atomically) for ``rows``; returns the markdown table."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"Machine: {machine}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = (f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c) or "") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    atomic_write_text(out / "gpu.md", table + "\n")
    atomic_write_text(out / "gpu.json", json.dumps({"machine": machine, "rows": rows}, indent=2))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="ViT-B-32,RN50", help="open_clip names, or demo / demo-clean")
    parser.add_argument("--images", type=int, default=64, help="probe images per scan")
    parser.add_argument("--budget", type=int, default=120, help="clean images of the repair and compare")
    parser.add_argument("--methods", default="all", help="compare's methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    machine = f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            rows.append(arch_row(arch.strip(), args.device, args.images, args.budget, args.methods, Path(tmp)))
            table = write_tables(out, machine, rows)  # after every row, so a run cut short keeps what it measured
    print(table)


if __name__ == "__main__":
    main()
