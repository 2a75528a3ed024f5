"""Benchmark (not a test): the scan's one verdict on clean and backdoored models, in both probe modes, then a
repair from those findings; ``--calibrate`` sets the detectors' thresholds from the clean models.

Models come from bench/detect_zoo.py (``--zoo``: clean tiny CLIPs with other seeds, lab backdoors at other
shapes, colours, sizes, places and targets) plus the bundled demo and its clean twin. Probe modes: ``clean``
is the demo's 300 clean probe images (the usual audit: nobody holds a triggered input); ``triggered`` has
15 % of the non-target images carrying the model's own trigger (for clean models: the demo's trigger).
Per model x mode: verdict, rank of the true target, trigger family, verified flip rate of the inverted or
reconstructed trigger, victims precision/recall against the triggered images the backdoor really captures,
seconds. For backdoored models the findings then drive ``oracle-finetune`` on the scan's compact set; CA and
the planted trigger's ASR are measured on the probe's clean images before and after (ASR on the non-target
ones; the compact set's anchors come from the same probe, so CA after is optimistic by that overlap).

Every scanned row also leaves its detectors' evidence (per-label sizes, alignments, anomaly indices, flip rates,
oracle counts, density clusters; no images) in ``bench/results/evidence/<model>__<mode>.json``, so the decision
rule is re-fit and validated leaving each model out in seconds, with no zoo (``--refit``).

    python bench/detect.py                           # scan the zoo (bench/detect_zoo.py's cache): detect.md, evidence
    python bench/detect.py --refit                   # fit the cuts on the stored evidence; leave-one-model-out table
    python bench/detect.py --calibrate               # the same fit as thresholds: bench/results/calibration.json
    python bench/detect.py --install-calibration bench/results/calibration.json   # reviewed: into the package
    python bench/detect.py --density                 # the density clusters alone, every row
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

from compare_attacks import triggered_probe  # noqa: E402
from detect_zoo import DEFAULT_ZOO  # noqa: E402

from forensics.attacks import attack_from_dict  # noqa: E402
from forensics.core.data import load_probe_set  # noqa: E402
from forensics.core.errors import ForensicsError  # noqa: E402
from forensics.core.models import atomic_write_text, resolve_model  # noqa: E402
from forensics.detect.calibration import CALIBRATION_FILE, REQUIRED, CalibratedDomain, ScanDomain  # noqa: E402
from forensics.detect.evidence import ScanEvidence, evidence_of, read_evidence, write_evidence  # noqa: E402
from forensics.detect.refit import fit, leave_one_model_out, summary  # noqa: E402
from forensics.pipelines.evaluate import measure  # noqa: E402
from forensics.pipelines.repair import make_defense  # noqa: E402
from forensics.pipelines.scan import compact_repair_data, scan  # noqa: E402

DEMO_TRIGGER = {"attack": "badnet", "pattern": "checkerboard", "size": 0.1, "cells": 4, "position": "random"}


def probe_for(entry: dict, mode: str, work: Path, name: str):
    """The probe set of ``mode`` for a zoo entry (the triggered one made once under ``work``)."""
    if mode == "clean":
        return load_probe_set("demo-clean")
    if name == "demo":
        return load_probe_set("demo")
    folder = work / "probes" / name
    csv = folder / "probe.csv"
    if not csv.is_file():
        triggered_probe(attack_dict(entry, work) or DEMO_TRIGGER, entry.get("target") or "flower", folder)
    return load_probe_set(str(csv))


def attack_dict(entry: dict, work: Path) -> dict | None:
    """The zoo entry's attack in full (an optimized patch's pixels are kept in their own file)."""
    attack = entry.get("attack")
    if attack and attack.get("attack") in ("optimized-patch", "optimized_patch"):
        intended = entry.get("intended", entry["target"])
        attack = json.loads((work / f"optimized_patch_{intended}.json").read_text())
    return attack


def true_attack(entry: dict, work: Path):
    attack = attack_dict(entry, work)
    return attack_from_dict(attack) if attack else None


def planted_target(entry: dict, work: Path) -> dict:
    """Where the planted trigger really sends images: per label, the share of the clean probe's images of other
    classes it flips there. The truth the verdict is scored against is the label with the largest share (the
    intended one can differ: a poisoning caption 'a photo of a apple.' taught the optimized-patch model 'clock')."""
    model, _ = resolve_model(entry["model"])
    probe = load_probe_set("demo-clean")
    images = probe.load_images(model.image_size)
    labels = [it.label for it in probe.items]
    attack = true_attack(entry, work)
    asr = measure(model, images, labels, probe.class_names, [(c, attack, c) for c in probe.class_names])["asr"]
    best = max(asr, key=asr.get)
    return {"intended": entry["target"], "measured": best, "asr": round(asr[best], 3)}


def target_rank(report: dict, truth: str | None) -> int | None:
    """1 when the verdict names the true target; else its place among every label any detector flagged."""
    if truth is None:
        return None
    if report["verdict"]["target"] == truth:
        return 1
    order = []
    for evidence in report["verdict"]["evidence"].values():
        order += [f["label"] for f in evidence["flagged"] if f["label"] not in order]
    return order.index(truth) + 1 if truth in order else None


def victim_scores(outcome, truth: str | None) -> dict:
    """Precision/recall of the verdict's victims against triggered images the model really sends to the target."""
    probe = outcome.probe
    if truth is None or not probe.has_trigger_flags:
        return {}
    predicted = outcome.results["trigger-inversion"].artefacts["predicted"].tolist()
    t = probe.class_names.index(truth)
    captured = {i for i, it in enumerate(probe.items) if it.triggered and predicted[i] == t}
    found = {v["index"] for v in outcome.report["verdict"]["victims"]}
    hit = len(captured & found)
    return {
        "victim_precision": round(hit / len(found), 3) if found else None,
        "victim_recall": round(hit / len(captured), 3) if captured else None,
        "n_captured": len(captured),
        "n_found": len(found),
    }


