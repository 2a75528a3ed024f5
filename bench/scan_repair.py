"""Benchmark of the scan and the repair (not a test): writes a markdown table and JSON.

Measures, per model: the oracle-guided scan's images/s with the oracle and without it (a ground-truth-free pass that
skips the oracle by using an oracle returning no regions), seconds per image of each weight-free
oracle, forward+backward images/s of the bare image tower (the physical limit), repair wall time and
samples used, and CA/ASR before/after. Models: the demo pair, and a random-weight ViT-B-32 at 224 px
(scan speed only: a random model has no backdoor to repair).

    python bench/scan_repair.py --out bench/results          # about 3 minutes on 2 CPU cores
    python bench/scan_repair.py --cascade                    # only: full scan vs cascade on the demo, side by side
    python bench/scan_repair.py --cascade --model random:ViT-B-32 --max-images 24   # the same on ViT-B-32, 224 px
    python bench/scan_repair.py --proposals-check ZOO   # the cascade's victims at 12, 9, 8, 6 windows, zoo probes

``--cascade`` prints (and writes nothing) the oracle-guided scan of the demo probe in full and as a cascade, then
the cascade again on the same probe (oracle regions from the cache): images/s, fwd+bwd images/s, their ratio,
images examined, and the findings compared (flagged labels, victims P/R, images whose captured flag differs);
then each scan's steps (the scan's ``stage_seconds``) in forward+backward passes of the probe.
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
sys.path.insert(0, str(ROOT / "bench"))

from forensics.core.data import load_probe_set  # noqa: E402
from forensics.core.models import load_model  # noqa: E402
from forensics.detect import OracleGuidedScan, ScanSettings  # noqa: E402
from forensics.oracles import Oracle, build_oracle, list_oracles  # noqa: E402
from forensics.pipelines.repair import run_repair  # noqa: E402
from forensics.pipelines.scan import run_scan  # noqa: E402


class NoRegions(Oracle):
    """An oracle that finds nothing: the scan's cost without segmentation."""

    name = "none"

    def segment(self, image):
        return []


def forward_backward_rate(model, batch: int = 32, steps: int = 3) -> float:
    """Images/s of a forward+backward pass through the image tower alone, fed channels-last as the scan feeds it
    (SuspectModel.encode_image)."""
    x = torch.rand(batch, 3, model.image_size, model.image_size)
    model.clip.visual.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.time()
        model.clip.visual(model.normalize(x).contiguous(memory_format=torch.channels_last)).sum().backward()
    model.clip.visual.eval()
    model.clip.zero_grad(set_to_none=True)
    return batch * steps / (time.time() - start)


def oracle_seconds(probe, size: int, n: int = 30) -> dict:
    images = probe.load_images(size, list(range(min(n, len(probe)))))
    out = {}
    for name in list_oracles(weight_free=True):
        if name == "ground-truth":  # needs known masks, not an image alone
            continue
        oracle = build_oracle(name)
        start = time.time()
        for image in images:
            oracle.segment(image)
        out[name] = (time.time() - start) / len(images)
    return out


def cascade_comparison(spec: str = "demo", max_images: int | None = None) -> tuple[list[dict], list[dict]]:
    """``spec``'s oracle-guided scan of the demo probe in full and as a cascade (cold, then with the region cache
    warm): one row per scan, and each scan's steps in forward+backward units (:func:`stage_costs`)."""
    model = load_model(spec)
    probe = load_probe_set("demo").subset(max_images, 0)
    batch = 32 if model.image_size <= 128 else 8
    fwd_bwd = forward_backward_rate(load_model(spec), batch=batch)  # a copy: train mode moves BatchNorm statistics
    runs = {}
    for name, cascade in (("full", False), ("cascade (cold cache)", True), ("cascade (warm cache)", True)):
        scan = OracleGuidedScan(build_oracle("fallback"), ScanSettings(cascade=cascade))
        t = time.time()
        runs[name] = scan.run(model, probe)
        runs[name].metrics["wall_s"] = time.time() - t
    full = runs["full"]
    full_captured = [r["captured"] for r in full.artefacts["records"]]
    full_victims = {v.index for v in full.victims}
    rows = []
    for name, f in runs.items():
        m = f.metrics
        rate = len(probe) / m["wall_s"]
        victims = {v.index for v in f.victims}
        rows.append(
            {
                "scan": name,
                "images": len(probe),
                "examined": m["examined"],
                "windows / image": m.get("cascade", {}).get("proposals", f.settings["proposals"]),
                "img/s": rate,
                "fwd+bwd img/s": fwd_bwd,
                "cost / fwd+bwd": fwd_bwd / rate,
                "flagged": ", ".join(x.label for x in f.flagged_labels) or "none",
                "same flagged": [x.label for x in f.flagged_labels] == [x.label for x in full.flagged_labels],
                "victims": len(victims),
                "victim P": m.get("victim_precision"),
                "victim R": m.get("victim_recall"),
                "victims differ": len(victims ^ full_victims),
                "captured differ": sum(a != r["captured"] for a, r in zip(full_captured, f.artefacts["records"])),
                "oracle calls": m.get("cascade", {}).get("region_cache", {}).get("misses", m["examined"]),
            }
        )
    return rows, stage_costs(rows, runs)


