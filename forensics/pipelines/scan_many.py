"""A model-zoo audit: scan every model of a list (or a folder) on one probe set; one table of verdicts.

:func:`scan_many` runs :func:`forensics.pipelines.scan.scan` per model and writes, under ``out``:

- ``audit.csv``, ``audit.md`` and ``audit.json``: one row per model (its SHA-256, verdict, flagged labels, target,
  each detector's top score, seconds, or the one-line error of a model that could not be scanned);
- ``models/<name>-<sha>-<settings>/``: each model's own scan report, as ``scan --out`` writes it, and its row
  (``row.json``: what a re-run resumes from);
- ``rows/rank-R-of-W.json``: the rows each process has finished in the latest run (what rank 0 merges).

Resumable: a model whose file has the SHA-256 and whose scan had the settings (probe contents, detectors, oracle,
scan settings, architecture options) of a finished row is not scanned again; its row is kept (``reused``). An
interrupted audit (Ctrl-C, cancel) keeps every model it finished, so running it again does only the rest. Models
without a local file (``random:ARCH``, hub ids) are always scanned: nothing shows that they are the same model.

Several processes (``torch.distributed``, e.g. ``torchrun``) share the models out round-robin: model ``i`` goes to
rank ``i % world_size`` (a second copy of one file goes with its first, so it is scanned once); each rank writes its
own rows file and rank 0 writes the tables after a barrier.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from forensics.core.data import ProbeSet, load_probe_set
from forensics.core.distributed import barrier, rank_and_world
from forensics.core.errors import ForensicsError, exception_line
from forensics.core.files import (
    check_output_folder,
    model_files,
    refuse_overwriting_inputs,
    resolves_inside,
    staged_output,
)
from forensics.core.models import DEMO_MODELS, ModelRef, atomic_write_text, sha256_of
from forensics.core.progress import Progress, ShouldStop, sub_progress
from forensics.detect import ScanSettings
from forensics.oracles import Oracle
from forensics.pipelines.scan import detector_names, pick_oracle, scan, scan_settings, write_scan

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
ZOO_FORMAT = 1  # bump when a row's meaning changes: older rows then no longer match and are scanned again
TABLE_FILES = ("audit.csv", "audit.md", "audit.json")
BASE_COLUMNS = ["model", "file", "sha256", "status", "reused", "verdict", "target", "family", "flagged"]
TAIL_COLUMNS = ["trigger_flip", "victims", "seconds", "error", "report", "settings_key"]


@dataclass
class ZooAudit:
    """A finished (or, on ranks other than 0, partly merged) zoo audit: the rows in model order and the files."""

    out: Path
    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    detectors: list[str]
    files: dict[str, str] = field(default_factory=dict)  # audit.csv / audit.md / audit.json -> path (rank 0 only)
    rank: int = 0
    world_size: int = 1
    merged: bool = True  # False on ranks other than 0: rows are this rank's own models only
    seconds: float = 0.0

    def count(self, what: str) -> int:
        """Rows scanned in this run (``scanned``), taken from an earlier scan (``reused``), or by status."""
        if what == "scanned":
            return sum(r["status"] == "done" and not r["reused"] for r in self.rows)
        if what == "reused":
            return sum(bool(r["reused"]) for r in self.rows)
        return sum(r["status"] == what for r in self.rows)

    def summary(self) -> dict[str, Any]:
        """What the CLI prints: the counts, the files, and each model's verdict or error in one line."""
        return {
            **{f"audit_{Path(name).suffix[1:]}": path for name, path in self.files.items()},
            "models": len(self.rows),
            "scanned": self.count("scanned"),
            "reused": self.count("reused"),
            "errors": self.count("error"),
            "pending": self.count("pending"),
            "seconds": self.seconds,
            "rank": self.rank,
            "world_size": self.world_size,
            "rows": [
                {k: r[k] for k in ("model", "sha256", "status", "verdict", "target", "flagged", "error")}
                for r in self.rows
            ],
        }


@dataclass
class _Entry:
    """One model of the audit: its reference, the file that identifies it, and its settings key."""

    index: int
    ref: ModelRef
    file: Path | None
    sha256: str | None
    probe: str | ProbeSet | None
    key: str
    owner: int = 0
    folder: str = ""


