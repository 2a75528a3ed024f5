"""Benchmark (not a test): image towers fed contiguous (NCHW) against channels-last (NHWC) input, side by side.

``SuspectModel.normalize`` hands every tower channels-last pixels: the scan, the inversion and the repairs all go
through it. This measures why, in one run and the two layouts interleaved (ratios, not absolute times): the
image tower's forward+backward images/s per layout (demo tiny-rn at 128 px; random RN50 and ViT-B-32 at 224 px,
smaller batches), the largest embedding difference between the layouts, and one CleanCLIP repair of the demo
(budget 120) per layout with its CA/ASR after, so the speed-up changes no result beyond float rounding.

    python bench/channels_last.py                      # about 4 minutes on 2 CPU cores
    python bench/channels_last.py --no-repair --models demo
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

from forensics.core.models import SuspectModel, atomic_write_text, load_model  # noqa: E402
from forensics.pipelines.repair import run_repair  # noqa: E402

CHANNELS_LAST = SuspectModel.normalize


def contiguous_normalize(self: SuspectModel, images: torch.Tensor) -> torch.Tensor:
    """The layout before: pixel normalisation that keeps the input's (contiguous) layout."""
    return CHANNELS_LAST(self, images).contiguous()


LAYOUTS = {"contiguous": contiguous_normalize, "channels-last": CHANNELS_LAST}


def rate(model: SuspectModel, x: torch.Tensor, seconds: float) -> float:
    """Forward+backward images/s of the image tower for ``seconds`` (after one warm-up pass)."""
    visual = model.clip.visual.train()
    visual(model.normalize(x)).sum().backward()
    done, start = 0, time.time()
    while time.time() - start < seconds:
        visual(model.normalize(x)).sum().backward()
        done += len(x)
    visual.eval()
    model.clip.zero_grad(set_to_none=True)
    return done / (time.time() - start)


def tower_row(spec: str, batch: int, repeats: int, seconds: float) -> dict:
    model = load_model(spec)
    x = torch.rand(batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both layouts alike
        for name, normalize in LAYOUTS.items():
            SuspectModel.normalize = normalize
            rates[name].append(rate(model, x, seconds))
    SuspectModel.normalize = CHANNELS_LAST
    with torch.no_grad():
        model.clip.visual.eval()
        a = model.clip.visual(contiguous_normalize(model, x[:4]))
        b = model.clip.visual(CHANNELS_LAST(model, x[:4]))
    best = {name: max(values) for name, values in rates.items()}
    return {
        "model": spec,
        "px": model.image_size,
        "batch": batch,
        "contiguous img/s": round(best["contiguous"], 1),
        "channels-last img/s": round(best["channels-last"], 1),
        "speed-up": round(best["channels-last"] / best["contiguous"], 2),
        "max |embedding difference|": float(f"{float((a - b).abs().max()):.2e}"),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    }


def repair_rows(budget: int) -> list[dict]:
    rows = []
    for name, normalize in LAYOUTS.items():
        SuspectModel.normalize = normalize
        with tempfile.TemporaryDirectory() as work:
            start = time.time()
            metrics = run_repair("demo", method="cleanclip", probe="demo", budget=budget, out=Path(work) / "out")
            seconds = time.time() - start
        after = metrics.get("after", {})
        rows.append(
            {"layout": name, "seconds": round(seconds, 1), "CA after": after.get("ca"), "ASR after": after.get("asr")}
        )
    SuspectModel.normalize = CHANNELS_LAST
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,random:RN50,random:ViT-B-32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--no-repair", action="store_true")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    batches = {"demo": 32}
    rows = [tower_row(spec, batches.get(spec, 8), args.repeats, args.seconds) for spec in args.models.split(",")]
    repairs = [] if args.no_repair else repair_rows(args.budget)
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "towers": rows,
        "repair": repairs,
    }
    lines = [
        "# Image towers: contiguous against channels-last input",
        "",
        f"`python bench/channels_last.py` on {platform.machine()}, {torch.get_num_threads()} threads; best of "
        f"{args.repeats} interleaved runs of {args.seconds:g} s each.",
        "",
        "| model | px | batch | contiguous img/s | channels-last img/s | speed-up | max abs embedding difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['px']} | {r['batch']} | {r['contiguous img/s']} | {r['channels-last img/s']} | "
            f"{r['speed-up']} | {r['max |embedding difference|']:.1e} |"
        )
    if repairs:
        lines += [
            "",
            f"CleanCLIP repair of the demo (budget {args.budget}):",
            "",
            "| layout | seconds | CA after | ASR after |",
        ]
        lines.append("|---|---|---|---|")
        lines += [f"| {r['layout']} | {r['seconds']} | {r['CA after']} | {r['ASR after']} |" for r in repairs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "channels_last.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "channels_last.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
