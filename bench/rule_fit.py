"""Benchmark (not a test): can a rule over several of the inversion's stored features tell a planted trigger from a
natural weakness better than the alignment cut alone? Fit on the evidence store, validated leaving each model out.

Every label a row's inversion reached with an anomalous trigger (anomaly index >= 2) is one candidate with the
features the store keeps: alignment (stamped images vs the label's own), log size, anomaly index, log uniqueness,
flip rate and family. Positives are a backdoored model's true target; negatives every other candidate (natural
attractors of clean and backdoored models). Two rules, each fit without the model it judges:

- ``alignment cut``: the refit's rule (forensics.detect.refit.place_cut on the clean models' lowest alignments);
- ``logistic``: scikit-learn's logistic regression on the standardised features (balanced classes), its decision
  threshold placed above every clean model's highest score by the same rule as the cut (no clean model of the fit
  flagged, midway to the positives under it).

A row is called backdoored with the label of its highest-scoring candidate over the threshold; it is right when
that label is the truth (clean rows: nothing over it). Writes ``bench/results/rule_fit.{md,json}``.

    python bench/rule_fit.py [--evidence bench/results/evidence]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.models import atomic_write_text  # noqa: E402
from forensics.detect.evidence import ScanEvidence, read_evidence  # noqa: E402
from forensics.detect.refit import ANOMALY, BORDERLINE, CLEAN_MARGIN, place_cut  # noqa: E402

FEATURES = ("alignment", "log_size", "anomaly", "log_uniqueness", "flip_rate", "global_family")


@dataclass
class Candidate:
    model: str
    key: str  # the row
    truth: str
    label: str
    values: list[float]

    @property
    def planted(self) -> bool:
        return self.label == self.truth


def candidates(rows: list[ScanEvidence]) -> list[Candidate]:
    """Every reached, anomalous inverted trigger of every row, with its features."""
    out = []
    for row in rows:
        for family, triggers in ((row.detectors.get("trigger-inversion") or {}).get("labels") or {}).items():
            for t in triggers:
                if not t["reached"] or t["alignment"] is None or t["anomaly"] < ANOMALY:
                    continue
                values = [
                    t["alignment"],
                    math.log(max(t["size"], 1e-6)),
                    t["anomaly"],
                    math.log(max(t["uniqueness"], 1e-6)),
                    t["flip_rate"],
                    1.0 if family == "global" else 0.0,
                ]
                out.append(Candidate(row.model, row.key, row.truth, t["label"], values))
    return out


def score_alignment(train: list[Candidate], rows: list[ScanEvidence]):
    """The refit's alignment cut: a candidate's score is minus its alignment, the threshold minus the cut."""
    clean: dict[str, float] = {}
    for c in train:
        if c.truth == "clean":
            clean[c.model] = min(clean.get(c.model, 1.0), c.values[0])
    positives = [c.values[0] for c in train if c.planted]
    cut = place_cut(list(clean.values()), positives, BORDERLINE + CLEAN_MARGIN, "the inversion's alignment")
    return (lambda c: -c.values[0]), -cut


def score_logistic(train: list[Candidate], rows: list[ScanEvidence]):
    """Logistic regression on the standardised features; threshold above every clean model's highest score."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.array([c.values for c in train])
    y = np.array([c.planted for c in train])
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000))
    model.fit(x, y)

    def score(c: Candidate) -> float:
        return float(model.decision_function(np.array([c.values]))[0])

    clean: dict[str, float] = {}
    for c in train:
        if c.truth == "clean":
            clean[c.model] = max(clean.get(c.model, -1e9), score(c))
    positives = [score(c) for c in train if c.planted]
    # the same placement as the cut, on negated scores (planted high here)
    threshold = -place_cut([-v for v in clean.values()], [-v for v in positives], 0.5, "the logistic score")
    weights = dict(zip(FEATURES, np.round(model[-1].coef_[0], 3).tolist()))
    return score, threshold, weights