def stage_costs(rows: list[dict], runs: dict) -> list[dict]:
    """Each scan's steps (``metrics["stage_seconds"]``) in units of one forward+backward of every probe image."""
    out = []
    for row in rows:
        unit = row["images"] / row["fwd+bwd img/s"]  # seconds of one forward+backward of the whole probe
        stages = runs[row["scan"]].metrics["stage_seconds"]
        steps = {k: round(v / unit, 2) for k, v in stages.items()}
        out.append({"scan": row["scan"], **steps, "total (wall clock)": round(row["cost / fwd+bwd"], 2)})
    return out


def proposals_check(zoo_dir: Path, names: list[str], proposals: list[int]) -> list[dict]:
    """Victims of the full scan against the cascade's at each number of windows occluded per examined image, on the
    bench/detect_zoo.py models' triggered probes (bench/detect.py makes them): where does the cascade start to lose
    a victim?"""
    from detect import probe_for  # bench/detect.py: the zoo's probes, made once under the zoo folder

    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    rows = []
    for name in names:
        entry = manifest[name]
        probe = probe_for(entry, "triggered", zoo_dir, name)
        model = load_model(entry["model"])
        full = OracleGuidedScan(build_oracle("fallback"), ScanSettings()).run(model, probe)
        full_victims = {v.index for v in full.victims}
        row = {"model": name, "full scan victims": len(full_victims)}
        for k in proposals:
            f = OracleGuidedScan(build_oracle("fallback"), ScanSettings(cascade=True, cascade_proposals=k)).run(
                model, probe
            )
            victims = {v.index for v in f.victims}
            row[f"{k} windows: victims (differ)"] = f"{len(victims)} ({len(victims ^ full_victims)})"
        rows.append(row)
        print(markdown([row]).splitlines()[-1], file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--vit-images", type=int, default=8, help="probe images for the ViT-B-32 speed run")
    parser.add_argument("--cascade", action="store_true", help="only compare the full scan and the cascade (demo)")
    parser.add_argument("--max-images", type=int, help="with --cascade: a seeded subset of the demo probe")
    parser.add_argument("--model", default="demo", help="with --cascade: the model (e.g. random:ViT-B-32)")
    parser.add_argument("--proposals-check", metavar="ZOO", help="only: the cascade's victims at several window counts")
    parser.add_argument("--zoo-models", default="demo,badnet-noise-br,optimized-patch,badnet-board-tl,sig,blended")
    parser.add_argument("--proposals", default="12,9,8,6", help="with --proposals-check: window counts to try")
    args = parser.parse_args()
    if args.proposals_check:
        names = [n.strip() for n in args.zoo_models.split(",")]
        counts = [int(k) for k in args.proposals.split(",")]
        print(markdown(proposals_check(Path(args.proposals_check), names, counts)))
        return
    if args.cascade:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        rows, stages = cascade_comparison(args.model, max_images=args.max_images)
        print(f"Machine: {machine}\n\n{markdown(rows)}\n\nEach step in forward+backward passes of the probe:\n")
        print(markdown(stages))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    probe = load_probe_set("demo")
    for spec in ("demo", "demo-clean"):
        model = load_model(spec)
        scan_dir = out / f"scan_{spec}"
        t = time.time()
        result = run_scan(spec, scan_dir, detectors="oracle-guided")  # the oracle's cost against none (below)
        scan_s = time.time() - t
        bare = OracleGuidedScan(NoRegions(), ScanSettings())
        t = time.time()
        bare.run(model, probe)
        bare_s = time.time() - t
        row = {
            "model": spec,
            "architecture": model.facts.architecture,
            "image px": model.image_size,
            "probe images": len(probe),
            "scan img/s (oracle)": len(probe) / scan_s,
            "scan img/s (no oracle)": len(probe) / bare_s,
            "fwd+bwd img/s": forward_backward_rate(model),
            "flagged": ", ".join(f["label"] for f in result["flagged_labels"]) or "none",
            "victims": result["n_victims"],
        }
        if result["flagged_labels"]:
            t = time.time()
            repaired = run_repair(spec, scan_dir / "report.json", out / f"repair_{spec}")
            row.update(
                {
                    "repair s": time.time() - t,
                    "samples used": repaired["samples_used"],
                    "CA before": repaired["before"]["ca"],
                    "CA after": repaired["after"]["ca"],
                    "ASR before": repaired["before"]["asr"],
                    "ASR after": repaired["after"]["asr"],
                }
            )
        rows.append(row)
    vit = load_model("random:ViT-B-32")
    subset = probe.__class__(
        probe.name, probe.items[:: max(1, len(probe) // args.vit_images)][: args.vit_images], probe.class_names
    )
    for oracle_name, oracle in (("fallback", build_oracle("fallback")), ("none", NoRegions())):
        t = time.time()
        OracleGuidedScan(oracle, ScanSettings()).run(vit, subset)
        rows.append(
            {
                "model": f"random ViT-B-32 ({oracle_name} oracle)",
                "architecture": "ViT-B-32",
                "image px": 224,
                "probe images": len(subset),
                f"scan img/s ({'oracle' if oracle_name != 'none' else 'no oracle'})": len(subset) / (time.time() - t),
                "fwd+bwd img/s": forward_backward_rate(vit, batch=8, steps=2),
            }
        )
    oracles = {size: oracle_seconds(probe, size) for size in (128, 224)}
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"Machine: {machine}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)
            + " |"
        )
    lines += ["", "Oracle seconds per image:", "", "| oracle | 128 px | 224 px |", "|---|---|---|"]
    for name in oracles[128]:
        lines.append(f"| {name} | {oracles[128][name]:.3f} | {oracles[224][name]:.3f} |")
    table = "\n".join(lines)
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps({"machine": machine, "rows": rows, "oracle_seconds": oracles}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
