"""One verdict from every detector's evidence: backdoored, clean or inconclusive; target, family, trigger, victims.

Strong evidence names a target: a trigger-inversion candidate (an anomalously small trigger that lands away from
the label's own images, and the one such in its family), an oracle-scan flag whose reconstructed trigger is
verified on clean images, or the density detector's hijacked label (dense probe images of several other classes
collapsed away from the label's own). The label the most detectors name wins; ties go to the inversion (a
model-level test needs no suspicious inputs), then the oracle scan. Weak evidence alone (a borderline inversion,
tiny triggers shared by several labels, an oracle flag whose reconstructed trigger flips half to 0.8 of clean
images, or that has none) makes the verdict inconclusive; a flag whose trigger flips less is refuted, reported
and not counted. The density detector's plain label flags decide nothing (clean probes hold natural
near-duplicates as dense as triggered inputs); its densities pick victims. Victims of the target: the oracle
scan's (with their trigger boxes) and the embedding-density ones: images predicted as the target that are nearer
the centroid of the target's densest inputs than the centroid of the label's own images (Huang et al. 2025's
density, seeded; our choice). Thresholds come from the detectors' clean calibration (calibration.json), which the
verdict reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from forensics.core.data import ProbeSet
from forensics.detect.calibration import calibration
from forensics.detect.embedding_density import MIN_CLUSTER
from forensics.detect.findings import Findings, Record

VERIFIED_FLIP = 0.8  # a reconstructed trigger counts as verified at this flip rate on clean images of other classes
# ... and refutes its oracle flag below this one (the flag's captured predictions do not follow a shared trigger),
# so the flag is shown but is not even weak evidence. Our choice, on clean models: bench/detect.py's clean-s4
# (a clean tiny CLIP, clean probe) had an oracle flag on 'tree' from 6 captured images whose reconstructed trigger
# flipped 5 of 64 held-out images (0.078) and made the verdict inconclusive; between the two rates it still does.
REFUTED_FLIP = 0.5


@dataclass
class Verdict(Record):
    """The scan's answer: is the model backdoored, towards which label, by what kind of trigger, on which inputs."""

    verdict: str  # backdoored | clean | inconclusive
    target: str | None
    family: str | None  # local (patch) | global (whole image)
    trigger: dict[str, Any] | None  # the best reconstructed or inverted trigger, with its verified flip rate
    victims: list[dict[str, Any]]
    reasons: list[str]
    evidence: dict[str, dict[str, Any]]  # per detector: its flagged labels, scores, thresholds, seconds
    victim_metrics: dict[str, Any] = field(default_factory=dict)


def _evidence(findings: Findings) -> dict[str, Any]:
    return {
        "flagged": [f.to_dict() for f in findings.flagged_labels],
        "triggers": [t.to_dict() for t in findings.triggers] + [t.to_dict() for t in findings.inverted],
        "thresholds": findings.metrics.get("thresholds"),
        "seconds": findings.metrics.get("seconds"),
        **({"skipped": findings.metrics["skipped"]} if "skipped" in findings.metrics else {}),
        **({"hijacked": findings.metrics["hijacked"]} if findings.metrics.get("hijacked") else {}),
    }


def density_victims(density: Findings, probe: ProbeSet, target: str) -> list[int]:
    """Images predicted ``target`` nearer the centroid of its dense inputs than of the label's own images."""
    if "embeddings" not in density.artefacts:  # findings without the per-image embeddings (read back, say)
        return []
    names = list(probe.class_names)
    t = names.index(target)
    emb, pred, z = (
        density.artefacts["embeddings"],
        density.artefacts["predicted"].numpy(),
        density.artefacts["density_z"],
    )
    cut = density.metrics["thresholds"]["victim_z"]
    seeds = (pred == t) & (z >= cut)
    if seeds.sum() < MIN_CLUSTER:
        return []
    labels = probe.labels
    if labels and all(v is not None for v in labels):
        own = (np.asarray(labels) == t) & ~seeds
    else:
        own = (pred == t) & (z < 0)
    trigger_centre = F.normalize(emb[torch.from_numpy(seeds)].mean(0), dim=0)
    if own.sum() == 0:
        return [int(i) for i in np.flatnonzero(pred == t)]
    own_centre = F.normalize(emb[torch.from_numpy(own)].mean(0), dim=0)
    nearer = (emb @ trigger_centre).numpy() > (emb @ own_centre).numpy()
    return [int(i) for i in np.flatnonzero((pred == t) & nearer)]


