"""Run a scan end to end: findings, trigger patterns, the compact fine-tuning set, report.json and report.html.

:func:`scan` runs the detector and keeps everything in memory (:class:`ScanOutcome`); :func:`write_scan` writes
the files once at the end; :func:`run_scan` is both, for the CLI and the UI. Other pipelines (compare) take the
outcome directly, so nothing is written only to be read back.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forensics.core.data import ProbeSet, load_probe_set
from forensics.core.distributed import barrier, is_main, rank, world_size
from forensics.core.errors import ForensicsError
from forensics.core.files import check_output_folder, model_files, refuse_overwriting_inputs, staged_output
from forensics.core.images import inpaint_box, to_pil
from forensics.core.models import ModelRef, SuspectModel, check_finite_outputs, resolve_model
from forensics.core.progress import Progress, sub_progress
from forensics.core.settings import build_settings
from forensics.core.templates import fill
from forensics.core.zeroshot import class_text_embeddings, predict_labels
from forensics.defenses import RepairData, stamped_sources
from forensics.detect import (
    DETECTORS,
    Findings,
    ScanSettings,
    all_detectors,
    build_detector,
    detector_settings,
    profile_name,
)
from forensics.detect.calibration import ScanDomain
from forensics.detect.trigger_inversion import InvertedPattern
from forensics.detect.verdict import Verdict, merge
from forensics.detect.victim_trigger import VictimTrigger, adopt, for_verdict
from forensics.oracles import Oracle, build_oracle, default_oracle
from forensics.pipelines.pictures import scan_pictures
from forensics.pipelines.report import write_json, write_scan_html


@dataclass
class ScanOutcome:
    """A finished scan in memory: the model and probe it ran on, the findings (with their artefacts), the report."""

    model: SuspectModel
    ref: ModelRef | None
    probe: ProbeSet
    oracle: Oracle
    findings: Findings  # the oracle-guided scan's (empty when it did not run)
    report: dict[str, Any]
    results: dict[str, Findings] | None = None  # every detector's findings, by name
    verdict: Verdict | None = None
    victim_trigger: VictimTrigger | None = None  # the trigger the box-less victims share, when verified

    @property
    def patterns(self) -> list[torch.Tensor]:
        """Reconstructed trigger patterns (3 x h x w, 8-bit values as saved), in the order of ``report["triggers"]``."""
        saved = self.findings.artefacts["patterns"]
        return [quantized(saved[t["pattern"]]["pattern"]) for t in self.report["triggers"]]


def quantized(image: torch.Tensor) -> torch.Tensor:
    """The image as its 8-bit PNG holds it (so in-memory and read-back repairs see the same pixels)."""
    return image.detach().float().cpu().clamp(0, 1).mul(255).round().div(255)


def compact_row(image: str, label: str, kind: str, source_index: int, tensor: torch.Tensor, box: str = "") -> dict:
    """One row of the compact set: its file name, class (and the caption made from it), kind, probe row, box."""
    return {
        "image": f"images/{image}.png",
        "label": label,
        "kind": kind,
        "source_index": source_index,
        "box": box,
        "caption": fill("a photo of a {}.", label),
        "tensor": tensor,
    }


def compact_rows(
    findings: Findings, class_names: list[str], anchors_per_victim: int = 2, seed: int = 0, max_anchors_floor: int = 128
) -> list[dict[str, Any]]:
    """Victims with the trigger neutralised and as they are, labelled with their grounded class, plus clean anchors.

    Anchors: every grounded, uncaptured image up to ``max_anchors_floor`` (or twice the victims when more):
    with only a few anchors the repair overfits them and clean accuracy falls (measured: 16 anchors from a
    40-image scan cost 0.14 CA; see bench/scan_repair.py). Each row holds its image tensor under ``tensor``.
    """
    if "records" not in findings.artefacts:  # the oracle-guided scan did not run
        return []
    images, records = findings.artefacts["images"], findings.artefacts["records"]
    rows = []
    victim_ids = {v.index for v in findings.victims}
    for v in findings.victims:
        for kind, image in (("victim-neutralised", inpaint_box(images[v.index], v.box)), ("victim", images[v.index])):
            box = " ".join(map(str, v.box))
            rows.append(compact_row(f"{kind}_{v.index:05d}", v.grounded_label, kind, v.index, image, box))
    grounded = [i for i, r in enumerate(records) if r["grounded"] and not r["captured"] and i not in victim_ids]
    rng = np.random.default_rng(seed)
    want = min(len(grounded), max(max_anchors_floor, anchors_per_victim * len(findings.victims)))
    for i in sorted(rng.choice(grounded, size=want, replace=False).tolist()) if want else []:
        rows.append(compact_row(f"anchor_{i:05d}", records[i]["predicted"], "anchor", i, images[i]))
    return rows


INVERTED_TRIGGER_IMAGES = 96  # clean images stamped with an inverted trigger, each in 1 + SHIFTS places
INVERTED_TRIGGER_SHIFTS = 2
ANCHORS_PER_STAMPED = 1 / 6  # anchors kept beside them, at most this share of the stamped rows
BOXLESS_VICTIM_COPIES = 3  # each victim without a box (whole-image trigger) and with a probe label, this often


def inverted_trigger_rows(
    outcome: ScanOutcome, limit: int = INVERTED_TRIGGER_IMAGES, shifts: int = INVERTED_TRIGGER_SHIFTS
) -> list[dict[str, Any]]:
    """When there is a trigger to stamp (:func:`stamped_triggers`: the one the box-less victims share, else the
    inversion's candidate for the verdict's target): up to ``limit`` clean probe images, each carrying it where it
    was found and moved by ``shifts`` seeded random shifts (wrapping round), labelled with their own class (the
    probe's label, else the model's prediction), to unlearn it from; and each such image as it is (kind
    ``inverted-source``), the clean embedding oracle-finetune pulls its stamped copies to.

    With both triggers, the ``limit`` images are shared out between them and each image carries
    both. The victims' trigger: the top-left BadNet of bench/detect.py (triggered probe, 45 box-less victims,
    no inverted trigger for its target), one scan, ASR 1.000 -> 0.191 (CA 0.455) from the victims and 128
    anchors, 0.000 (CA 0.475) with the victims' trigger stamped and 48 anchors. The SIG model (triggered, one
    scan, ASR 0.973 before): the inversion's trigger alone 0.071, the victims' alone 0.067, both on 48 images
    each 0.040 (CA 0.447, the same rows and seconds), both on 96 each 0.027 (CA 0.447, 2.7x the seconds) (a
    one-off script over one scan each).

    The inverted trigger: with no victim to neutralise (a clean-only probe, a
    whole-image trigger) it is all there is to unlearn from; beside boxed victims it unlearns the trigger on
    images of every class, not only on the few victims the probe held (triggered probes, bench/detect.py: an
    older optimized-patch model repaired from its 26 boxed victims alone kept ASR 0.493; with the inverted rows
    beside the boxed victims the demo went 0.973 -> 0.000, CA 0.482 -> 0.471, against 0.022 / 0.463 without).
    The shifted copies and the few anchors are our choice (EftCLIP repairs from victims): an inverted trigger is
    a scattered part of the real one, and unlearning it at one place beside many anchors left most of the backdoor.
    Demo, clean-only probe, oracle-finetune, CA 0.483 / ASR 0.944 before: 64 images at the inverted place + 128
    anchors -> 0.490 / 0.426; 64 x 2 places + 64 anchors -> 0.487 / 0.437 and 0.483 / 0.374 (two seeds of the choice);
    64 x 2 + 32 anchors -> 0.487 / 0.241; 96 x 3 + 48 anchors -> 0.483 / 0.185 (a one-off script over one scan);
    the default in bench/detect.py: demo 0.503 / 0.319, SIG 0.443 / 0.196 (from 0.393 / 0.978). With the clean
    sources and oracle-finetune's invariance term (its docstring): demo 0.483 / 0.026, SIG 0.420 / 0.033."""
    verdict, stamps = outcome.verdict, stamped_triggers(outcome)
    if not stamps:
        return []
    names = outcome.probe.class_names
    target = names.index(verdict.target)
    images = probe_images(outcome)
    predicted = probe_artefact(outcome, "predicted")
    if predicted is None:
        with torch.no_grad():
            predicted = predict_labels(outcome.model, images, class_text_embeddings(outcome.model, names, "short"))
    predicted = predicted.tolist()
    suspicious = {v["index"] for v in verdict.victims}
    labels = [it.label if it.label is not None else predicted[i] for i, it in enumerate(outcome.probe.items)]
    pool = [i for i, y in enumerate(labels) if y != target and i not in suspicious and predicted[i] == y]
    pool = pool or [i for i, y in enumerate(labels) if y != target and i not in suspicious]
    rng = np.random.default_rng(outcome.report["seed"])
    share = limit // len(stamps)  # the images are shared out, not multiplied: the same repair cost
    chosen = sorted(rng.choice(pool, size=min(share, len(pool)), replace=False).tolist()) if pool else []
    size = images.shape[-1]
    rows = []
    for i in chosen:
        label = names[labels[i]]
        rows.append(compact_row(f"inverted-source_{i:05d}", label, "inverted-source", i, images[i].cpu()))
        for j, pattern in enumerate(stamps):
            moved = [pattern.shifted(*(int(v) for v in rng.integers(0, size, size=2))) for _ in range(shifts)]
            for k, stamp in enumerate([pattern, *moved]):
                name = f"inverted-trigger_{i:05d}" + (f"_{j}" if j else "") + (f"_shifted{k}" if k else "")
                rows.append(compact_row(name, label, "inverted-trigger", i, stamp.apply(images[i : i + 1])[0].cpu()))
    return rows