def repair_row(outcome, entry: dict, work: Path) -> dict:
    """oracle-finetune from the scan's findings; CA and planted ASR on the probe's clean images before/after."""
    attack = true_attack(entry, work)
    probe = outcome.probe
    clean = probe.clean_indices()
    images = probe.load_images(outcome.model.image_size, clean)
    labels = [probe.items[i].label for i in clean]
    triggers = [("planted", attack, entry["target"])]
    before = measure(outcome.model, images, labels, probe.class_names, triggers)
    data = compact_repair_data(outcome)
    if len(data.images) == 0:
        return {"repair": "nothing to repair (empty compact set)", "ca_before": before["ca"]}
    start = time.time()
    result = make_defense("oracle-finetune", seed=0).repair(outcome.model, data)
    after = measure(result.model, images, labels, probe.class_names, triggers)
    return {
        "ca_before": round(before["ca"], 3),
        "ca_after": round(after["ca"], 3),
        "asr_before": round(before["asr"]["planted"], 3),
        "asr_after": round(after["asr"]["planted"], 3),
        "repair_seconds": round(time.time() - start, 1),
        "compact": {k: data.kinds.count(k) for k in sorted(set(data.kinds))},
        "notes": result.notes,
    }


def held_out_models(results: dict) -> set[str]:
    """The zoo models built after the calibration (bench/detect_zoo.py's HELD_OUT): checked, never calibrated on."""
    return {name for name, entry in results.get("zoo", {}).items() if entry.get("held_out")}


