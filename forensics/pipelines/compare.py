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

import csv
import html
import io
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from forensics.attacks import Attack, attack_from_dict, build_attack
from forensics.core.data import ProbeSet, load_probe_set
from forensics.defenses import DEFENSES, RepairData
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel, atomic_write_text, load_model, save_model
from forensics.pipelines.repair import _load_repair_data, budget_repair_data, known_trigger, make_defense, read_findings, split_clean_budget
from forensics.pipelines.report import figure_html, table_html, write_html, write_json
from forensics.core.zeroshot import ASR_NOTE, evaluate

Progress = Callable[[float, str], None]
PLANTED = "planted"  # ASR key of the model's known backdoor


class PeakMemory:
    """Context manager measuring the peak memory rise of a block: CUDA allocations on a GPU, else sampled process RSS."""

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
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_mib = (self._peak - self._base) / 2 ** 20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc malloc_trim), so RSS rises are comparable between methods."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS rises may then be understated after earlier methods
        pass


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a list of registered method names, checked and de-duplicated."""
    names = list(DEFENSES) if methods == "all" or methods == ["all"] else \
        [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m and m.strip()]
    if not names:
        raise ForensicsError("no repair methods chosen; give --methods all or a comma-separated list")
    unknown = [m for m in names if m not in DEFENSES]
    if unknown:
        raise ForensicsError(f"unknown repair method(s) {', '.join(unknown)}; choose from {', '.join(DEFENSES)}")
    return list(dict.fromkeys(names))


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


def resolve_attacks(model: SuspectModel, spec: str | None, class_names: list[str], attacks: Sequence | None,
                    target: str | None) -> list[dict]:
    """The triggers to measure: the model's known backdoor (key ``planted``), then each extra attack aimed at ``target``."""
    out = []
    planted = known_trigger(model, spec, class_names)
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


def measure(model: SuspectModel, images: torch.Tensor, labels: list[int], class_names: list[str],
            attacks: list[dict]) -> dict:
    """CA on the held-out images and ASR (non-target images only) for each trigger."""
    if not attacks:
        return {"ca": evaluate(model, images, labels, class_names)["ca"], "asr": {}}
    asr, ca = {}, None
    for a in attacks:
        result = evaluate(model, images, labels, class_names, a["attack"], a["target"])
        ca, asr[a["key"]] = result["ca"], result["asr"]
    return {"ca": ca, "asr": asr}