def probe_artefact(outcome: ScanOutcome, key: str) -> torch.Tensor | None:
    """The probe's ``images`` (at the model's size) or ``predicted`` labels as a detector kept them (the trigger
    inversion's, else the embedding density's); None when neither ran."""
    for name in ("trigger-inversion", "embedding-density"):
        found = (outcome.results or {}).get(name)
        if found is not None and found.artefacts.get(key) is not None:
            return found.artefacts[key]
    return None


def probe_images(outcome: ScanOutcome) -> torch.Tensor:
    """The probe's images at the model's size: those a detector kept, else decoded again."""
    kept = probe_artefact(outcome, "images")
    return kept if kept is not None else outcome.probe.load_images(outcome.model.image_size)


def stamped_triggers(outcome: ScanOutcome) -> list[InvertedPattern]:
    """The triggers the compact set may stamp on clean images, best first: the one the verdict's victims share
    (read off real triggered inputs, verified), then the inversion's candidate for the verdict's target (not any
    other of its triggers: those are no evidence of this backdoor)."""
    verdict, out = outcome.verdict, []
    if verdict is None or verdict.target is None:
        return out
    if outcome.victim_trigger is not None:
        out.append(outcome.victim_trigger.pattern)
    inversion = (outcome.results or {}).get("trigger-inversion")
    if inversion is not None and "inverted_patterns" in inversion.artefacts:
        named = [t for t in inversion.inverted if t.label == verdict.target and t.stats.get("candidate")]
        if named:
            out.append(inversion.artefacts["inverted_patterns"][max(named, key=lambda t: t.verified_asr).stats["key"]])
    return out