class _Cancelled(ForensicsError):
    """The user asked to stop (raised from inside a scan's progress callback, so it is not a model's error)."""


# --------------------------------------------------------------------------- inputs


def checkpoints_in(folder: str | Path) -> list[Path]:
    """Every checkpoint file directly in ``folder`` (*.safetensors, *.pt, *.pth, *.bin; sorted; not recursive)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ForensicsError(f"the models folder {folder} does not exist or is not a folder")
    found = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in CHECKPOINT_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not found:
        raise ForensicsError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in {folder}")
    return found


def model_file(ref: ModelRef) -> Path | None:
    """The local file a model reference loads (the bundled file for demo / demo-clean), or None (random, hub)."""
    if ref.spec in DEMO_MODELS:
        return DEMO_MODELS[ref.spec]
    path = Path(ref.spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():  # load_checkpoint takes a folder holding exactly one .safetensors
        inside = sorted(path.glob("*.safetensors"))
        return inside[0] if len(inside) == 1 else None
    return None


def probe_identity(probe: ProbeSet) -> str:
    """SHA-256 of what a probe set holds (class names, labels, trigger flags, image and mask bytes), so that the
    same images under another path match and changed images do not."""
    digest = hashlib.sha256(json.dumps(probe.class_names).encode())
    for item in probe.items:
        digest.update(json.dumps([item.label, item.triggered, item.trigger_box]).encode())
        for path in (item.image, item.mask):
            if path is None:
                digest.update(b"-")
                continue
            try:
                digest.update(sha256_of(Path(path)).encode())
            except OSError as exc:
                raise ForensicsError(f"probe file {Path(path).name} cannot be read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "model"


# --------------------------------------------------------------------------- rows


def _scores(report: dict, detectors: list[str]) -> dict[str, float | None]:
    """Each detector's top flagged score (None when it flagged nothing)."""
    evidence = (report.get("verdict") or {}).get("evidence", {})
    return {
        name: max((f["score"] for f in evidence.get(name, {}).get("flagged", [])), default=None) for name in detectors
    }


def _flagged(report: dict) -> list[str]:
    """Labels any detector flagged, the verdict's target first."""
    verdict = report.get("verdict") or {}
    labels = [verdict["target"]] if verdict.get("target") else []
    labels += [f["label"] for f in report.get("flagged_labels", [])]
    labels += [f["label"] for e in verdict.get("evidence", {}).values() for f in e.get("flagged", [])]
    return list(dict.fromkeys(labels))


def _row(entry: _Entry, **values: Any) -> dict[str, Any]:
    row = {
        "index": entry.index,
        "model": entry.ref.spec,
        "file": entry.file.name if entry.file else "",
        "sha256": entry.sha256 or "",
        "status": "pending",
        "reused": False,
        "verdict": "",
        "target": "",
        "family": "",
        "flagged": [],
        "scores": {},
        "trigger_flip": None,
        "victims": None,
        "seconds": None,
        "error": "",
        "report": "",
        "settings_key": entry.key,
        "finished": "",
    }
    row.update(values)
    return row


def _done_row(entry: _Entry, report: dict, detectors: list[str], seconds: float) -> dict[str, Any]:
    verdict = report.get("verdict") or {}
    trigger = verdict.get("trigger") or {}
    return _row(
        entry,
        sha256=report["model"].get("sha256") or entry.sha256 or "",  # what was scanned, should the file have changed
        status="done",
        verdict=verdict.get("verdict", ""),
        target=verdict.get("target") or "",
        family=verdict.get("family") or "",
        flagged=_flagged(report),
        scores=_scores(report, detectors),
        trigger_flip=trigger.get("verified_asr"),
        victims=len(verdict.get("victims", [])),
        seconds=round(seconds, 2),
        report=f"models/{entry.folder}/report.json",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, ForensicsError):
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"unexpected {exception_line(exc)}"