def _write_probe_csv(probe: ProbeSet, indices: list[int], folder: Path) -> Path:
    """A probe CSV (absolute paths, same class order) holding only ``indices``, for a scan of part of a probe set."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "classes.json", json.dumps({"classes": probe.class_names}))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "caption", "label", "mask", "triggered", "trigger_box"])
    for i in indices:
        it = probe.items[i]
        writer.writerow([str(Path(it.image).resolve()), it.caption or "",
                         "" if it.label is None else probe.class_names[it.label],
                         "" if it.mask is None else str(Path(it.mask).resolve()),
                         "" if it.triggered is None else int(it.triggered),
                         "" if it.trigger_box is None else " ".join(map(str, it.trigger_box))])
    atomic_write_text(folder / "probe.csv", buf.getvalue())
    return folder / "probe.csv"


def _findings_data(model: SuspectModel, probe: ProbeSet, budget_idx: list[int], eval_idx: list[int], findings: str | None,
                   out: Path, seed: int, progress: Progress | None) -> tuple[RepairData, list[str], float]:
    """Repair data for a findings-needing method: from ``findings``, or from a scan of the budget + suspect images here."""
    if findings is not None:
        report = read_findings(findings)
        notes = [f"compact set from the given findings ({findings}); that scan may have seen held-out images"]
        return _load_repair_data(report, model), notes, 0.0
    from forensics.detect import ScanSettings
    from forensics.pipelines.scan import run_scan

    held = set(eval_idx)
    suspects = [i for i in range(len(probe.items)) if i not in held and i not in set(budget_idx)]
    scan_idx = sorted(budget_idx + suspects)
    csv_path = _write_probe_csv(probe, scan_idx, out / "scan" / "probe")
    start = time.time()
    run_scan(model, out / "scan", probe=str(csv_path), settings=ScanSettings(seed=seed), progress=progress)
    seconds = time.time() - start
    report = read_findings(out / "scan" / "report.json")
    notes = [f"scanned here ({seconds:.0f} s) on the {len(budget_idx)} budget images + {len(suspects)} probe images "
             "that are not clean-labelled; no held-out image was seen"]
    return _load_repair_data(report, model), notes, seconds


def run_compare(model: str | SuspectModel, methods: str | Sequence[str], out: str | Path, probe: str | None = None,
                budget: int = 120, seed: int = 0, findings: str | Path | None = None, attacks: Sequence | None = None,
                settings: dict[str, dict] | None = None, progress: Progress | None = None, target: str | None = None,
                arch: str | None = None, save_models: bool = False,
                should_stop: Callable[[], bool] | None = None) -> dict:
    """Run each method on the same clean budget and held-out images; write compare.md, compare.json and report.html.

    ``settings`` maps a method name to its settings (e.g. ``{"cleanclip": {"epochs": 2}}``); ``attacks``
    are extra triggers (names, JSON attack files, dicts or Attack objects) measured with the model's
    target (or ``target``). Returns the compare.json content.
    """
    start = time.time()
    names = resolve_methods(methods)
    settings = dict(settings or {})
    stray = [k for k in settings if k not in names]
    if stray:
        raise ForensicsError(f"settings given for method(s) not compared: {', '.join(stray)}")
    if any(not isinstance(v, dict) for v in settings.values()):
        raise ForensicsError("settings must map each method name to a dict of its settings")
    spec = model if isinstance(model, str) else None
    probe_spec = probe or ("demo" if spec in ("demo", "demo-clean") else None)
    if probe_spec is None:
        raise ForensicsError("a probe set is required (--probe) for models other than demo and demo-clean")
    probe_set = load_probe_set(probe_spec)
    budget_idx, eval_idx = split_clean_budget(probe_set, budget, seed)
    if progress:
        progress(0.0, "loading the model and images")
    loaded = load_model(model, arch=arch) if spec else model
    measured = resolve_attacks(loaded, spec, probe_set.class_names, attacks, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = budget_repair_data(probe_set, budget_idx, loaded.image_size)
    eval_images = probe_set.load_images(loaded.image_size, eval_idx)
    eval_labels = [probe_set.items[i].label for i in eval_idx]
    if progress:
        progress(0.03, "measuring CA/ASR before repair")
    before = measure(loaded, eval_images, eval_labels, probe_set.class_names, measured)
    rows = []
    share = 0.92 / len(names)
    for k, name in enumerate(names):
        base = 0.05 + k * share
        sub = (lambda f, m, b=base, n=name: progress(b + share * min(1.0, f), f"{n}: {m}")) if progress else None
        row: dict[str, Any] = {"method": name, "status": "ok", "error": None, "ca_before": before["ca"], "ca_after": None,
                               "asr_before": dict(before["asr"]), "asr_after": {}, "clean_samples": len(budget_idx),
                               "samples_used": None, "seconds": None, "peak_mib": None, "notes": []}
        t0 = time.time()
        try:
            cls = DEFENSES[name]
            defense = make_defense(name, settings.get(name), seed)
            with PeakMemory() as memory:
                if cls.needs_findings:
                    method_data, notes, _ = _findings_data(loaded, probe_set, budget_idx, eval_idx,
                                                           None if findings is None else str(findings), out, seed,
                                                           (lambda f, m: sub(0.4 * f, "scan " + m)) if sub else None)
                    row["notes"] += notes
                    inner = (lambda f, m: sub(0.4 + 0.5 * f, m)) if sub else None
                else:
                    method_data, inner = data, (lambda f, m: sub(0.9 * f, m)) if sub else None
                result = defense.repair(loaded, method_data, inner, should_stop)
            row["seconds"] = round(time.time() - t0, 2)
            row["peak_mib"] = round(memory.peak_mib, 1)
            if sub:
                sub(0.92, "measuring CA/ASR after repair")
            after = measure(result.model, eval_images, eval_labels, probe_set.class_names, measured)
            row.update(ca_after=after["ca"], asr_after=after["asr"], samples_used=result.samples_used,
                       settings=result.settings, notes=row["notes"] + list(result.notes))
            if save_models:
                result.model.facts.source = f"repaired ({name})"
                save_model(result.model, out / "models" / f"{name}.safetensors", backdoor=None,
                           extra={"repair": {"method": name, "settings": result.settings, "compare": str(out)}})
            del result
        except Exception as exc:  # noqa: BLE001 - a failing method is a row, not a crash
            if should_stop and should_stop():
                raise ForensicsError("compare cancelled") from None
            row.update(status="error", seconds=round(time.time() - t0, 2),
                       error=str(exc) if isinstance(exc, ForensicsError) else f"{type(exc).__name__}: {exc}")
        rows.append(row)
    report = {
        "model": spec or loaded.facts.source, "sha256": loaded.facts.sha256, "architecture": loaded.facts.architecture,
        "probe": str(probe_spec), "budget": len(budget_idx), "held_out": len(eval_idx), "seed": seed,
        "budget_indices": budget_idx, "findings": None if findings is None else str(findings),
        "attacks": [{"key": a["key"], "target": a["target"], "origin": a["origin"], **a["attack"].to_dict()} for a in measured],
        "before": before, "rows": rows, "note": ASR_NOTE + f"; every method is measured on the same {len(eval_idx)} "
        f"held-out clean images and repairs with the same {len(budget_idx)} clean budget images (seed {seed})",
        "memory_note": "peak MiB: " + ("CUDA max_memory_allocated above the allocation at the start of the repair"
                                       if torch.cuda.is_available() else
                                       "peak process RSS (sampled every 20 ms) above its level at the start of the repair, after "
                                       "returning freed memory to the OS; a lower bound where memory is reused"),
        "seconds": round(time.time() - start, 2),
    }
    write_outputs(out, report)
    if progress:
        progress(1.0, "done")
    return report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(report: dict) -> tuple[list[dict], list[str]]:
    """The comparison as flat rows of formatted cells, and the column order (shared by compare.md and report.html)."""
    keys = [a["key"] for a in report["attacks"]]
    columns = ["method", "CA before", "CA after"] + [f"ASR {k} {w}" for k in keys for w in ("before", "after")] + \
        ["clean samples", "repair samples", "seconds", "peak MiB", "status"]
    flat = []
    for r in report["rows"]:
        cells = {"method": r["method"], "CA before": _fmt(r["ca_before"]), "CA after": _fmt(r["ca_after"]),
                 "clean samples": _fmt(r["clean_samples"]), "repair samples": _fmt(r["samples_used"]),
                 "seconds": _fmt(r["seconds"], 1), "peak MiB": _fmt(r["peak_mib"], 1),
                 "status": "ok" if r["status"] == "ok" else f"error: {r['error']}"}
        for k in keys:
            cells[f"ASR {k} before"] = _fmt(r["asr_before"].get(k))
            cells[f"ASR {k} after"] = _fmt(r["asr_after"].get(k))
        flat.append(cells)
    return flat, columns


def comparison_chart(report: dict):
    """CA and each ASR after repair, per method, with the values before repair as dashed lines."""
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    keys = ["ca"] + [a["key"] for a in report["attacks"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ok) + 2), 3))
    width = 0.8 / len(keys)
    x = np.arange(len(ok))
    colours = plt.get_cmap("tab10")
    for j, key in enumerate(keys):
        values = [r["ca_after"] if key == "ca" else r["asr_after"].get(key) for r in ok]
        label = "CA" if key == "ca" else f"ASR {key}"
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, [v or 0 for v in values], width, label=label, color=colours(j))
        before = report["before"]["ca"] if key == "ca" else report["before"]["asr"].get(key)
        if before is not None:
            ax.axhline(before, color=colours(j), ls="--", lw=1)
    ax.set_xticks(x, [r["method"] for r in ok], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("After repair (bars) vs before (dashed lines)", fontsize=9)
    return fig


def write_outputs(out: Path, report: dict) -> None:
    """compare.json, compare.md (one markdown table) and report.html (chart + table), each written atomically."""
    write_json(out / "compare.json", report)
    flat, columns = table_rows(report)
    lines = [f"# Repair comparison: {report['model']}", "",
             f"Probe `{report['probe']}`: {report['budget']} clean budget images (seed {report['seed']}), "
             f"CA/ASR on {report['held_out']} held-out clean images.", ""]
    for a in report["attacks"]:
        lines.append(f"- ASR `{a['key']}`: {a['attack']} -> {a['target']} ({a['origin']})")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c[col]).replace("|", "/") for col in columns) + " |" for c in flat]
    notes = [f"- {r['method']}: {n}" for r in report["rows"] for n in r["notes"]]
    lines += ["", f"{report['note']}.", f"{report['memory_note']}."] + ([""] + notes if notes else [])
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    write_html(out / "report.html", f"Repair comparison: {report['model']}",
               {"model": report["model"], "SHA-256": report["sha256"], "probe": report["probe"],
                "clean budget": report["budget"], "held-out images": report["held_out"], "seed": report["seed"],
                "triggers": ", ".join(f"{a['key']} -> {a['target']}" for a in report["attacks"]) or "none known",
                "seconds": report["seconds"]},
               [("Defenses compared", figure_html(comparison_chart(report), "comparison chart") + table_html(flat, columns)),
                ("Notes", f"<p class='note'>{html.escape(report['memory_note'])}.</p><ul>"
                          + "".join(f"<li>{html.escape(n[2:])}</li>" for n in notes) + "</ul>")])