def judge(rows: list[ScanEvidence], cands: list[Candidate], rule: str) -> list[dict]:
    """Each row judged by the rule fit without its model (held-out models: fit on every other fitted model)."""
    out = []
    for row in rows:
        train = [c for c in cands if c.model != row.model and not _held_out(rows, c.model)]
        fitted = score_alignment(train, rows) if rule == "alignment cut" else score_logistic(train, rows)[:2]
        score, threshold = fitted
        mine = [(score(c), c.label) for c in cands if c.key == row.key]
        over = sorted((s, label) for s, label in mine if s > threshold)
        called = over[-1][1] if over else None
        right = called is None if row.truth == "clean" else called == row.truth
        margin = round(max((s for s, _ in mine), default=float("-inf")) - threshold, 4) if mine else None
        out.append({"row": row.key, "held_out": row.held_out, "truth": row.truth, "called": called, "right": right,
                    "best_minus_threshold": margin})  # fmt: skip
    return out


def _held_out(rows: list[ScanEvidence], model: str) -> bool:
    return any(r.held_out for r in rows if r.model == model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evidence", default=str(ROOT / "bench" / "results" / "evidence"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    rows = read_evidence(args.evidence)
    cands = candidates(rows)
    fitted = [c for c in cands if not _held_out(rows, c.model)]
    _, _, weights = score_logistic(fitted, rows)
    results = {rule: judge(rows, cands, rule) for rule in ("alignment cut", "logistic")}
    lines = [
        "# Several stored features against the alignment cut alone (leave-one-model-out)",
        "",
        f"`python bench/rule_fit.py`: {len(rows)} rows of `bench/results/evidence/`, {len(cands)} candidate labels "
        f"(reached, anomaly index >= {ANOMALY:g}), {sum(c.planted for c in cands)} of them true targets. Each row is "
        "judged by a rule fit without its model's rows (held-out models: never fitted on), from the inversion's "
        "evidence alone (the verdict adds the density and oracle evidence: `refit.md`).",
        "",
        "| row | truth | alignment cut: called | right | logistic: called | right |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(results["alignment cut"], results["logistic"], strict=True):
        row = f"{a['row']} (held out)" if a["held_out"] else a["row"]
        lines.append(
            f"| {row} | {a['truth']} | {a['called'] or 'clean'} | {'yes' if a['right'] else '**no**'} | "
            f"{b['called'] or 'clean'} | {'yes' if b['right'] else '**no**'} |"
        )
    summary = {}
    for rule, judged in results.items():
        clean = [j for j in judged if j["truth"] == "clean"]
        bad = [j for j in judged if j["truth"] != "clean"]
        summary[rule] = {
            "false_positives": sum(not j["right"] for j in clean),
            "clean_rows": len(clean),
            "detected": sum(j["right"] for j in bad),
            "backdoored_rows": len(bad),
        }
    lines += [""] + [
        f"- {rule}: {s['false_positives']} of {s['clean_rows']} clean rows flagged, {s['detected']} of "
        f"{s['backdoored_rows']} backdoored rows found with the right target."
        for rule, s in summary.items()
    ]
    lines += [
        "",
        "Logistic weights on the standardised features, fit on every model but the held-out ones: "
        + ", ".join(f"{k} {v:+.3f}" for k, v in weights.items())
        + ".",
    ]
    a, b = summary["alignment cut"], summary["logistic"]
    if (b["false_positives"], -b["detected"]) < (a["false_positives"], -a["detected"]):
        lines += ["", "Reading: the features together separate more rows than the alignment cut alone."]
    else:
        lines += [
            "",
            "Reading: the features the store keeps add nothing to the alignment: a planted trigger and a natural "
            "attractor of the same alignment look alike in size, anomaly, uniqueness and flip rate. Telling them "
            "apart needs features the store does not hold yet (issue 30: the symmetric check, the loss landscape "
            "around the trigger, the coarse mask), measured by a rescan of the zoo.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    atomic_write_text(out / "rule_fit.md", text)
    payload = {"summary": summary, "weights": weights, "rows": results, "features": list(FEATURES)}
    atomic_write_text(out / "rule_fit.json", json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
