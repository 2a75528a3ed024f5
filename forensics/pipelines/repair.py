"""Run a repair end to end: build the repair data, fine-tune, measure CA/ASR before and after, save safely.

Two paths. Methods that need findings (``needs_findings``, e.g. oracle-finetune) repair with a scan's
compact set and are measured on the probe set's clean images, as before. Every other method gets a
clean budget: a seeded split of the probe set's clean labelled images into ``budget`` repair images
(with their captions when the probe has them) and the rest, held out, on which CA and ASR are
measured, so no repair image is ever scored.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forensics.attacks import build_attack
from forensics.core.data import ProbeSet, load_probe_set
from forensics.core.distributed import barrier, is_main
from forensics.core.errors import ForensicsError
from forensics.core.files import (
    check_output_folder,
    model_files,
    refuse_overwriting_inputs,
    resolves_inside,
    staged_output,
)
from forensics.core.images import load_image, load_pattern
from forensics.core.models import (
    ModelRef,
    SuspectModel,
    as_ref,
    check_finite_outputs,
    frozen,
    load_checkpoint,
    save_model,
)
from forensics.core.precision import resolve_precision
from forensics.core.progress import Progress, ShouldStop, sub_progress
from forensics.core.zeroshot import ASR_NOTE
from forensics.defenses import DEFENSES, Defense, RepairData, stamped_sources
from forensics.pipelines.evaluate import known_trigger, measure
from forensics.pipelines.report import write_json, write_repair_html
from forensics.pipelines.scan import COMPACT_KINDS, flagged_for_repair

DEFAULT_BUDGET = 120  # clean repair images when a method needs no findings


def read_findings(path: str | Path) -> dict:
    """A scan's report.json, checked for the fields a repair needs, their types, and that every file it names
    (trigger patterns, the compact set) lies inside the findings' own folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ForensicsError(f"findings file {path} does not exist; run `python -m forensics scan` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ForensicsError(f"findings file {path.name} is not valid JSON: {exc}") from None
    if not isinstance(report, dict):
        raise ForensicsError(f"findings file {path.name} is not a scan report (a JSON object)")
    for key in ("flagged_labels", "triggers", "victims", "compact_set", "probe", "model"):
        if key not in report:
            raise ForensicsError(f"findings file {path.name} lacks '{key}'; is it a scan report?")
    _check_findings_types(report, path.name)
    report["_dir"] = str(path.parent)
    for t in report["triggers"]:
        inside_findings(report, t["pattern"], "trigger pattern")
    inside_findings(report, report["compact_set"]["csv"], "compact set")
    return report


