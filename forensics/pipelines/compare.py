"""Compare repair methods on one model: the same clean budget, the same held-out images, one table.

Every chosen defense gets the same seeded clean budget (``split_clean_budget``) and is scored on the
same held-out clean images: CA, and ASR for each trigger measured (the model's known backdoor, from
its sidecar or the demo's planted one, plus any extra attacks, each aimed at that target). Per
method the table also gives the samples used, the wall time and the peak memory of the repair
(CPU: the process's resident memory sampled every 20 ms in a background thread, as the peak rise
over its level at the start; GPU: ``torch.cuda.max_memory_allocated`` over the allocation at the
start). A method that fails becomes a row with its error.

Methods that need findings (oracle-finetune): with ``findings`` they repair with that scan's compact
set. Without, the scan runs here on the budget images plus the probe's images that are not clean
labelled ones (the triggered or unlabelled images an investigator holds as suspects), never on the
held-out images, so its numbers stay comparable; the row says so and counts the budget images as
its clean samples.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from forensics.attacks import Attack, attack_from_dict, build_attack
from forensics.core.data import ProbeSet, load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.files import check_output_folder, model_files, refuse_overwriting_inputs, staged_output
from forensics.core.models import ModelRef, SuspectModel, as_ref, check_finite_outputs, save_model
from forensics.core.precision import resolve_precision
from forensics.core.progress import Progress, ShouldStop, sub_progress
from forensics.core.zeroshot import ASR_NOTE
from forensics.defenses import DEFENSES, RepairData
from forensics.detect import ScanSettings
from forensics.pipelines.evaluate import known_trigger, measure
from forensics.pipelines.repair import (
    budget_repair_data,
    check_findings_model,
    findings_files,
    load_repair_data,
    make_defense,
    read_findings,
    split_clean_budget,
)
from forensics.pipelines.report import write_compare_outputs
from forensics.pipelines.scan import compact_repair_data, scan, write_scan

PLANTED = "planted"  # ASR key of the model's known backdoor


class PeakMemory:
    """Context manager measuring the peak memory rise of a block.

    CUDA allocations on a GPU, else sampled process RSS.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.cuda = torch.cuda.is_available()
        self.peak_mib: float | None = None
        self.kind = "cuda max_memory_allocated" if self.cuda else "process RSS"

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import gc

        import psutil

        gc.collect()
        _release_freed_memory()
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_mib = (self._peak - self._base) / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc malloc_trim).

    So RSS rises are comparable between methods.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS rises may then be understated after earlier methods
        pass


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a list of registered method names, checked and de-duplicated."""
    names = (
        list(DEFENSES)
        if methods == "all" or methods == ["all"]
        else [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m and m.strip()]
    )
    if not names:
        raise ForensicsError("no repair methods chosen; give --methods all or a comma-separated list")
    unknown = [m for m in names if m not in DEFENSES]
    if unknown:
        raise ForensicsError(f"unknown repair method(s) {', '.join(unknown)}; choose from {', '.join(DEFENSES)}")
    return list(dict.fromkeys(DEFENSES.resolve(m) for m in names))


def _attack_of(spec: str | dict | Attack) -> Attack:
    if isinstance(spec, Attack):
        return spec
    if isinstance(spec, dict):
        return attack_from_dict(spec)
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            return attack_from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ForensicsError(f"cannot read attack file {spec}: {exc}") from None
    return build_attack(spec)


def resolve_attacks(
    model: SuspectModel, ref: ModelRef | None, class_names: list[str], attacks: Sequence | None, target: str | None
) -> list[dict]:
    """The triggers to measure.

    The model's known backdoor (key ``planted``), then each extra attack aimed at ``target``.
    """
    out = []
    planted = known_trigger(model, ref, class_names)
    if planted:
        out.append({"key": PLANTED, "attack": planted[0], "target": planted[1], "origin": "the model's known backdoor"})
    target = target or (planted[1] if planted else None)
    if attacks:
        if not target:
            raise ForensicsError("extra attacks need a target label (--target): the model has no known backdoor")
        if target not in class_names:
            raise ForensicsError(f"target {target!r} is not one of the classes ({', '.join(class_names)})")
        for spec_item in attacks:
            attack = _attack_of(spec_item)
            key, n = attack.name, 2
            while key in {a["key"] for a in out}:
                key, n = f"{attack.name}_{n}", n + 1
            out.append({"key": key, "attack": attack, "target": target, "origin": "given"})
    return out


def _findings_files_if_readable(findings: str | Path | None) -> list[Path]:
    """The given findings' files (outputs may not replace them); unreadable findings become the rows' error later."""
    if findings is None:
        return []
    try:
        return findings_files(read_findings(findings))
    except ForensicsError:
        return []


def findings_data(
    model: SuspectModel,
    ref: ModelRef | None,
    probe: ProbeSet,
    budget_idx: list[int],
    eval_idx: list[int],
    findings: str | Path | None,
    out: Path,
    seed: int,
    progress: Progress | None,
) -> tuple[RepairData, list[str]]:
    """Repair data for a findings-needing method: from ``findings``, or from a scan (in memory) of the budget
    images plus the probe's suspect images here, whose report is written under ``out/scan`` for reading
    (``out`` is the compare's staging folder)."""
    if findings is not None:
        report = read_findings(findings)
        check_findings_model(report, model)  # findings of another model file make this row an error
        notes = [f"compact set from the given findings ({findings}); that scan may have seen held-out images"]
        return load_repair_data(report, model), notes
    held, budget = set(eval_idx), set(budget_idx)
    suspects = [i for i in range(len(probe.items)) if i not in held and i not in budget]
    scan_idx = sorted(budget_idx + suspects)
    start = time.time()
    # the oracle-guided scan only, as before the verdict: the model-level inversion would add minutes to every
    # compare (pass --findings of a full scan to repair from an inverted trigger)
    outcome = scan(
        model, probe.select(scan_idx), settings=ScanSettings(seed=seed), progress=progress, detectors="oracle-guided"
    )
    seconds = time.time() - start
    write_scan(outcome, out / "scan")
    notes = [
        f"scanned here ({seconds:.0f} s) on the {len(budget_idx)} budget images + {len(suspects)} probe images "
        "that are not clean-labelled; no held-out image was seen"
    ]
    return compact_repair_data(outcome), notes


def run_compare(
    model: str | ModelRef | SuspectModel,
    methods: str | Sequence[str],
    out: str | Path,
    probe: str | None = None,
    budget: int = 120,
    seed: int = 0,
    findings: str | Path | None = None,
    attacks: Sequence | None = None,
    settings: dict[str, dict] | None = None,
    progress: Progress | None = None,
    target: str | None = None,
    save_models: bool = False,
    should_stop: ShouldStop | None = None,
    precision: str = "fp32",
) -> dict:
    """Run each method on the same clean budget and held-out images; write compare.md, compare.json and report.html.

    ``settings`` maps a method name to its settings (e.g. ``{"cleanclip": {"epochs": 2}}``); ``attacks``
    are extra triggers (names, JSON attack files, dicts or Attack objects) measured with the model's
    target (or ``target``); ``precision`` is every repair's (fp32, bf16 or auto: forensics.core.precision). Returns the
    compare.json content.
    """
    start = time.time()
    resolve_precision(precision, "cpu")  # refuse an unknown precision before any work
    names = resolve_methods(methods)
    settings = dict(settings or {})
    stray = [k for k in settings if k not in names]
    if stray:
        raise ForensicsError(f"settings given for method(s) not compared: {', '.join(stray)}")
    if any(not isinstance(v, dict) for v in settings.values()):
        raise ForensicsError("settings must map each method name to a dict of its settings")
    ref = None if isinstance(model, SuspectModel) else as_ref(model)
    probe_spec = probe or (ref.default_probe() if ref else None)
    if probe_spec is None:
        raise ForensicsError("a probe set is required (--probe) for models other than demo and demo-clean")
    probe_set = load_probe_set(probe_spec)
    budget_idx, eval_idx = split_clean_budget(probe_set, budget, seed)
    if progress:
        progress(0.0, "loading the model and images")
    loaded = ref.load() if ref else model
    check_finite_outputs(loaded, probe_set.load_images(loaded.image_size, eval_idx[:8]))
    measured = resolve_attacks(loaded, ref, probe_set.class_names, attacks, target)
    triggers = [(a["key"], a["attack"], a["target"]) for a in measured]
    out = check_output_folder(out)
    outputs = [out / "compare.json", out / "compare.md", out / "report.html"]
    outputs += (
        [out / "models" / f"{n}{suffix}" for n in names for suffix in (".safetensors", ".json")] if save_models else []
    )
    inputs = model_files(loaded.facts.source) + probe_set.files()
    refuse_overwriting_inputs(outputs, inputs + _findings_files_if_readable(findings))
    with staged_output(out) as stage:  # an interrupted or failed compare leaves the previous result, or nothing
        data = budget_repair_data(probe_set, budget_idx, loaded.image_size)
        eval_images = probe_set.load_images(loaded.image_size, eval_idx)
        eval_labels = [probe_set.items[i].label for i in eval_idx]
        if progress:
            progress(0.03, "measuring CA/ASR before repair")
        before = measure(loaded, eval_images, eval_labels, probe_set.class_names, triggers)
        rows = []
        share = 0.92 / len(names)
        for k, name in enumerate(names):
            base = 0.05 + k * share
            sub = sub_progress(progress, base, base + share, f"{name}: ")
            row: dict[str, Any] = {
                "method": name,
                "status": "ok",
                "error": None,
                "ca_before": before["ca"],
                "ca_after": None,
                "asr_before": dict(before["asr"]),
                "asr_after": {},
                "clean_samples": len(budget_idx),
                "samples_used": None,
                "seconds": None,
                "peak_mib": None,
                "notes": [],
            }
            t0 = time.time()
            try:
                cls = DEFENSES[name]
                defense = make_defense(name, settings.get(name), seed)
                with PeakMemory() as memory:
                    if cls.needs_findings:
                        method_data, notes = findings_data(
                            loaded,
                            ref,
                            probe_set,
                            budget_idx,
                            eval_idx,
                            findings,
                            stage,
                            seed,
                            sub_progress(sub, 0.0, 0.4, "scan "),
                        )
                        row["notes"] += notes
                        inner = sub_progress(sub, 0.4, 0.9)
                    else:
                        method_data, inner = data, sub_progress(sub, 0.0, 0.9)
                    result = defense.repair(loaded, method_data, inner, should_stop, precision)
                row["seconds"] = round(time.time() - t0, 2)
                row["peak_mib"] = round(memory.peak_mib, 1)
                if sub:
                    sub(0.92, "measuring CA/ASR after repair")
                after = measure(result.model, eval_images, eval_labels, probe_set.class_names, triggers)
                row.update(
                    ca_after=after["ca"],
                    asr_after=after["asr"],
                    samples_used=result.samples_used,
                    settings=result.settings,
                    notes=row["notes"] + list(result.notes),
                )
                if save_models:
                    result.model.facts.source = f"repaired ({name})"
                    save_model(
                        result.model,
                        stage / "models" / f"{name}.safetensors",
                        backdoor=None,
                        extra={"repair": {"method": name, "settings": result.settings, "compare": str(out)}},
                    )
                del result
            except Exception as exc:  # noqa: BLE001 - a failing method is a row, not a crash
                if should_stop and should_stop():
                    raise ForensicsError("compare cancelled") from None
                row.update(
                    status="error",
                    seconds=round(time.time() - t0, 2),
                    error=str(exc) if isinstance(exc, ForensicsError) else f"{type(exc).__name__}: {exc}",
                )
            rows.append(row)
        report = {
            "model": ref.spec if ref else loaded.facts.source,
            "sha256": loaded.facts.sha256,
            "architecture": loaded.facts.architecture,
            "probe": str(probe_spec),
            "budget": len(budget_idx),
            "held_out": len(eval_idx),
            "seed": seed,
            "precision": precision,
            "budget_indices": budget_idx,
            "findings": None if findings is None else str(findings),
            "attacks": [
                {"key": a["key"], "target": a["target"], "origin": a["origin"], **a["attack"].to_dict()}
                for a in measured
            ],
            "before": before,
            "rows": rows,
            "note": ASR_NOTE + f"; every method is measured on the same {len(eval_idx)} "
            f"held-out clean images and repairs with the same {len(budget_idx)} clean budget images (seed {seed})",
            "memory_note": "peak MiB: "
            + (
                "CUDA max_memory_allocated above the allocation at the start of the repair"
                if torch.cuda.is_available()
                else "peak process RSS (sampled every 20 ms) above its level at the start of the repair, after "
                "returning freed memory to the OS; a lower bound where memory is reused"
            ),
            "seconds": round(time.time() - start, 2),
        }
        write_compare_outputs(stage, report)
    if progress:
        progress(1.0, "done")
    return report