def boxless_victim_rows(outcome: ScanOutcome) -> list[dict[str, Any]]:
    """The verdict's victims that carry no box (found by their embeddings: a whole-image trigger cannot be cut
    out) but whose probe row names their true class: each as it is, ``BOXLESS_VICTIM_COPIES`` times, labelled
    with that class, so the repair also unlearns the real trigger beside the inverted one. Victims without a
    probe label are left out (only the probe knows what they really show). Our choice (EftCLIP neutralises boxed
    victims): SIG, triggered probe, one scan, CA / ASR after 0.392 / 0.316 without them, 0.404 / 0.076 with
    47 victims three times each (a one-off script)."""
    verdict = outcome.verdict
    if verdict is None or verdict.target is None:
        return []
    victims = [v["index"] for v in verdict.victims if not v.get("box")]  # boxed ones are neutralised already
    if not victims:
        return []
    names, items = outcome.probe.class_names, outcome.probe.items
    images = probe_images(outcome)
    rows = []
    for i in victims:
        label = items[i].label
        if label is None:
            continue
        rows += [
            compact_row(f"victim_{i:05d}" + (f"_copy{k}" if k else ""), names[label], "victim", i, images[i].cpu())
            for k in range(BOXLESS_VICTIM_COPIES)
        ]
    return rows