def _check_findings_types(report: dict, name: str) -> None:
    """Each field a repair reads has the type the scan writes; a wrong one is named in one line."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ForensicsError(f"findings file {name}: '{field}' must be {what}")

    def is_list_of_dicts(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)

    for key in ("flagged_labels", "triggers", "victims"):
        need(is_list_of_dicts(report[key]), key, "a list of objects")
    for key in ("compact_set", "probe", "model"):
        need(isinstance(report[key], dict), key, "an object")
    classes = report["probe"].get("classes")
    need(
        isinstance(classes, list) and bool(classes) and all(isinstance(c, str) for c in classes),
        "probe.classes",
        "a non-empty list of class names",
    )
    need(isinstance(report["probe"].get("source"), str), "probe.source", "a probe set name or path")
    need(isinstance(report["compact_set"].get("csv"), str), "compact_set.csv", "a path inside the findings folder")
    need(report["model"].get("sha256") is None or isinstance(report["model"]["sha256"], str), "model.sha256", "text")
    for f in report["flagged_labels"]:
        need(isinstance(f.get("label"), str), "flagged_labels[].label", "a class name")
    for t in report["triggers"]:
        need(isinstance(t.get("label"), str) and t["label"] in classes, "triggers[].label", "one of probe.classes")
        need(isinstance(t.get("pattern"), str), "triggers[].pattern", "a file name inside the findings folder")
        size = t.get("size")
        need(
            isinstance(size, (int, float)) and not isinstance(size, bool) and 0 < size <= 1,
            "triggers[].size",
            "a number in (0, 1]",
        )


def inside_findings(report: dict, relative: str, what: str) -> Path:
    """``relative`` resolved inside the findings' folder; a path that leaves it (absolute, ``..``, a link out)
    is refused in one line."""
    folder = Path(report["_dir"]).resolve()
    target = (folder / relative).resolve()
    if not resolves_inside(target, folder):
        raise ForensicsError(f"the findings name a {what} outside their folder ({relative!r}); refused")
    return target


def check_findings_model(report: dict, model: SuspectModel, force: bool = False) -> list[str]:
    """Refuse findings not shown to be of the loaded model unless ``force``: made on another model file (their SHA-256
    differs from the loaded model's), or with no identity to compare (either SHA-256 missing), since their victims,
    triggers and compact set may describe another model. Random weights have no file: their source (``random:ARCH``,
    seeded) is their identity. With ``force``, a note says what was not verified."""
    made_on, here = report["model"].get("sha256"), model.facts.sha256
    if made_on and here:
        if made_on == here:
            return []
        problem = f"the findings were made on another model file (SHA-256 {made_on[:12]}…, this one {here[:12]}…)"
        note = "the findings were made on a different model file (SHA-256 differs)"
    elif not made_on and not here and str(model.facts.source).startswith("random:"):
        if report["model"].get("source") == model.facts.source:
            return []
        problem = note = f"the findings were not made on {model.facts.source}"
    elif not made_on:
        problem = note = "the findings do not name the model file they were made on (model.sha256 is missing)"
    else:
        problem = note = "the loaded model has no SHA-256 to match the findings' model file against"
    if not force:
        raise ForensicsError(f"{problem}; scan this model first, or pass --force to repair with them anyway")
    return [f"{note}; used because of --force"]


def findings_files(report: dict) -> list[Path]:
    """The files a scan's findings consist of (report.json, the compact set and its images, trigger patterns)."""
    folder = Path(report["_dir"])
    files = [folder / "report.json", folder / "report.html"] + [folder / t["pattern"] for t in report["triggers"]]
    compact = folder / report["compact_set"]["csv"]
    files += [compact, compact.parent / "classes.json"]
    if compact.is_file():
        with open(compact, newline="", encoding="utf-8-sig") as fh:
            files += [compact.parent / row["image"] for row in csv.DictReader(fh) if row.get("image")]
    return files


def load_repair_data(report: dict, model: SuspectModel) -> RepairData:
    """The scan's compact set and trigger patterns, read from beside its report.json (rows checked: a known label,
    a known kind, an image inside the compact set's folder)."""
    csv_path = inside_findings(report, report["compact_set"]["csv"], "compact set")
    if not csv_path.is_file():
        raise ForensicsError(f"the compact fine-tuning set {csv_path.name} is missing beside the findings")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    class_names = report["probe"]["classes"]
    kinds = COMPACT_KINDS
    for n, r in enumerate(rows, 2):
        if r.get("label") not in class_names or r.get("kind") not in kinds or not r.get("image"):
            raise ForensicsError(
                f"compact set {csv_path.name}, line {n}: needs an image, a label among the probe's classes and a kind "
                f"({', '.join(kinds)})"
            )
        if not resolves_inside(csv_path.parent / r["image"], csv_path.parent):
            raise ForensicsError(f"compact set {csv_path.name}, line {n}: image {r['image']!r} is outside its folder")
    images = (
        torch.stack([load_image(csv_path.parent / r["image"], model.image_size) for r in rows])
        if rows
        else torch.empty(0, 3, model.image_size, model.image_size)
    )
    kinds = [r["kind"] for r in rows]
    source_indices = [int(r["source_index"]) if (r.get("source_index") or "").isdigit() else None for r in rows]
    return RepairData(
        images=images,
        labels=[class_names.index(r["label"]) for r in rows],
        kinds=kinds,
        class_names=class_names,
        patterns=read_patterns(report),
        flagged=flagged_for_repair(report),
        sources=stamped_sources(kinds, source_indices),
    )


def read_patterns(report: dict) -> list[torch.Tensor]:
    """The scan's reconstructed trigger patterns (3 x h x w in [0, 1]) at their own size.

    They are pasted, not resized.
    """
    patterns = [load_pattern(inside_findings(report, t["pattern"], "trigger pattern")) for t in report["triggers"]]
    return patterns


def reconstructed_triggers(patterns: list[torch.Tensor], triggers: list[dict]) -> list[tuple[str, Any, str]]:
    """The scan's trigger candidates as attacks to measure ASR with (pasted at random places): (key, attack, target)."""
    return [
        (
            "asr_reconstructed" if k == 0 else f"asr_reconstructed_{k}",
            build_attack("optimized-patch", patch=p.tolist(), size=t["size"], position="random"),
            t["label"],
        )
        for k, (p, t) in enumerate(zip(patterns, triggers))
    ]


REFUSED_OUTPUT = "nothing was written (try fewer epochs or a smaller learning rate)"


def check_written_model(model: SuspectModel, path: Path, images: torch.Tensor) -> dict:
    """The repaired file as written must load, be finite and compute what the repaired model in memory computes
    (image embeddings of up to 16 held-out images within 1e-2): a repair never hands over a file it did not check.
    Returns the check's record for metrics.json."""
    try:
        reloaded = load_checkpoint(path)
    except ForensicsError as exc:
        raise ForensicsError(f"the repaired model does not load back ({exc}); {REFUSED_OUTPUT}") from None
    sample = images[:16]
    check_finite_outputs(reloaded, sample, "the repaired model as written", REFUSED_OUTPUT)
    with frozen(model), frozen(reloaded), torch.no_grad():
        difference = float((model.encode_image(sample).cpu() - reloaded.encode_image(sample).cpu()).abs().max())
    if not difference <= 1e-2:
        raise ForensicsError(
            f"the repaired model as written computes other embeddings than the repaired model (max difference "
            f"{difference:.3g}); {REFUSED_OUTPUT}"
        )
    return {"finite": True, "reloads": True, "images": len(sample), "max_embedding_difference": difference}


def flat_scores(scores: dict) -> dict:
    """metrics.json's form of :func:`measure`'s result: ca, asr_reconstructed[_k], asr_true and asr (the true
    trigger's when known, else the first reconstructed one)."""
    out = {"ca": scores["ca"], **scores["asr"]}
    out["asr"] = out.get("asr_true", out.get("asr_reconstructed"))
    return out


def split_clean_budget(probe: ProbeSet, budget: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded split of the probe's clean labelled images: ``budget`` for repair, the rest held out for CA/ASR.

    Plain random (not stratified) draw with ``numpy.random.default_rng(seed)``; both lists come back sorted.
    """
    clean = probe.clean_indices()
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ForensicsError(f"the clean budget must be a positive number of images, got {budget!r}")
    if budget >= len(clean):
        raise ForensicsError(
            f"a budget of {budget} leaves none of the probe set's {len(clean)} clean images to measure "
            f"CA/ASR on; choose at most {len(clean) - 1}"
        )
    order = np.random.default_rng(seed).permutation(len(clean))
    chosen = sorted(clean[i] for i in order[:budget])
    held_out = sorted(clean[i] for i in order[budget:])
    return chosen, held_out


def budget_repair_data(probe: ProbeSet, indices: list[int], image_size: int) -> RepairData:
    """The clean budget as RepairData: kind "anchor", with the probe's captions when every image has one."""
    captions = [probe.items[i].caption for i in indices]
    return RepairData(
        images=probe.load_images(image_size, indices),
        labels=[probe.items[i].label for i in indices],
        kinds=["anchor"] * len(indices),
        class_names=list(probe.class_names),
        captions=captions if all(captions) else None,
    )


def make_defense(method: str, settings: dict | None = None, seed: int | None = None) -> Defense:
    """A registered defense with ``settings`` (unknown keys give a clear error); ``seed`` fills the settings' seed
    unless given."""
    method = DEFENSES.resolve(method)  # an unknown method names the valid ones
    settings = dict(settings or {})
    if seed is not None and "seed" not in settings and "seed" in DEFENSES.accepted(method):
        settings["seed"] = seed
    try:
        return DEFENSES.build(method, **settings)
    except (TypeError, ForensicsError) as exc:
        raise ForensicsError(f"bad setting for {method}: {exc}") from None


def run_repair(
    model: str | ModelRef | SuspectModel,
    findings: str | Path | None = None,
    out: str | Path | None = None,
    method: str = "oracle-finetune",
    settings: dict | None = None,
    probe: str | None = None,
    budget: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    force: bool = False,
    precision: str = "fp32",
) -> dict:
    """Repair ``model`` with ``method``; writes model.safetensors, metrics.json and report.html under ``out``.

    Methods with ``needs_findings`` use the scan's ``findings``; the others use a seeded clean budget
    of ``budget`` probe images (default 120) and are measured on the held-out clean images. Findings from
    another model file (other SHA-256) are refused unless ``force``. ``precision``: the training passes' (fp32, bf16
    or auto: forensics.core.precision); CA/ASR are measured in fp32 either way.
    """
    start = time.time()
    resolve_precision(precision, "cpu")  # refuse an unknown precision before any work
    if out is None:
        raise ForensicsError("an output folder is required (--out)")
    cls = DEFENSES.get(method)
    method = cls.name
    cls.check_processes()  # under several processes, only methods made for DDP
    needs = cls.needs_findings
    if needs and findings is None:
        others = DEFENSES.names(lambda c: not c.needs_findings)
        raise ForensicsError(
            f"{method} needs a scan's findings (--findings); run `python -m forensics scan` first"
            + (f", or choose a method that needs none ({', '.join(others)})" if others else "")
        )
    report = read_findings(findings) if findings is not None else None
    ref = None if isinstance(model, SuspectModel) else as_ref(model)
    if not needs:  # check the probe and the budget before loading anything big
        probe_spec = probe or (report["probe"]["source"] if report else None) or (ref.default_probe() if ref else None)
        if probe_spec is None:
            raise ForensicsError("a probe set is required (--probe) for models other than demo and demo-clean")
        probe_set = load_probe_set(probe_spec)
        budget = DEFAULT_BUDGET if budget is None else budget
        budget_idx, eval_idx = split_clean_budget(probe_set, budget, seed)
    loaded = ref.load() if ref else model
    check_finite_outputs(loaded)  # CA/ASR of a NaN model mean nothing, and fine-tuning cannot mend it
    notes = check_findings_model(report, loaded, force) if report else []
    out = check_output_folder(out)
    inputs = model_files(loaded.facts.source) + (findings_files(report) if report else [])
    outputs = [out / "model.safetensors", out / "model.json", out / "metrics.json", out / "report.html"]
    split: dict[str, Any] = {}
    if needs:
        if budget is not None:
            notes.append(f"{method} repairs with the scan's compact set; the budget of {budget} is not used")
        data = load_repair_data(report, loaded)
        patterns = data.patterns
        probe_set = load_probe_set(report["probe"]["source"])
        eval_idx = probe_set.clean_indices()
        refuse_overwriting_inputs(outputs, inputs + probe_set.files())
    else:
        refuse_overwriting_inputs(outputs, inputs + probe_set.files())
        if progress:
            progress(0.01, f"loading {len(budget_idx)} clean budget images")
        data = budget_repair_data(probe_set, budget_idx, loaded.image_size)
        patterns = read_patterns(report) if report else []
        split = {
            "probe": str(probe_spec),
            "budget": len(budget_idx),
            "held_out": len(eval_idx),
            "split_seed": seed,
            "budget_indices": budget_idx,
            "captions": data.captions is not None,
        }
        if report:
            notes.append(
                "findings used only for the reconstructed-trigger ASR; the method repairs with the clean budget"
            )
    eval_images = probe_set.load_images(loaded.image_size, eval_idx)
    eval_labels = [probe_set.items[i].label for i in eval_idx]
    check_finite_outputs(loaded, eval_images)  # on real inputs too: an overflow may need real pixels
    triggers = reconstructed_triggers(patterns, report["triggers"]) if report else []
    true_trigger = known_trigger(loaded, ref, probe_set.class_names)
    if true_trigger:
        triggers.append(("asr_true", *true_trigger))
    if progress:
        progress(0.02, "measuring CA/ASR before repair")
    before = flat_scores(measure(loaded, eval_images, eval_labels, probe_set.class_names, triggers, distributed=True))
    defense = make_defense(method, settings, seed)
    result = defense.repair(loaded, data, sub_progress(progress, 0.1, 0.9), should_stop, precision)
    check_finite_outputs(result.model, eval_images, "the repaired model", REFUSED_OUTPUT)
    if progress:
        progress(0.92, "measuring CA/ASR after repair")
    after = flat_scores(
        measure(result.model, eval_images, eval_labels, probe_set.class_names, triggers, distributed=True)
    )
    if not is_main():  # under a launcher, rank 0 writes the outputs; the others wait until it has
        barrier()
        return {"before": before, "after": after}
    result.model.facts.source = f"repaired ({method})"
    model_path = out / "model.safetensors"
    with staged_output(out) as stage:  # an interrupted write leaves the previous result, or nothing
        save_model(
            result.model,
            stage / "model.safetensors",
            backdoor=None,
            extra={
                "repair": {
                    "method": method,
                    "settings": result.settings,
                    "findings": None if findings is None else str(findings),
                    "clean_budget": {k: v for k, v in split.items() if k != "budget_indices"} or None,
                    "original_sha256": loaded.facts.sha256,
                }
            },
        )
        output_check = check_written_model(result.model, stage / "model.safetensors", eval_images)
        where = (
            "the probe set's clean images"
            if needs
            else f"the {len(eval_idx)} held-out clean images (the {split.get('budget')} budget images are never scored)"
        )
        metrics = {
            "before": before,
            "after": after,
            "method": method,
            "samples_used": result.samples_used,
            "seconds": round(time.time() - start, 2),
            "repair_seconds": result.seconds,
            "history": result.history,
            "settings": result.settings,
            "note": ASR_NOTE + "; measured on " + where,
            "true_trigger_known": true_trigger is not None,
            "notes": notes + result.notes,
            "original_sha256": loaded.facts.sha256,
            "eval_images": len(eval_idx),
            "clean_budget": split or None,
            "output_check": output_check,
        }
        if result.processes:
            metrics["processes"] = result.processes
        write_json(stage / "metrics.json", metrics)
        write_repair_html(stage / "report.html", ref.spec if ref else loaded.facts.source, metrics, where, model_path)
    barrier()  # the outputs are in place: the other processes may end
    if progress:
        progress(1.0, "done")
    return {
        "model": str(model_path),
        "metrics": str(out / "metrics.json"),
        "before": before,
        "after": after,
        "samples_used": result.samples_used,
        "seconds": metrics["seconds"],
        "eval_images": len(eval_idx),
        "clean_budget": split.get("budget"),
        "method": method,
        "note": metrics["note"],
    }
