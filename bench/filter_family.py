"""Benchmark (not a test): does the inversion's filter family (a colour transform, forensics.detect.trigger_inversion)
reach a colour-filter backdoor from clean images, and what does it give on clean models and other backdoors?

For each model: the planted trigger's ASR on the clean probe (when it has one), then the filter family alone inverted
per label on the demo's clean probe (300 images, default settings otherwise): each label's colour-change size, flip
rate, anomaly index and alignment, and the labels the rule would flag with the installed cuts. The filter family is
not calibrated (no cut was fit on it): this measures whether it separates, before it is.

    OMP_NUM_THREADS=1 python bench/filter_family.py --zoo ~/.cache/forensics/zoo   # bench/results/filter_family.*
    OMP_NUM_THREADS=1 python bench/filter_family.py --models filter-sepia          # one row added or replaced
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

from forensics.attacks import attack_from_dict  # noqa: E402
from forensics.core.data import load_probe_set  # noqa: E402
from forensics.core.models import atomic_write_text, load_model  # noqa: E402
from forensics.core.zeroshot import evaluate  # noqa: E402
from forensics.detect.trigger_inversion import TriggerInversion, TriggerInversionSettings  # noqa: E402

MODELS = ("filter-nashville", "clean-s1", "demo-clean", "demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=str(Path.home() / ".cache" / "forensics" / "zoo"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    zoo = Path(args.zoo).expanduser()
    manifest = json.loads((zoo / "zoo.json").read_text())
    probe = load_probe_set("demo-clean")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        entry = manifest[name]
        model = load_model(name if name in ("demo", "demo-clean") else str(zoo / name / "model.safetensors"))
        start = time.time()
        asr = None
        if entry.get("attack"):
            indices = probe.clean_indices()
            images = probe.load_images(model.image_size, indices)
            labels = [probe.items[i].label for i in indices]
            scores = evaluate(
                model, images, labels, probe.class_names, attack_from_dict(entry["attack"]), entry["target"]
            )
            asr = round(scores["asr"], 4)
        settings = TriggerInversionSettings(families=("filter",))
        findings = TriggerInversion(settings=settings).run(model, probe.sharing_loaded_images())
        labels = sorted(findings.label_evidence["filter"], key=lambda t: t["size"])
        rows.append(
            {
                "model": name,
                "truth": entry.get("target") or "clean",
                "attack": entry.get("attack"),
                "planted_asr": asr,
                "flagged": [f.label for f in findings.flagged_labels],
                "smallest": labels[:3],
                "seconds": round(time.time() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    earlier = out / "filter_family.json"
    if earlier.is_file():  # rows of models not run this time stay (a model run again replaces its row)
        ran = {r["model"] for r in rows}
        rows = [r for r in json.loads(earlier.read_text()) if r["model"] not in ran] + rows
    lines = [
        "# The inversion's filter family (a colour transform) on filter, patch and clean models",
        "",
        f"`python bench/filter_family.py` on {platform.platform()}, {torch.get_num_threads()} thread(s): the filter "
        "family alone, default inversion settings, on the demo's 300 clean probe images; the family is not "
        "calibrated, so 'flagged' applies the installed anomaly and alignment cuts as they stand.",
        "",
        "| model | truth | planted ASR | three smallest colour changes (label: size, flip, anomaly, alignment) | "
        "flagged | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        smallest = "; ".join(
            f"{t['label']}: {t['size']:.3f}{'' if t['reached'] else ' (not reached)'}, {t['flip_rate']:.2f}, "
            f"{t['anomaly']:.1f}, {t['alignment'] if t['alignment'] is not None else '-'}"
            for t in r["smallest"]
        )
        asr = "-" if r["planted_asr"] is None else f"{r['planted_asr']:.3f}"
        lines.append(
            f"| {r['model']} | {r['truth']} | {asr} | {smallest} | {', '.join(r['flagged']) or 'none'} | "
            f"{r['seconds']} |"
        )
    atomic_write_text(out / "filter_family.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "filter_family.json", json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