def all_compact_rows(outcome: ScanOutcome) -> list[dict[str, Any]]:
    """The compact set: the oracle scan's victims and anchors, plus clean images carrying an inverted trigger.

    With an inverted trigger the anchors are at most ``ANCHORS_PER_STAMPED`` of its rows (a seeded choice): more
    anchors held the backdoor in (measured in :func:`inverted_trigger_rows`)."""
    rows = compact_rows(outcome.findings, outcome.probe.class_names, seed=outcome.report["seed"])
    stamped = inverted_trigger_rows(outcome)
    anchors = [r for r in rows if r["kind"] == "anchor"]
    most = int(sum(r["kind"] == "inverted-trigger" for r in stamped) * ANCHORS_PER_STAMPED)
    if stamped and len(anchors) > most:
        rng = np.random.default_rng(outcome.report["seed"])
        keep = {id(anchors[k]) for k in rng.choice(len(anchors), size=most, replace=False).tolist()}
        rows = [r for r in rows if r["kind"] != "anchor" or id(r) in keep]
    return rows + stamped + boxless_victim_rows(outcome)


def compact_repair_data(outcome: ScanOutcome) -> RepairData:
    """The scan's compact set and trigger patterns as RepairData, straight from memory (what a repair with
    ``--findings`` reads back from disk, pixel for pixel)."""
    class_names = outcome.probe.class_names
    rows = all_compact_rows(outcome)
    kinds = [r["kind"] for r in rows]
    size = outcome.model.image_size
    images = torch.stack([quantized(r["tensor"]) for r in rows]) if rows else torch.empty(0, 3, size, size)
    return RepairData(
        images=images,
        labels=[class_names.index(r["label"]) for r in rows],
        kinds=kinds,
        class_names=list(class_names),
        patterns=outcome.patterns,
        flagged=flagged_for_repair(outcome.report),
        sources=stamped_sources(kinds, [r["source_index"] for r in rows]),
    )


def flagged_for_repair(report: dict) -> list[str]:
    """The labels a repair is told about: the verdict's target first, then the oracle scan's flags."""
    target = (report.get("verdict") or {}).get("target")
    return list(dict.fromkeys(([target] if target else []) + [f["label"] for f in report["flagged_labels"]]))


COMPACT_KINDS = ("victim-neutralised", "victim", "anchor", "inverted-trigger", "inverted-source")


def write_compact_set(out: Path, rows: list[dict[str, Any]], class_names: list[str]) -> dict:
    """compact/compact.csv, its images and classes.json: the set ``repair --findings`` fine-tunes on."""
    folder = out / "compact"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        to_pil(r["tensor"]).save(folder / r["image"])
    with open(folder / "compact.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "kind", "source_index", "box"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "tensor"} for r in rows)
    (folder / "classes.json").write_text(json.dumps({"classes": class_names}))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in COMPACT_KINDS}
    return {"csv": "compact/compact.csv", "samples": len(rows), **kinds}


def pick_oracle(oracle: str | Oracle | None = None, sam_checkpoint: str | None = None) -> Oracle:
    """The oracle to scan with: one given by name (or built), else SAM with a checkpoint, else the fallback."""
    if isinstance(oracle, Oracle):
        chosen = oracle
    elif oracle:
        chosen = build_oracle(oracle, **({"checkpoint": sam_checkpoint} if sam_checkpoint and oracle == "sam" else {}))
    else:
        chosen = default_oracle(sam_checkpoint)
    if chosen.name == "ground-truth":
        raise ForensicsError("the ground-truth oracle needs known masks; use it through the library for teaching")
    return chosen


UNCALIBRATED_PROFILE = (
    "the {profile} detector profile ran (fewer steps and images than the calibrated defaults): this verdict checks "
    "the workbench, it does not judge the model"
)


