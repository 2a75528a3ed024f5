"""Benchmark (not a test): what makes the repairs fast, side by side in one run (ratios, not absolute times).

1. The image tower's forward+backward images/s fed contiguous (NCHW) fp32 (fp32 repairs), channels-last fp32
   (``SuspectModel.encode_image``: the scan, the inversion) and channels-last in bf16 autocast (``--precision bf16``
   repairs), interleaved, with the largest embedding difference from the contiguous fp32 pass: the
   demo's tiny-rn at 128 px, random RN50 and ViT-B-32 at 224 px (smaller batches).
2. ``python -m forensics compare demo --methods all --budget 120`` as a user runs it (wall clock of the whole
   command), with ``--precision fp32`` and ``--precision bf16``, with each method's seconds and CA/ASR after.

    python bench/repair_speed.py                          # about 9 minutes on 2 CPU cores
    python bench/repair_speed.py --no-compare --models demo
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.models import SuspectModel, atomic_write_text, load_model  # noqa: E402
from forensics.core.precision import native_bf16  # noqa: E402

# name -> (memory layout of the tower's input, autocast dtype or None)
ARMS = {
    "contiguous fp32": (torch.contiguous_format, None),
    "channels-last fp32": (torch.channels_last, None),
    "channels-last bf16": (torch.channels_last, torch.bfloat16),
}


def tower_pass(model: SuspectModel, x: torch.Tensor, layout: torch.memory_format, dtype: torch.dtype | None):
    pixels = model.normalize(x).contiguous(memory_format=layout)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return model.clip.visual(pixels).float()


def rate(model: SuspectModel, x: torch.Tensor, arm: tuple, seconds: float) -> float:
    """Forward+backward images/s of the image tower for ``seconds`` (after one warm-up pass)."""
    model.clip.visual.train()
    tower_pass(model, x, *arm).sum().backward()
    done, start = 0, time.time()
    while time.time() - start < seconds:
        tower_pass(model, x, *arm).sum().backward()
        done += len(x)
    model.clip.visual.eval()
    model.clip.zero_grad(set_to_none=True)
    return done / (time.time() - start)


def tower_row(spec: str, batch: int, repeats: int, seconds: float) -> dict:
    model = load_model(spec)
    x = torch.rand(batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in ARMS}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit every arm alike
        for name, arm in ARMS.items():
            rates[name].append(rate(model, x, arm, seconds))
    differences = {}
    with torch.no_grad():
        model.clip.visual.eval()
        reference = torch.nn.functional.normalize(tower_pass(model, x[:4], torch.contiguous_format, None), dim=-1)
        for name, arm in ARMS.items():
            embedding = torch.nn.functional.normalize(tower_pass(model, x[:4], *arm), dim=-1)
            differences[name] = float(f"{float((embedding - reference).abs().max()):.2e}")
    best = {name: max(values) for name, values in rates.items()}
    base = best["contiguous fp32"]
    return {
        "model": spec,
        "px": model.image_size,
        "batch": batch,
        "img/s": {name: round(v, 1) for name, v in best.items()},
        "speed-up": {name: round(v / base, 2) for name, v in best.items()},
        "max |embedding difference|": differences,
        "runs": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    }


def compare_run(precision: str, budget: int) -> dict:
    """``python -m forensics compare demo --methods all`` at ``precision``: wall seconds, per-method rows."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "compare"
        command = [sys.executable, "-m", "forensics", "--quiet", "compare", "demo", "--methods", "all"]
        command += ["--budget", str(budget), "--precision", precision, "--out", str(out)]
        start = time.time()
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        seconds = time.time() - start
        report = json.loads((out / "compare.json").read_text())
    rows = {
        r["method"]: {
            "seconds": r.get("seconds"),
            "CA after": None if r.get("ca_after") is None else round(r["ca_after"], 3),
            "ASR after": None
            if (r.get("asr_after") or {}).get("planted") is None
            else round(r["asr_after"]["planted"], 3),
        }
        for r in report["rows"]
    }
    return {"precision": precision, "wall seconds": round(seconds, 1), "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,random:RN50,random:ViT-B-32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    batches = {"demo": 32}
    rows = [tower_row(spec, batches.get(spec, 8), args.repeats, args.seconds) for spec in args.models.split(",")]
    compares = [] if args.no_compare else [compare_run(p, args.budget) for p in ("fp32", "bf16")]
    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "native bf16": native_bf16("cpu"),
        },
        "towers": rows,
        "compare": compares,
    }
    lines = [
        "# What makes the repairs fast: channels-last input and bf16 autocast",
        "",
        f"`python bench/repair_speed.py` on {platform.machine()}, {torch.get_num_threads()} threads (native bf16: "
        f"{native_bf16('cpu')}); tower rows: best of {args.repeats} interleaved runs of {args.seconds:g} s each, "
        "speed-up over contiguous fp32, largest difference of an L2-normalised embedding from it.",
        "",
        "| model | px | batch | " + " | ".join(f"{a} img/s" for a in ARMS) + " | speed-up (cl fp32 / cl bf16) | "
        "max abs difference (cl fp32 / cl bf16) |",
        "|---|---|---|" + "---|" * len(ARMS) + "---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['px']} | {r['batch']} | "
            + " | ".join(str(r["img/s"][a]) for a in ARMS)
            + f" | {r['speed-up']['channels-last fp32']} / {r['speed-up']['channels-last bf16']} | "
            f"{r['max |embedding difference|']['channels-last fp32']:.1e} / "
            f"{r['max |embedding difference|']['channels-last bf16']:.1e} |"
        )
    if compares:
        methods = list(compares[0]["methods"])
        lines += ["", f"`python -m forensics compare demo --methods all --budget {args.budget} --precision P`:", ""]
        lines.append("| precision | wall s | " + " | ".join(f"{m} s / CA / ASR" for m in methods) + " |")
        lines.append("|---|---|" + "---|" * len(methods))
        for c in compares:
            cells = [
                f"{c['methods'][m]['seconds']} / {c['methods'][m]['CA after']} / {c['methods'][m]['ASR after']}"
                for m in methods
            ]
            lines.append(f"| {c['precision']} | {c['wall seconds']} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "repair_speed.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "repair_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