def _read_rows(path: Path) -> tuple[str | None, list[dict]]:
    """The run key and rows of a rank's rows file (nothing when it is missing or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, []
    if not isinstance(data, dict) or data.get("format") != ZOO_FORMAT or not isinstance(data.get("rows"), list):
        return None, []
    return data.get("run"), [r for r in data["rows"] if isinstance(r, dict)]


def _reusable(out: Path, entry: _Entry) -> dict | None:
    """The row of a finished scan of the same file (SHA-256) with the same settings in ``out``, else None.

    Each scanned model's folder holds its row (``row.json``, written after its report), so every earlier audit in
    ``out``, whatever its models or settings, counts; a folder without its report or row is scanned again."""
    if not entry.sha256:
        return None
    for folder in sorted((out / "models").glob(f"*-{entry.sha256[:10]}-{entry.key[:8]}")):
        try:
            data = json.loads((folder / "row.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        row = data.get("row") if isinstance(data, dict) and data.get("format") == ZOO_FORMAT else None
        if (
            isinstance(row, dict)
            and row.get("status") == "done"
            and [row.get("sha256"), row.get("settings_key")] == [entry.sha256, entry.key]
            and (folder / "report.json").is_file()
        ):
            return {**row, "report": f"models/{folder.name}/report.json"}
    return None


# --------------------------------------------------------------------------- tables


def _table_columns(detectors: list[str]) -> list[str]:
    return BASE_COLUMNS + [f"score:{d}" for d in detectors] + TAIL_COLUMNS


def _cell(row: dict, column: str) -> Any:
    if column.startswith("score:"):
        value = row.get("scores", {}).get(column[6:])
    else:
        value = row.get(column)
    if isinstance(value, list):
        return ";".join(map(str, value))
    if isinstance(value, bool):
        return "yes" if value else ""
    return "" if value is None else value


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = [_cell(row, c) for c in columns]
        # a spreadsheet runs a cell that starts like a formula: model names and errors come from users
        writer.writerow(["'" + c if isinstance(c, str) and c[:1] in ("=", "+", "-", "@") else c for c in cells])
    return buf.getvalue()


def _md_text(rows: list[dict], columns: list[str], settings: dict) -> str:
    shown = [c for c in columns if c not in ("report", "settings_key")]
    lines = [
        "# Model-zoo audit",
        "",
        f"Probe `{settings['probe']}`, detectors {', '.join(settings['detectors'])}, oracle "
        f"`{settings['oracle']['name']}`, seed {settings['scan']['seed']}"
        + (f", {settings['max_images']} images" if settings.get("max_images") else "")
        + ".",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = [str(_cell(row, c)).replace("|", "/").replace("\n", " ") for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], detectors: list[str], settings: dict, seconds: float) -> dict[str, str]:
    """audit.csv, audit.md and audit.json under ``out``: written beside it, then each renamed into place."""
    columns = _table_columns(detectors)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "error", "pending")}
    data = {
        "format": ZOO_FORMAT,
        "tool": "clip-backdoor-forensics",
        "kind": "scan-many",
        "settings": settings,
        "detectors": detectors,
        "columns": columns,
        "models": len(rows),
        **counts,
        "reused": sum(bool(r["reused"]) for r in rows),
        "seconds": round(seconds, 2),
        "rows": rows,
    }
    # all three replace the previous tables, or (interrupted) none does; the models' reports beside them stay
    with staged_output(out, incremental=True) as stage:
        atomic_write_text(stage / "audit.csv", _csv_text(rows, columns))
        atomic_write_text(stage / "audit.md", _md_text(rows, columns, settings))
        atomic_write_text(stage / "audit.json", json.dumps(data, indent=2, default=str))
    return {name: str(out / name) for name in TABLE_FILES}


# --------------------------------------------------------------------------- the audit


def scan_many(
    models: Sequence[str | Path | ModelRef],
    probe: str | ProbeSet | None,
    out: str | Path,
    detectors: str | list[str] | None = None,
    oracle: str | Oracle | None = None,
    sam_checkpoint: str | None = None,
    settings: ScanSettings | None = None,
    max_images: int | None = None,
    models_dir: str | Path | None = None,
    model_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    cancel: ShouldStop | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    detector_options: Mapping[str, Any] | None = None,
    profile: str | None = None,
) -> ZooAudit:
    """Scan every model (``models``, then each checkpoint in ``models_dir``) on ``probe`` with the same detectors
    and settings; write each model's report and one table under ``out``, skipping models already done there.

    ``model_options`` (arch, quick_gelu, device) apply to the models given as names or paths and those found in
    ``models_dir`` (a ModelRef keeps its own). ``probe`` None scans each demo model on its default probe. A model
    that cannot be loaded or scanned gets a row with its one-line error and the audit goes on; ``cancel()`` True
    (or Ctrl-C) stops it between steps with every finished model kept for the next run. ``rank``/``world_size``
    default to torch.distributed's when it is initialised, else 0 and 1.
    """
    start = time.time()
    rank, world_size, distributed = rank_and_world(rank, world_size)
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    refs = [m if isinstance(m, ModelRef) else ModelRef(str(m), **options) for m in models]
    if models_dir is not None:
        refs += [ModelRef(str(p), **options) for p in checkpoints_in(models_dir)]
    if not refs:
        raise ForensicsError("no models to audit: name models or give a folder of checkpoints")
    out = check_output_folder(out, incremental=True)  # an audit resumes in its folder
    names = detector_names(detectors)
    chosen, settings = scan_settings(names, settings, detector_options, profile)  # refused here, before any model
    oracle_obj = pick_oracle(oracle, sam_checkpoint)  # built once (SAM loads its weights once for the whole zoo)

    probes: dict[str, tuple[ProbeSet, str]] = {}

    def probe_for(ref: ModelRef) -> tuple[str | ProbeSet | None, str | None, list[Path]]:
        """What scan() is given for this model, the probe's identity, and its files (never overwritten)."""
        spec = probe if probe is not None else ref.default_probe()
        if spec is None:
            return None, None, []
        if isinstance(spec, ProbeSet):
            key = f"object:{id(spec)}"
            if key not in probes:
                probes[key] = (spec, probe_identity(spec))
        else:
            key = str(spec)
            if key not in probes:
                loaded = load_probe_set(spec)
                probes[key] = (loaded, probe_identity(loaded))
        loaded, identity = probes[key]
        return spec, identity, loaded.files()

    common = {
        "format": ZOO_FORMAT,
        "detectors": names,
        "oracle": {"name": oracle_obj.name, **oracle_obj.settings()},
        "scan": settings.to_dict(),
        "detector_settings": {name: asdict(chosen[name]) for name in names},
        "max_images": max_images,
    }
    entries: list[_Entry] = []
    inputs: list[Path] = []
    for index, ref in enumerate(refs):
        file = model_file(ref)
        spec, identity, probe_files = probe_for(ref)
        inputs += probe_files + (model_files(file) if file else [])
        key = _hash({**common, "probe": identity, "arch": ref.arch, "quick_gelu": ref.quick_gelu})[:16]
        try:
            sha = sha256_of(file) if file else None
        except OSError:  # unreadable: its scan fails and says why, in its row
            sha = None
        stem = ref.spec if ref.is_demo else (file.stem if file else ref.spec)
        folder = f"{_slug(stem)}-{(sha or _hash(ref.spec))[:10]}-{key[:8]}"
        entries.append(_Entry(index, ref, file, sha, spec, key, folder=folder))
    _check_out(out, entries, models_dir)
    outputs = [out / n for n in TABLE_FILES] + [out / "rows" / f"rank-{r}-of-{world_size}.json" for r in (0, rank)]
    refuse_overwriting_inputs(outputs, inputs)
    first: dict[tuple[str, str], int] = {}
    for entry in entries:  # a copy of an earlier file goes to the same rank, which then reuses its row
        same = first.setdefault((entry.sha256, entry.key), entry.index) if entry.sha256 else entry.index
        entry.owner = same % world_size
    run_key = _hash([[e.ref.spec, e.key, e.sha256] for e in entries] + [world_size])[:16]
    audit_settings = {
        **common,
        "probe": probe.name if isinstance(probe, ProbeSet) else (str(probe) if probe is not None else "default"),
    }

    mine = [e for e in entries if e.owner == rank]
    rows_file = out / "rows" / f"rank-{rank}-of-{world_size}.json"
    own: dict[int, dict] = {}

    def stop_check(fraction: float, message: str, report: Progress | None) -> None:
        if cancel is not None and cancel():
            raise _Cancelled(
                f"audit cancelled: {sum(r['status'] == 'done' for r in own.values())} of {len(entries)} models "
                f"done (kept in {out.name}); run it again with the same output folder to resume"
            )
        if report is not None:
            report(fraction, message)

    def watched(report: Progress | None) -> Progress:
        return lambda fraction, message: stop_check(fraction, message, report)

    for n, entry in enumerate(mine):
        part = sub_progress(progress, n / len(mine), (n + 1) / len(mine), f"{n + 1}/{len(mine)} {entry.ref.spec}: ")
        stop_check(0.0, "starting", part)
        earlier = _reusable(out, entry)
        if earlier is not None:
            kept = {k: v for k, v in earlier.items() if k not in ("index", "model", "file")}
            row = _row(entry, **{**kept, "reused": True})
        else:
            began = time.time()
            try:
                outcome = scan(
                    entry.ref,
                    entry.probe,
                    oracle_obj,
                    None,
                    settings,
                    max_images,
                    watched(part),
                    names,
                    detector_options={k: v for k, v in chosen.items() if k != "oracle-guided"},
                )
                folder = out / "models" / entry.folder
                (folder / "row.json").unlink(missing_ok=True)  # a stale row of an unfinished run; rewritten below
                write_scan(outcome, folder, watched(part))
                row = _done_row(entry, outcome.report, names, time.time() - began)
                del outcome
                atomic_write_text(folder / "row.json", json.dumps({"format": ZOO_FORMAT, "row": row}, default=str))
            except _Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken model must not end the audit of the others
                row = _row(entry, status="error", error=_error_line(exc), seconds=round(time.time() - began, 2))
        own[entry.index] = row
        atomic_write_text(
            rows_file,
            json.dumps({"format": ZOO_FORMAT, "run": run_key, "rows": list(own.values())}, indent=2, default=str),
        )
    if not mine:  # more processes than models: say so in a file of this run, so rank 0 finds nothing stale
        atomic_write_text(rows_file, json.dumps({"format": ZOO_FORMAT, "run": run_key, "rows": []}))

    if distributed and world_size > 1:
        barrier()
    if rank != 0:
        rows = [own[e.index] for e in mine]
        return ZooAudit(out, rows, audit_settings, names, rank=rank, world_size=world_size, merged=False)
    others: dict[int, dict[int, dict]] = {}
    for other in range(1, world_size):
        run, rows = _read_rows(out / "rows" / f"rank-{other}-of-{world_size}.json")
        others[other] = {r.get("index"): r for r in rows} if run == run_key else {}
    merged = []
    for entry in entries:
        row = own.get(entry.index) if entry.owner == 0 else others[entry.owner].get(entry.index)
        if entry.owner != 0 and row is not None:  # another rank's row: for this very model, file and settings?
            expected = [entry.ref.spec, entry.key, entry.sha256 or row.get("sha256")]
            row = row if [row.get("model"), row.get("settings_key"), row.get("sha256")] == expected else None
        if row is None:
            row = _row(entry, error=f"not finished by rank {entry.owner} yet; run the audit again to complete it")
        merged.append(row)
    seconds = round(time.time() - start, 2)
    files = write_tables(out, merged, names, audit_settings, seconds)
    if progress:
        progress(1.0, f"audit of {len(entries)} models written")
    return ZooAudit(out, merged, audit_settings, names, files, rank=rank, world_size=world_size, seconds=seconds)


def _check_out(out: Path, entries: list[_Entry], models_dir: str | Path | None) -> None:
    """Refuse an output folder that is (or, for ``models_dir``, lies in) a folder the models are read from."""
    if models_dir is not None and resolves_inside(out, models_dir):
        raise ForensicsError(f"--out {out.name} lies in the models folder; choose an output folder outside it")
    for entry in entries:
        if entry.file is not None and out.resolve() == entry.file.parent.resolve():
            raise ForensicsError(
                f"--out {out.name} is the folder of the model {entry.file.name}; choose an output folder outside it"
            )
