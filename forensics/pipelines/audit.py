"""The SafeCLIP data-set audit as a command: score every image-caption pair, rank by risk, write audit.json/.csv.

The scoring and the mixture fit are SafeCLIP's (detect/safeclip_audit.py, training/safeclip.py); this file
loads the models, reads the CSV and writes the outputs.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

from forensics.core.errors import ForensicsError
from forensics.core.files import check_output_folder, model_files, refuse_overwriting_inputs, staged_output
from forensics.core.models import ModelRef, SuspectModel, atomic_write_text, resolve_model
from forensics.core.progress import Progress
from forensics.detect.safeclip_audit import AuditSettings, ScoreWith, _poison_flags, audit_metrics, pair_cosines
from forensics.training.clip import read_caption_csv
from forensics.training.safeclip import gmm_risk


def _name(model: str | ModelRef | SuspectModel) -> str:
    if isinstance(model, SuspectModel):
        return model.facts.source
    return model.spec if isinstance(model, ModelRef) else str(model)


def _files(model: str | ModelRef | SuspectModel) -> list[Path]:
    return model_files(model.facts.source if isinstance(model, SuspectModel) else _name(model))


def _resolve(model: str | ModelRef | SuspectModel) -> tuple[SuspectModel, str]:
    return resolve_model(model)[0], _name(model)


def audit_dataset(
    csv_path: str | Path,
    model: str | ModelRef | SuspectModel,
    reference: str | ModelRef | SuspectModel | None = None,
    out: str | Path | None = None,
    score_with: ScoreWith | None = None,
    settings: AuditSettings | None = None,
    progress: Progress | None = None,
) -> dict:
    """Rank the pairs of an image-caption CSV by SafeCLIP risk.

    Writes ``out/audit.json`` and ``out/audit.csv`` when ``out`` is given.
    ``score_with`` picks the scoring model: default ``"reference"`` when a reference is given (measured
    better on the demo), else ``"suspect"``. Returns the summary (metrics when poison flags exist) plus
    ``rows`` ranked most risky first.
    """
    start = time.time()
    settings = settings or AuditSettings()
    if not 0.0 < settings.risk_threshold < 1.0:
        raise ForensicsError(f"risk_threshold must be in (0, 1), got {settings.risk_threshold}")
    score_with = score_with or ("reference" if reference is not None else "suspect")
    if score_with not in ("reference", "suspect"):
        raise ForensicsError(f"score_with must be 'reference' or 'suspect', got {score_with!r}")
    if score_with == "reference" and reference is None:
        raise ForensicsError("scoring with the reference needs a reference model (--reference)")
    rows = read_caption_csv(csv_path)
    if out is not None:  # refuse before any scoring: no output may replace the data, its images or a model
        check_output_folder(out)
        inputs = [Path(csv_path), *(Path(r["image"]) for r in rows), *_files(model)]
        inputs += _files(reference) if reference is not None else []
        refuse_overwriting_inputs([Path(out) / "audit.json", Path(out) / "audit.csv"], inputs)
    if progress:
        progress(0.02, f"loading the {score_with} model")
    scorer, scorer_name = _resolve(reference if score_with == "reference" else model)
    suspect_name = _name(model)
    cosines = pair_cosines(
        scorer, rows, settings.batch_size, (lambda f, m: progress(0.05 + 0.85 * f, m)) if progress else None
    )
    if progress:
        progress(0.92, "fitting the Gaussian mixture")
    risk, gmm = gmm_risk(cosines, settings.seed, settings.n_init)
    order = sorted(range(len(rows)), key=lambda i: (-risk[i], cosines[i], i))
    risky = risk > settings.risk_threshold
    flags = _poison_flags(rows)
    ranked = []
    for rank, i in enumerate(order, 1):
        row = {
            "rank": rank,
            "row": i,
            "image": rows[i]["image"],
            "caption": rows[i]["caption"],
            "cosine": round(float(cosines[i]), 6),
            "risk": round(float(risk[i]), 6),
            "safe": int(not risky[i]),
        }
        if rows[i].get("label"):
            row["label"] = rows[i]["label"]
        if flags is not None:
            row["poisoned"] = int(flags[i])
        ranked.append(row)
    summary = {
        "data": str(Path(csv_path).resolve()),
        "model": suspect_name,
        "reference": None if reference is None else _name(reference),
        "scored_with": score_with,
        "scoring_model": scorer_name,
        "pairs": len(rows),
        "risky": int(risky.sum()),
        "safe": int((~risky).sum()),
        "gmm": gmm,
        "settings": asdict(settings),
        "metrics": None,
        "note": "pairs ranked by P(low-mean GMM component) of the image-caption cosine (SafeCLIP); "
        "the safe set is the pairs at or below risk_threshold",
    }
    if score_with == "suspect":
        summary["note"] += (
            "; scored by the suspect itself, which matches its own trigger with the target caption "
            "(measured AUROC 0.48 on the demo vs 0.77 with the clean twin): give a --reference when you can"
        )
    if flags is not None:
        summary["metrics"] = audit_metrics(flags, risky, order)
    summary["seconds"] = round(time.time() - start, 2)
    if out is not None:
        write_audit(out, summary, ranked)
    if progress:
        progress(1.0, "done")
    return {**summary, "rows": ranked}


def write_audit(out: str | Path, summary: dict, ranked: list[dict]) -> None:
    """Write ``audit.json`` (summary + ranked rows) and ``audit.csv`` (ranked rows): both, or (interrupted) neither."""
    fields = ["rank", "row", "image", "caption", "label", "cosine", "risk", "safe", "poisoned"]
    fields = [f for f in fields if any(f in r for r in ranked)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(ranked)
    with staged_output(out) as stage:
        atomic_write_text(stage / "audit.json", json.dumps({**summary, "rows": ranked}, indent=2))
        atomic_write_text(stage / "audit.csv", buf.getvalue())
