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

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from forensics.core.images import load_image
from forensics.core.models import SuspectModel

Progress = Callable[[float, str], None]
ScoreWith = Literal["reference", "suspect"]


@dataclass
class AuditSettings:
    """Audit settings. Defaults: a 2-component GMM seeded with 0, a pair is risky when P(low-mean component) > 0.5."""

    seed: int = 0
    batch_size: int = 64
    risk_threshold: float = 0.5  # the "GMM cut": pairs above it are risky, the rest form the safe set
    n_init: int = 5  # GMM restarts (sklearn), for a stable fit on small sets


def pair_cosines(
    model: SuspectModel, rows: list[dict[str, str]], batch_size: int = 64, progress: Progress | None = None
) -> np.ndarray:
    """Cosine of each row's image and caption embeddings under ``model`` (no gradients)."""
    out = []
    size = model.image_size
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
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


def audit_metrics(flags: np.ndarray, risky: np.ndarray, order: list[int]) -> dict:
    """Precision/recall of the risky set against the poison flags, and the AUROC of the ranking (most risky first)."""
    from sklearn.metrics import roc_auc_score

    tp = int((risky & flags).sum())
    score = np.empty(len(order))
    score[np.asarray(order)] = np.arange(len(order), 0, -1)  # higher = ranked riskier
    both = flags.any() and (~flags).any()
    k = int(flags.sum())
    return {
        "poisoned": k,
        "flagged": int(risky.sum()),
        "true_positives": tp,
        "precision": tp / int(risky.sum()) if risky.any() else 0.0,
        "recall": tp / k if k else None,
        "auroc": float(roc_auc_score(flags, score)) if both else None,
        "precision_at_k": float(flags[np.asarray(order[:k])].mean()) if k else None,
    }