def scan(
    model: str | ModelRef | SuspectModel,
    probe: str | ProbeSet | None = None,
    oracle: str | Oracle | None = None,
    sam_checkpoint: str | None = None,
    settings: ScanSettings | None = None,
    max_images: int | None = None,
    progress: Progress | None = None,
    detectors: str | list[str] | None = None,
    distributed: bool = False,
    detector_options: Mapping[str, Any] | None = None,
    profile: str | None = None,
    expected: Mapping[str, float] | None = None,
) -> ScanOutcome:
    """Scan ``model`` on ``probe`` in memory (no file is written) with ``detectors`` (all by default) and merge
    their evidence into one verdict; ``max_images`` scans a seeded random subset.

    Settings: ``settings`` (the oracle-guided scan's, taken as given) gives the seed and templates every detector
    uses; ``profile`` (``default`` or ``quick``, see :data:`forensics.detect.PROFILES`) sets the others' (and the
    oracle-guided scan's when ``settings`` is not given); ``detector_options`` maps a detector's name to its
    settings (an object, or ``setting -> value`` applied on top), e.g. ``{"trigger-inversion": {"steps": 20}}``.

    ``distributed`` (every process of a launcher calls this): the shardable detectors (the oracle-guided scan's
    per-image pass, the trigger inversion's labels) are shared out and gathered, first; the others run on rank 0
    alone, whose outcome is the whole one.

    ``expected`` (detector name -> expected seconds, :func:`forensics.pipelines.estimate.estimate_scan`'s) sizes
    each detector's part of the progress bar, so the bar tracks time; without it the parts are equal. Each message
    names the detector running, its place and its share of the scan."""
    start = time.time()
    names = detector_names(detectors)
    chosen, settings = scan_settings(names, settings, detector_options, profile)
    ref = None if isinstance(model, SuspectModel) else (model if isinstance(model, ModelRef) else ModelRef(str(model)))
    if isinstance(probe, ProbeSet):
        probe_set, probe_source = probe, probe.meta.get("source", probe.name)
    else:
        probe = probe or (ref.default_probe() if ref else None)
        if probe is None:
            raise ForensicsError("a probe set is required for models other than demo and demo-clean")
        probe_set, probe_source = load_probe_set(probe), str(probe)
    probe_set = probe_set.subset(max_images, settings.seed)
    oracle_obj = pick_oracle(oracle, sam_checkpoint)
    sharded = distributed and world_size() > 1
    shares = {name: sharded and DETECTORS.get(name).shardable for name in names}
    # every detector built (its settings checked) before any work
    built = {name: build_detector(name, oracle_obj, chosen[name], shard=shares[name]) for name in names}
    loaded, _ = resolve_model(ref or model)
    first = list(range(min(8, len(probe_set))))
    check_finite_outputs(loaded, probe_set.load_images(loaded.image_size, first))  # else 'nothing flagged'
    results: dict[str, Findings] = {}
    shared = probe_set.sharing_loaded_images()  # the detectors decode the probe images once, not each
    order = sorted(range(len(names)), key=lambda n: not shares[names[n]])  # (one process: as asked)
    spans = progress_spans([names[n] for n in order], expected)
    for k, n in enumerate(order):  # several processes: the shared-out detectors first, then rank 0 alone the others
        name = names[n]
        if sharded and not shares[name] and not is_main():
            continue
        lo, hi, share = spans[name]
        prefix = f"{name} ({k + 1} of {len(order)}, {share:.0%} of the scan): "
        results[name] = built[name].run(loaded, shared, sub_progress(progress, lo, hi, prefix))
    results = {name: results[name] for name in names if name in results}  # in the order asked for
    findings = results.get("oracle-guided") or Findings([], [], [], [], artefacts={"images": None, "patterns": {}})
    verdict = merge(results, probe_set, ScanDomain.of(loaded, probe_set))
    victim_trigger = None
    if is_main():
        if progress and verdict.victims:
            progress(0.9, "reconstructing the trigger the victims share")
        victim_trigger = for_verdict(loaded, shared, verdict, settings.seed)
        if victim_trigger:
            adopt(verdict, victim_trigger)
    profile = profile_name(profile)
    if profile != "default":
        verdict.reasons.append(UNCALIBRATED_PROFILE.format(profile=profile))
    report = {
        "tool": "clip-backdoor-forensics",
        "detector": "oracle-guided" if "oracle-guided" in results else names[0],
        "detectors": {
            name: {k: v for k, v in f.to_dict().items() if k != "images"}
            for name, f in results.items()
            if f is not findings
        },
        "model": {"spec": ref.spec if ref else loaded.facts.source, **loaded.facts.to_dict()},
        "probe": {
            "name": probe_set.name,
            "source": probe_source,
            "images": len(probe_set),
            "classes": probe_set.class_names,
            "subset_of": probe_set.meta.get("subset_of"),
        },
        "oracle": {"name": oracle_obj.name, **oracle_obj.settings()},
        "detector_profile": profile,
        "detector_settings": {name: asdict(chosen[name]) for name in names},
        **findings.to_dict(),
        "verdict": verdict.to_dict(),
        "seed": settings.seed,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(loaded.device),
        },
    }
    report["metrics"]["seconds_total"] = round(time.time() - start, 2)
    return ScanOutcome(
        model=loaded,
        ref=ref,
        probe=probe_set,
        oracle=oracle_obj,
        findings=findings,
        report=report,
        results=results,
        verdict=verdict,
        victim_trigger=victim_trigger,
    )