def write_table(results: dict, out: Path) -> None:
    lines = [
        "# One verdict: clean and backdoored tiny CLIPs, clean-only and triggered probes",
        "",
        f"`python bench/detect.py` on {results['machine']['platform']}, {results['machine']['threads']} threads. "
        "Victims P/R against the triggered images the backdoor really captures; repair = oracle-finetune from the "
        "scan's findings (CA / planted-trigger ASR on the probe's clean images).",
        "",
        "| model | truth | mode | verdict | target | rank | family | flip | victims P / R | seconds | "
        "CA before → after | ASR before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, digits=3):
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    held_out = held_out_models(results)
    for key, r in results["rows"].items():
        rep = r.get("repair") or {}
        model = f"{r['model']} (held out)" if r["model"] in held_out else r["model"]
        lines.append(
            f"| {model} | {r['truth']} | {r['mode']} | {r['verdict']} | {f(r['target'])} | {f(r['rank'])} | "
            f"{f(r['family'])} | {f(r['flip'])} | {f(r.get('victim_precision'))} / {f(r.get('victim_recall'))} | "
            f"{r['seconds']} | {f(rep.get('ca_before'))} → {f(rep.get('ca_after'))} | "
            f"{f(rep.get('asr_before'))} → {f(rep.get('asr_after'))} |"
        )
    lines += ["", "Models:", ""]
    for name, entry in results["zoo"].items():
        planted = entry.get("planted")
        where = ""
        if planted:
            where = f"; its trigger sends {planted['asr']:.0%} of other classes' images to '{planted['measured']}'"
            if planted["measured"] != planted["intended"]:
                where += f" (intended '{planted['intended']}'; the truth above is the measured one)"
        held = "; held out (built after the calibration, no threshold set on it)" if entry.get("held_out") else ""
        lines.append(f"- {name}: {entry.get('made')}; attack {json.dumps(entry.get('attack'))}{where}{held}")
    atomic_write_text(out / "detect.md", "\n".join(lines) + "\n")


def refit_report(evidence: Path, out: Path | None) -> dict:
    """The cuts fit on every stored row but the held-out ones, each row judged leaving its model out, the rates
    and every cut's margins; printed, and written to ``out/refit.{md,json}`` when ``out`` is given."""
    start = time.time()
    rows = read_evidence(evidence)
    shown = evidence.resolve().relative_to(ROOT) if evidence.resolve().is_relative_to(ROOT) else evidence
    full = fit(rows)
    judged = leave_one_model_out(rows)
    rates = summary(judged)
    lines = [
        "# The verdict's cuts re-fit on stored evidence, validated leaving each model out",
        "",
        f"`python bench/detect.py --refit --evidence {shown}`"
        f": {len(rows)} rows ({len({r.model for r in rows})} models, {sum(r.held_out for r in rows)} rows held out "
        "of every fit). Each row's verdict comes from cuts fit without its model's rows.",
        "",
        "| model | mode | truth | detectors stored | recorded | left out: verdict | target | right | alignment cut | "
        "cluster cut |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in judged:
        model = f"{j.model} (held out)" if j.held_out else j.model
        lines.append(
            f"| {model} | {j.mode} | {j.truth} | {', '.join(j.detectors)} | {j.recorded or '-'} | {j.verdict} | "
            f"{j.target or '-'} | {'yes' if j.correct else '**no**'} | {j.cuts.alignment:.4f} | "
            f"{j.cuts.cluster_alignment:.4f} |"
        )
    a, h = rates["all"], rates["held_out"]
    lines += [
        "",
        f"Clean rows: {a['false_positives']} of {a['clean_rows']} called backdoored (false-positive rate "
        f"{a['false_positive_rate']}), {a['inconclusive_clean']} inconclusive; backdoored rows: {a['detected']} of "
        f"{a['backdoored_rows']} found with the right target (detection rate {a['detection_rate']}). Held-out rows "
        f"alone: {h['false_positives']} of {h['clean_rows']} clean rows called backdoored, {h['detected']} of "
        f"{h['backdoored_rows']} backdoored rows found.",
        "",
        "Cuts fit on every model but the held-out ones, and their margins (to the closest clean value above the cut, "
        "to the closest backdoored value at or under it; backdoored values above the cut are missed by that feature "
        "alone):",
        "",
        "| cut | value | to closest clean | to closest backdoored | backdoored above |",
        "|---|---|---|---|---|",
    ]
    for name, m in full.margins().items():
        lines.append(
            f"| {name} | {m['cut']} | {m['to_closest_clean']} | {m['to_closest_backdoored']} | "
            f"{m['backdoored_above']} of {m['backdoored']} |"
        )
    seconds = round(time.time() - start, 2)
    lines += ["", f"Fit and validation: {seconds} s."]
    text = "\n".join(lines) + "\n"
    result = {
        "cuts": full.cuts.to_dict(),
        "fit_on": full.models,
        "margins": full.margins(),
        "features": full.features,
        "rows": [{**j.__dict__, "cuts": j.cuts.to_dict(), "correct": j.correct} for j in judged],
        "summary": rates,
        "seconds": seconds,
    }
    print(text)
    if out is not None:
        atomic_write_text(out / "refit.md", text)
        atomic_write_text(out / "refit.json", json.dumps(result, indent=1) + "\n")
    return result


def calibration_file(result: dict, rows: list[ScanEvidence]) -> dict:
    """calibration.json's content from a refit: every threshold a scan reads (fitted cuts and the rules the refit
    writes beside them), each with the models it was fit on and the margins, and the domain of the fit's scans."""
    cuts, features = result["cuts"], result["features"]
    inversion, density = features["trigger-inversion.alignment"], features["embedding-density.cluster_alignment"]
    fitted = [r for r in rows if r.model in set(result["fit_on"])]
    unknown = sorted({r.key for r in fitted if not r.domain})
    if unknown:
        raise SystemExit(f"--calibrate: evidence without its scan's domain: {', '.join(unknown)} (rescan or rebuild)")
    domain = CalibratedDomain.of([ScanDomain(**r.domain) for r in fitted])
    return {
        "domain": domain.to_dict(),
        "trigger-inversion": {
            "anomaly_threshold": cuts["anomaly"],
            "alignment_threshold": cuts["alignment"],
            "borderline": cuts["borderline"],
            "calibrated_on": result["fit_on"],
            "clean_lowest_alignment_by_model": dict(sorted(inversion["clean"].items())),
            "backdoor_target_alignments": inversion["backdoored"],
        },
        "embedding-density": {
            "label_threshold": cuts["label_threshold"],
            "victim_z": cuts["victim_z"],
            "cluster_alignment": cuts["cluster_alignment"],
            "calibrated_on": result["fit_on"],
            "clean_lowest_alignment_by_model": dict(sorted(density["clean"].items())),
            "backdoor_target_alignments": density["backdoored"],
        },
        "verification": {
            "verified_flip": cuts["verified_flip"],
            "refuted_flip": cuts["refuted_flip"],
            "calibrated_on": result["fit_on"],
        },
    }


def install_calibration(source: Path, target: Path = CALIBRATION_FILE) -> dict:
    """Copy a reviewed calibration (``--calibrate``'s output) into the package, after checking that it holds every
    threshold the detectors read as a number; prints each threshold that changes. The explicit step between a
    refit and what every installed scan uses."""
    try:
        new = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--install-calibration: cannot read {source}: {exc}") from None
    for detector, keys in REQUIRED.items():
        values = new.get(detector) if isinstance(new, dict) else None
        if not isinstance(values, dict):
            raise SystemExit(f"--install-calibration: {source} has no thresholds for {detector}")
        for key in keys:
            if isinstance(values.get(key), bool) or not isinstance(values.get(key), (int, float)):
                raise SystemExit(f"--install-calibration: {source}: {detector}.{key} is not a number")
    old = json.loads(target.read_text(encoding="utf-8")) if target.is_file() else {}
    if not isinstance(new.get("domain"), dict):
        raise SystemExit(f"--install-calibration: {source} does not record the domain it was fit on")
    for detector, keys in REQUIRED.items():
        for key in keys:
            before, after = old.get(detector, {}).get(key), new[detector][key]
            if before != after:
                print(f"{detector}.{key}: {before} -> {after}", file=sys.stderr)
    atomic_write_text(target, json.dumps(new, indent=2) + "\n")
    print(f"installed {source} as {target}", file=sys.stderr)
    return new


PROBE_NAMES = {
    "clean": "demo-clean (the lab's 300 clean held-out images)",
    "triggered": "demo-clean with the model's own trigger on 15 % of the non-target images (bench/detect.py)",
}


def row_evidence(name: str, mode: str, truth: str | None, held_out: bool, outcome) -> ScanEvidence:
    """A scanned row's evidence, as the store keeps it."""
    verdict = outcome.report["verdict"]
    return ScanEvidence(
        model=name,
        mode=mode,
        truth=truth or "clean",
        classes=list(outcome.probe.class_names),
        detectors=evidence_of(outcome.results, list(outcome.probe.class_names)),
        held_out=held_out,
        recorded={"verdict": verdict["verdict"], "target": verdict["target"], "family": verdict["family"]},
        source=f"python bench/detect.py (torch {torch.__version__}, {torch.get_num_threads()} threads)",
        domain=ScanDomain.of(outcome.model, outcome.probe).to_dict() | {"probe": PROBE_NAMES[mode]},
    )


def density_table(zoo: dict, zoo_dir: Path, names: list[str], modes: list[str], out: Path) -> None:
    """The embedding-density detector alone on every model x probe mode: each label's dense cluster, where its
    images come from and whether it is hijacked (bench/results/density_clusters.md); seconds, not minutes."""
    from forensics.core.models import frozen
    from forensics.detect.embedding_density import EmbeddingDensity

    lines = [
        "# Embedding density: each label's dense cluster, every zoo model and probe mode",
        "",
        "`python bench/detect.py --zoo Z --density`. Per label with 3+ dense images: how many, from how many "
        "other classes (by the probe's labels), the largest share one other class gives, the centroid's "
        "alignment with the label's own images; **hijacked** = 3+ other classes, none over half, alignment <= "
        "the cut.",
        "",
        "| model | truth | mode | hijacked | clusters (label: dense / other classes / largest share / alignment) |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for name in names:
        entry = zoo[name]
        model, _ = resolve_model(entry["model"])
        for mode in modes:
            probe = probe_for(entry, mode, zoo_dir, name)
            with frozen(model):
                findings = EmbeddingDensity().run(model, probe)
            clusters = findings.label_evidence["clusters"]
            rows.append({"model": name, "truth": entry.get("target"), "mode": mode, "clusters": clusters})
            hijacked = ", ".join(c["label"] for c in clusters if c["hijacked"]) or "-"
            words = "; ".join(
                f"{c['label']}: {c['dense']} / {c['source_classes']} / {c['largest_source_share']:.2f} / "
                f"{c['alignment']}"
                for c in clusters
            )
            lines.append(f"| {name} | {entry.get('target') or 'clean'} | {mode} | {hijacked} | {words or '-'} |")
            print(lines[-1], file=sys.stderr)
    atomic_write_text(out / "density_clusters.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "density_clusters.json", json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default=str(DEFAULT_ZOO), help="bench/detect_zoo.py's --work folder")
    parser.add_argument("--models", help="comma-separated zoo names (default: every model built)")
    parser.add_argument("--modes", default="clean,triggered")
    parser.add_argument("--no-repair", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--evidence", default=str(ROOT / "bench" / "results" / "evidence"), help="evidence folder")
    parser.add_argument("--merge", nargs="*", default=[], help="detect.json files of other runs whose rows to keep")
    parser.add_argument("--refit", action="store_true", help="fit the cuts on the stored evidence (no zoo needed)")
    parser.add_argument("--calibrate", action="store_true", help="--refit, its thresholds written to --calibration-out")
    parser.add_argument(
        "--calibration-out",
        default=str(ROOT / "bench" / "results" / "calibration.json"),
        help="where --calibrate writes the thresholds (never into the package)",
    )
    parser.add_argument(
        "--install-calibration",
        metavar="FILE",
        help="copy a reviewed calibration (from --calibrate) into the package, forensics/detect/calibration.json",
    )
    parser.add_argument("--density", action="store_true", help="only the embedding-density clusters, every row")
    args = parser.parse_args()
    zoo_dir, out = Path(args.zoo), Path(args.out)
    evidence = Path(args.evidence)
    if args.install_calibration:
        install_calibration(Path(args.install_calibration))
        return
    if args.refit or args.calibrate:
        result = refit_report(evidence, out)
        if args.calibrate:
            text = json.dumps(calibration_file(result, read_evidence(Path(args.evidence))), indent=2) + "\n"
            atomic_write_text(Path(args.calibration_out), text)
            print(text)
            print(
                f"written to {args.calibration_out}; after review: python bench/detect.py --install-calibration "
                f"{args.calibration_out}",
                file=sys.stderr,
            )
        return
    zoo_file = zoo_dir / "zoo.json"
    if not zoo_file.is_file():
        sys.exit(f"no zoo at {zoo_dir}: build it with python bench/detect_zoo.py --work {zoo_dir}")
    zoo = json.loads(zoo_file.read_text())
    names = [n.strip() for n in args.models.split(",")] if args.models else list(zoo)
    if args.density:
        density_table(zoo, zoo_dir, names, args.modes.split(","), out)
        return
    path = out / "detect.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    results["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    results["zoo"] = {**results.get("zoo", {}), **{n: zoo[n] for n in names}}
    for other in args.merge:  # runs made side by side (one thread each) into other folders
        merged = json.loads(Path(other).read_text())
        results["rows"].update(merged["rows"])
        results["zoo"].update(merged["zoo"])
    for name, entry in results["zoo"].items():  # this run's models and merged ones: where their triggers really go
        if entry.get("kind") == "backdoored" and "planted" not in entry:
            entry["planted"] = planted_target(entry, zoo_dir)
    for name in [] if args.merge and not args.models else names:
        entry = zoo[name]
        truth = None
        if entry["kind"] == "backdoored":  # planted_target filled above for every backdoored zoo entry
            truth = results["zoo"][name]["planted"]["measured"]
            entry = {**entry, "target": truth, "intended": entry["target"]}
        for mode in args.modes.split(","):
            key = f"{name}/{mode}"
            if key in results["rows"]:
                continue
            probe = probe_for(entry, mode, zoo_dir, name)
            start = time.time()
            outcome = scan(entry["model"], probe, progress=None)
            seconds = round(time.time() - start, 1)
            verdict = outcome.report["verdict"]
            write_evidence(row_evidence(name, mode, truth, bool(entry.get("held_out")), outcome), evidence)
            row = {
                "model": name,
                "truth": truth or "clean",
                "mode": mode,
                "verdict": verdict["verdict"],
                "target": verdict["target"],
                "rank": target_rank(outcome.report, truth),
                "family": verdict["family"],
                "flip": (verdict["trigger"] or {}).get("verified_asr"),
                "seconds": seconds,
                "detector_seconds": {k: v.metrics.get("seconds") for k, v in outcome.results.items()},
                "reasons": verdict["reasons"],
                **victim_scores(outcome, truth),
            }
            if truth and not args.no_repair and verdict["verdict"] == "backdoored":
                row["repair"] = repair_row(outcome, entry, zoo_dir)
            results["rows"][key] = row
            print(f"{key}: {row['verdict']} {row['target']} ({seconds} s)", file=sys.stderr)
            atomic_write_text(path, json.dumps(results, indent=2, default=str))
            write_table(results, out)
    write_table(results, out)
    atomic_write_text(path, json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    try:
        main()
    except ForensicsError as exc:
        sys.exit(f"error: {exc}")