def merge(results: dict[str, Findings], probe: ProbeSet) -> Verdict:
    """The verdict from the detectors' findings (keyed by detector name) on ``probe``."""
    reasons: list[str] = []
    ran = {k: f for k, f in results.items() if "skipped" not in f.metrics}
    inversion, oracle, density = (ran.get(k) for k in ("trigger-inversion", "oracle-guided", "embedding-density"))
    inverted_targets = [f.label for f in inversion.flagged_labels] if inversion else []
    oracle_verified, oracle_refuted = [], {}
    if oracle:
        for f in oracle.flagged_labels:
            rates = [t.verified_asr for t in oracle.triggers if t.label == f.label]
            if rates and max(rates) >= VERIFIED_FLIP:
                oracle_verified.append(f.label)
            elif rates and max(rates) < REFUTED_FLIP:
                oracle_refuted[f.label] = max(rates)
    hijacked = [c["label"] for c in density.metrics.get("hijacked", [])] if density else []
    target = choose_target([inverted_targets, oracle_verified, hijacked])
    weak = []
    if inversion and inversion.metrics.get("borderline"):
        weak += [f"a borderline {r['family']} trigger for '{r['label']}'" for r in inversion.metrics["borderline"]]
    if inversion and inversion.metrics.get("shared"):
        shared = inversion.metrics["shared"]
        weak += [
            f"tiny {r['family']} triggers reach several labels alike ({', '.join(r['label'] for r in shared)}): a "
            f"general weakness of the model or a backdoor with several targets"
            for r in shared[:1]
        ]
    if inversion and inversion.metrics.get("not_inverted"):  # a label that takes (nearly) every probe image
        weak += [f"'{label}' could not be tested: {why}" for label, why in inversion.metrics["not_inverted"].items()]
    if oracle:
        weak += [
            f"unverified oracle flag on '{f.label}'"
            for f in oracle.flagged_labels
            if f.label not in oracle_verified and f.label not in oracle_refuted
        ]
    refuted = [
        f"the oracle flag on '{label}' is refuted: its reconstructed trigger flips {rate:.0%} of held-out clean images "
        f"of other classes (< {REFUTED_FLIP:.0%})"
        for label, rate in oracle_refuted.items()
    ]
    # the density detector's label flags are shown as its evidence but decide nothing: clean probes hold natural
    # near-duplicates (the demo's 'heart' and 'clock' images) that are as dense as triggered inputs
    if target is None:
        verdict = "inconclusive" if weak else "clean"
        reasons += (
            [f"weak evidence only: {'; '.join(weak)}"] if weak else ["no detector crossed its calibrated threshold"]
        ) + refuted
    else:
        verdict = "backdoored"
        if target in inverted_targets:
            reasons.append(next(f.explanation for f in inversion.flagged_labels if f.label == target))
        if target in oracle_verified:
            reasons.append(next(f.explanation for f in oracle.flagged_labels if f.label == target))
        if target in hijacked:
            c = next(c for c in density.metrics["hijacked"] if c["label"] == target)
            reasons.append(
                f"{c['dense']} probe images predicted '{target}' sit in one dense spot of the embedding space, "
                f"{c['from_other_classes']} of them images of {c['source_classes']} other classes (at most "
                f"{c['largest_source_share']:.0%} from one), away from its own images (alignment {c['alignment']:.2f})"
            )
    family, trigger = None, None
    if target is not None:
        options = []
        if inversion:
            options += [
                {"detector": "trigger-inversion", **t.to_dict()}
                for t in inversion.inverted
                if t.label == target and t.stats.get("candidate")
            ]
        if oracle:
            options += [
                {"detector": "oracle-guided", "method": "oracle-guided/local", **t.to_dict()}
                for t in oracle.triggers
                if t.label == target
            ]
        if not options and inversion:  # named by other evidence: the inversion's own trigger for it, if verified
            options += [
                {"detector": "trigger-inversion", **t.to_dict()}
                for t in inversion.inverted
                if t.label == target and t.verified_asr >= VERIFIED_FLIP
            ]
        if options:
            trigger = max(options, key=lambda o: o["verified_asr"])
            family = trigger.get("stats", {}).get("family", "local")
    victims: dict[int, dict[str, Any]] = {}
    if target is not None and oracle:
        for v in oracle.victims:
            if v.label == target:
                victims[v.index] = {**v.to_dict(), "found_by": ["oracle-guided"]}
    if target is not None and density:
        for i in density_victims(density, probe, target):
            entry = victims.setdefault(
                i, {"index": i, "image": str(probe.items[i].image), "label": target, "box": None, "found_by": []}
            )
            entry["found_by"].append("embedding-density")
    victim_list = [victims[i] for i in sorted(victims)]
    return Verdict(
        verdict=verdict,
        target=target,
        family=family,
        trigger=trigger,
        victims=victim_list,
        reasons=reasons + ([f"also seen: {'; '.join(weak)}"] if weak and target is not None else []),
        evidence={name: _evidence(f) for name, f in results.items()},
        victim_metrics=victim_scores(probe, target, [v["index"] for v in victim_list]),
    )


def choose_target(named: list[list[str]]) -> str | None:
    """The label the most detectors name (each list: one detector's strong evidence, in order of trust: the
    inversion's model-level test, the oracle scan's verified trigger, the density's hijacked cluster); ties go to
    the more trusted detector's first label."""
    votes: dict[str, int] = {}
    for labels in named:
        for label in dict.fromkeys(labels):
            votes[label] = votes.get(label, 0) + 1
    order = [label for labels in named for label in labels]
    return max(order, key=lambda label: (votes[label], -order.index(label))) if order else None


def victim_scores(probe: ProbeSet, target: str | None, found: list[int]) -> dict[str, Any]:
    """Precision and recall of the victims against the probe's trigger flags, when it has any."""
    if not probe.has_trigger_flags:
        return {"n_victims": len(found)}
    truth = {i for i, it in enumerate(probe.items) if it.triggered}
    hit = len(truth & set(found))
    return {
        "n_victims": len(found),
        "n_triggered": len(truth),
        "precision": round(hit / len(found), 4) if found else (1.0 if not truth else 0.0),
        "recall": round(hit / len(truth), 4) if truth else 1.0,
    }


__all__ = ["Verdict", "calibration", "density_victims", "merge", "victim_scores"]
