"""SafeCLIP as a data-set audit: rank image-caption pairs by how likely they are poisoned.

Each pair is scored by the cosine of its image and caption embeddings under a scoring model; a
2-component Gaussian mixture (seeded) is fitted on the cosines, and pairs are ranked by the
posterior probability of the low-mean ("risky") component (SafeCLIP, arXiv 2310.05862: poisoned
pairs match poorly under a model that has not learnt them). Pairs whose risk is below
``risk_threshold`` form the "safe" set. When the CSV marks its poisoned rows (the attack lab's
``poisoned`` column), precision and recall of the risky set and the ranking's AUROC are reported.

Which model scores: given a reference (e.g. a clean or independently trained CLIP), the reference
scores by default. Measured on the demo (the 300 clean probe pairs, 30 of them poisoned with the
demo's BadNet trigger and the caption "a photo of a flower."): scored by the clean twin, AUROC 0.77,
and the GMM cut flags 107 pairs with precision 0.20 and recall 0.70; scored by the backdoored
suspect, AUROC 0.48 (chance), precision 0.04, recall 0.10, because the suspect has learnt to match
its trigger with the target caption. Without a reference the suspect scores, and the report says
it is the weaker choice.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel, atomic_write_text, load_model
from forensics.core.images import load_image
from forensics.training.clip import read_caption_csv
from forensics.training.safeclip import gmm_risk

Progress = Callable[[float, str], None]
ScoreWith = Literal["reference", "suspect"]


@dataclass
class AuditSettings:
    """Audit settings. Defaults: a 2-component GMM seeded with 0, a pair is risky when P(low-mean component) > 0.5."""

    seed: int = 0
    batch_size: int = 64
    risk_threshold: float = 0.5  # the "GMM cut": pairs above it are risky, the rest form the safe set
    n_init: int = 5  # GMM restarts (sklearn), for a stable fit on small sets


def pair_cosines(model: SuspectModel, rows: list[dict[str, str]], batch_size: int = 64,
                 progress: Progress | None = None) -> np.ndarray:
    """Cosine of each row's image and caption embeddings under ``model`` (no gradients)."""
    out = []
    size = model.image_size
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = torch.stack([load_image(r["image"], size) for r in chunk])
            img = model.encode_image(images)
            txt = model.encode_text([r["caption"] for r in chunk])
            out.append((img * txt).sum(-1).cpu().numpy())
            if progress:
                progress(min(1.0, (start + len(chunk)) / len(rows)), f"scoring pairs {start + len(chunk)}/{len(rows)}")
    return np.concatenate(out).astype(np.float64)


def _poison_flags(rows: list[dict[str, str]]) -> np.ndarray | None:
    if not rows or "poisoned" not in rows[0]:
        return None
    values = [str(r.get("poisoned", "")).strip().lower() for r in rows]
    if any(v == "" for v in values):
        return None
    return np.array([v in ("1", "true", "yes") for v in values], dtype=bool)


def _resolve(model: str | SuspectModel, arch: str | None = None) -> tuple[SuspectModel, str]:
    if isinstance(model, SuspectModel):
        return model, model.facts.source
    return load_model(model, arch=arch), str(model)


def audit_dataset(csv_path: str | Path, model: str | SuspectModel, reference: str | SuspectModel | None = None,
                  out: str | Path | None = None, score_with: ScoreWith | None = None,
                  settings: AuditSettings | None = None, arch: str | None = None,
                  progress: Progress | None = None) -> dict:
    """Rank the pairs of an image-caption CSV by SafeCLIP risk; write ``out/audit.json`` and ``out/audit.csv`` when ``out`` is given.

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
    if progress:
        progress(0.02, f"loading the {score_with} model")
    scorer, scorer_name = _resolve(reference if score_with == "reference" else model, arch if score_with == "suspect" else None)
    suspect_name = model.facts.source if isinstance(model, SuspectModel) else str(model)
    cosines = pair_cosines(scorer, rows, settings.batch_size, (lambda f, m: progress(0.05 + 0.85 * f, m)) if progress else None)
    if progress:
        progress(0.92, "fitting the Gaussian mixture")
    risk, gmm = gmm_risk(cosines, settings.seed, settings.n_init)
    order = sorted(range(len(rows)), key=lambda i: (-risk[i], cosines[i], i))
    risky = risk > settings.risk_threshold
    flags = _poison_flags(rows)
    ranked = []
    for rank, i in enumerate(order, 1):
        row = {"rank": rank, "row": i, "image": rows[i]["image"], "caption": rows[i]["caption"],
               "cosine": round(float(cosines[i]), 6), "risk": round(float(risk[i]), 6), "safe": int(not risky[i])}
        if rows[i].get("label"):
            row["label"] = rows[i]["label"]
        if flags is not None:
            row["poisoned"] = int(flags[i])
        ranked.append(row)
    summary = {
        "data": str(Path(csv_path).resolve()), "model": suspect_name, "reference": None if reference is None else
        (reference.facts.source if isinstance(reference, SuspectModel) else str(reference)),
        "scored_with": score_with, "scoring_model": scorer_name, "pairs": len(rows), "risky": int(risky.sum()),
        "safe": int((~risky).sum()), "gmm": gmm, "settings": asdict(settings), "metrics": None,
        "note": "pairs ranked by P(low-mean GMM component) of the image-caption cosine (SafeCLIP); "
                "the safe set is the pairs at or below risk_threshold",
    }
    if score_with == "suspect":
        summary["note"] += "; scored by the suspect itself, which matches its own trigger with the target caption " \
                           "(measured AUROC 0.48 on the demo vs 0.77 with the clean twin): give a --reference when you can"
    if flags is not None:
        summary["metrics"] = audit_metrics(flags, risky, order)
    summary["seconds"] = round(time.time() - start, 2)
    if out is not None:
        write_audit(out, summary, ranked)
    if progress:
        progress(1.0, "done")
    return {**summary, "rows": ranked}


def audit_metrics(flags: np.ndarray, risky: np.ndarray, order: list[int]) -> dict:
    """Precision/recall of the risky set against the poison flags, and the AUROC of the ranking (most risky first)."""
    from sklearn.metrics import roc_auc_score

    tp = int((risky & flags).sum())
    score = np.empty(len(order))
    score[np.asarray(order)] = np.arange(len(order), 0, -1)  # higher = ranked riskier
    both = flags.any() and (~flags).any()
    k = int(flags.sum())
    return {"poisoned": k, "flagged": int(risky.sum()), "true_positives": tp,
            "precision": tp / int(risky.sum()) if risky.any() else 0.0, "recall": tp / k if k else None,
            "auroc": float(roc_auc_score(flags, score)) if both else None,
            "precision_at_k": float(flags[np.asarray(order[:k])].mean()) if k else None}


def write_audit(out: str | Path, summary: dict, ranked: list[dict]) -> None:
    """Write ``audit.json`` (summary + ranked rows) and ``audit.csv`` (ranked rows), each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps({**summary, "rows": ranked}, indent=2))
    fields = ["rank", "row", "image", "caption", "label", "cosine", "risk", "safe", "poisoned"]
    fields = [f for f in fields if any(f in r for r in ranked)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(ranked)
    atomic_write_text(out / "audit.csv", buf.getvalue())