DETECTORS_SPAN = 0.9  # the detectors' part of a scan's progress bar; the victims' trigger and the report follow


def progress_spans(
    names: list[str], expected: Mapping[str, float] | None = None
) -> dict[str, tuple[float, float, float]]:
    """Each detector's (start, end) on the progress bar, in run order, and its share of the whole scan's expected
    time: sized by ``expected`` seconds (a detector it does not name counts as their mean; its other keys, such as
    the report's, count in the shares), else equal parts of :data:`DETECTORS_SPAN`."""
    given = {n: float(expected[n]) for n in names if expected and expected.get(n) is not None}
    mean = sum(given.values()) / len(given) if given else 1.0
    weights = {n: max(given.get(n, mean), 1e-9) for n in names}
    total = sum(weights.values()) or 1.0
    whole = total + sum(float(v) for k, v in (expected or {}).items() if k not in weights)
    spans, at = {}, 0.0
    for n in names:
        width = DETECTORS_SPAN * weights[n] / total
        spans[n] = (at, at + width, weights[n] / whole)
        at += width
    return spans


def scan_settings(
    names: list[str],
    settings: ScanSettings | None = None,
    detector_options: Mapping[str, Any] | None = None,
    profile: str | None = None,
) -> tuple[dict[str, Any], ScanSettings]:
    """Each of ``names``' settings object for a scan (as :func:`scan` describes), and the oracle scan's settings
    (whose seed and templates every detector shares), whether or not it runs."""
    base = settings or detector_settings(["oracle-guided"], profile=profile)["oracle-guided"]
    options = {DETECTORS.resolve(k): v for k, v in (detector_options or {}).items()}
    if "oracle-guided" in names:  # the oracle scan's base, with its own options on top
        own = options.get("oracle-guided") or {}
        if isinstance(own, ScanSettings):
            base = own
        elif isinstance(own, Mapping):
            base = build_settings(ScanSettings, own, "detector setting oracle-guided", base=base)
        else:
            raise ForensicsError("detector settings for 'oracle-guided' must be a mapping of setting -> value")
        options["oracle-guided"] = base
    return detector_settings(names, options, profile, {"seed": base.seed, "templates": base.templates}), base


def detector_names(detectors: str | list[str] | None) -> list[str]:
    """Detector names from ``"all"``/``None`` (every registered one), a comma-separated string or a list (each
    checked, in the order given)."""
    if detectors is None or (isinstance(detectors, str) and detectors.strip().lower() == "all"):
        return all_detectors()
    wanted = [d.strip() for d in detectors.split(",")] if isinstance(detectors, str) else list(detectors)
    wanted = [DETECTORS.resolve(d) for d in wanted if d]
    if not wanted:
        raise ForensicsError(f"no detector named; choose from {', '.join(DETECTORS.names())} or 'all'")
    return list(dict.fromkeys(wanted))


def write_scan(outcome: ScanOutcome, out: str | Path, progress: Progress | None = None) -> dict:
    """Write report.json, report.html, the trigger patterns and the compact set under ``out``; the CLI's summary."""
    out = Path(out)
    report = outcome.report
    rows = all_compact_rows(outcome)
    patterns = list(outcome.findings.artefacts["patterns"])
    inverted = inverted_pictures(outcome)
    # the triggers at work, the victims boxed, the detectors' scores
    pictures = scan_pictures(outcome, probe_images(outcome), probe_artefact(outcome, "predicted"))
    outputs = [out / "report.json", out / "report.html", out / "compact" / "compact.csv"]
    outputs += [out / "compact" / "classes.json", *(out / "compact" / r["image"] for r in rows)]
    outputs += [out / n for n in patterns] + [out / n.replace(".png", "_preview.png") for n in patterns]
    outputs += [out / n for n in inverted] + [out / n for n in pictures.files]
    refuse_overwriting_inputs(outputs, model_files(outcome.model.facts.source) + outcome.probe.files())
    start = time.time()
    with staged_output(out) as stage:  # an interrupted write leaves the previous result, or nothing
        for name, info in outcome.findings.artefacts["patterns"].items():
            pattern = to_pil(info["pattern"])
            pattern.save(stage / name)
            pattern.resize((96, 96), resample=0).save(stage / name.replace(".png", "_preview.png"))
        for name, picture in inverted.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            to_pil(picture).save(stage / name)
        for name, image in pictures.files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(stage / name)
        report["pictures"] = pictures.index
        report["compact_set"] = write_compact_set(stage, rows, outcome.probe.class_names)
        report["metrics"]["seconds_total"] = round(report["metrics"]["seconds_total"] + time.time() - start, 2)
        write_json(stage / "report.json", report)
        if progress:
            progress(0.92, "drawing the report")
        write_scan_html(stage, report, outcome.findings, outcome.model, outcome.probe)
    if progress:
        progress(1.0, "done")
    return {
        "report": str(out / "report.json"),
        "html": str(out / "report.html"),
        "flagged_labels": report["flagged_labels"],
        "triggers": report["triggers"],
        "n_victims": len(report["victims"]),
        "metrics": report["metrics"],
        "verdict": {k: report["verdict"][k] for k in ("verdict", "target", "family", "trigger", "reasons")}
        | {"n_victims": len(report["verdict"]["victims"])},
    }


def inverted_pictures(outcome: ScanOutcome) -> dict[str, torch.Tensor]:
    """File name -> picture of each inverted trigger the findings name and of the victims' shared trigger
    (written beside report.json)."""
    inversion = (outcome.results or {}).get("trigger-inversion")
    pictures = {}
    if inversion is not None and "inverted_patterns" in inversion.artefacts:  # none when it was skipped
        patterns = inversion.artefacts["inverted_patterns"]
        pictures = {t.pattern: patterns[t.stats["key"]].picture().cpu() for t in inversion.inverted if t.pattern}
    if outcome.victim_trigger is not None:
        pictures[outcome.victim_trigger.trigger.pattern] = outcome.victim_trigger.pattern.picture().cpu()
    return pictures


def run_scan(
    model: str | ModelRef | SuspectModel,
    out: str | Path,
    probe: str | ProbeSet | None = None,
    oracle: str | Oracle | None = None,
    sam_checkpoint: str | None = None,
    settings: ScanSettings | None = None,
    max_images: int | None = None,
    progress: Progress | None = None,
    detectors: str | list[str] | None = None,
    detector_options: Mapping[str, Any] | None = None,
    profile: str | None = None,
) -> dict:
    """Scan ``model`` on ``probe`` and write ``out/report.json``, ``out/report.html``, trigger patterns and the
    compact set; returns the summary (paths, flagged labels, triggers, victim count, metrics).

    Under a launcher every process calls this: the scan is shared out as :func:`scan` says and rank 0 writes."""
    check_output_folder(out)  # before the scan, not after it
    outcome = scan(
        model, probe, oracle, sam_checkpoint, settings, max_images, progress, detectors, True, detector_options, profile
    )
    if not is_main():
        barrier()  # rank 0 writes; this process waits until it has
        return {"rank": rank(), "written_by": 0}
    summary = write_scan(outcome, out, progress)
    barrier()
    return summary
