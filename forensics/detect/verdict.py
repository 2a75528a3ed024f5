"""One verdict from every detector's evidence: backdoored, clean or inconclusive; target, family, trigger, victims.

Each detector says what its findings claim (:meth:`~forensics.detect.base.Detector.evidence`: labels named strongly
or weakly with reasons and margins, refuted flags, trigger options) and which images a target captured
(``victims``); :func:`merge` is a vote over that and names no detector. Strong claims name a target: the label
the most detectors name wins, ties go to the lowest ``vote_rank`` (the model-level trigger inversion, then the
oracle-guided scan, then the embedding density). Weak claims alone make the verdict inconclusive; refuted flags
are reported and not counted. The trigger shown is the best-verified option for the target; the victims are the
union of the detectors' victims of the target. Thresholds come from the detectors' clean calibration
(calibration.json), which the verdict reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forensics.core.data import ProbeSet
from forensics.detect.base import DETECTORS
from forensics.detect.calibration import ScanDomain, calibration, domain_gaps
from forensics.detect.claims import REFUTED, STRONG, WEAK
from forensics.detect.embedding_density import density_victims
from forensics.detect.findings import Findings, Record


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
    # per detector that claimed anything: its labels named strongly, weakly or refuted, with reasons and margins
    claims: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)  # what the scan ran on (architecture, resolution, classes)
    outside_domain: list[str] = field(default_factory=list)  # where that leaves the calibrated domain, if anywhere


def _evidence(findings: Findings) -> dict[str, Any]:
    return {
        "flagged": [f.to_dict() for f in findings.flagged_labels],
        "triggers": [t.to_dict() for t in findings.triggers] + [t.to_dict() for t in findings.inverted],
        "thresholds": findings.metrics.get("thresholds"),
        "seconds": findings.metrics.get("seconds"),
        **({"skipped": findings.metrics["skipped"]} if "skipped" in findings.metrics else {}),
        **({"hijacked": findings.metrics["hijacked"]} if findings.metrics.get("hijacked") else {}),
    }


def merge(results: dict[str, Findings], probe: ProbeSet, domain: ScanDomain | None = None) -> Verdict:
    """The verdict from the detectors' findings (keyed by detector name) on ``probe``: a vote over their typed
    evidence (:meth:`~forensics.detect.base.Detector.evidence`). The label the most detectors name strongly is the
    target (ties: the lowest ``vote_rank``); weak claims alone make it inconclusive; refuted flags are reported.
    ``domain`` (what the scan ran on): where it leaves the calibrated domain, the reasons say so."""
    reasons: list[str] = []
    ran = [
        (DETECTORS.get(DETECTORS.resolve(name)), findings)
        for name, findings in results.items()
        if "skipped" not in findings.metrics and name in DETECTORS
    ]
    ran.sort(key=lambda pair: (pair[0].vote_rank, pair[0].name))
    evidence = [(cls, findings, cls.evidence(findings, probe)) for cls, findings in ran]
    target = choose_target([ev.labels(STRONG) for _, _, ev in evidence])
    weak = list(dict.fromkeys(c.reason for _, _, ev in evidence for c in ev.claims if c.strength == WEAK))
    refuted = [c.reason for _, _, ev in evidence for c in ev.claims if c.strength == REFUTED]
    if target is None:
        verdict = "inconclusive" if weak else "clean"
        reasons += (
            [f"weak evidence only: {'; '.join(weak)}"] if weak else ["no detector crossed its calibrated threshold"]
        ) + refuted
    else:
        verdict = "backdoored"
        reasons += [r for _, _, ev in evidence if (r := ev.reason_for(target)) is not None]
    family, trigger = None, None
    if target is not None:
        offered = [o for _, _, ev in evidence for o in ev.triggers if o.label == target]
        options = [o for o in offered if not o.fallback] or [o for o in offered if o.fallback]
        if options:
            best = max(options, key=lambda o: o.verified_asr)
            trigger, family = best.record, best.family
    victims: dict[int, dict[str, Any]] = {}
    if target is not None:
        for cls, findings, _ in evidence:
            for v in cls.victims(findings, probe, target):
                entry = victims.setdefault(v["index"], {**v, "found_by": []})
                entry["found_by"].append(cls.name)
    victim_list = [victims[i] for i in sorted(victims)]
    gaps = domain_gaps(domain) if domain is not None else []
    if gaps:
        reasons.append(
            f"outside the calibrated domain: {'; '.join(gaps)}; the thresholds were measured on other models, so "
            "this verdict rests on them untested"
        )
    return Verdict(
        verdict=verdict,
        target=target,
        family=family,
        trigger=trigger,
        victims=victim_list,
        reasons=reasons + ([f"also seen: {'; '.join(weak)}"] if weak and target is not None else []),
        evidence={name: _evidence(f) for name, f in results.items()},
        victim_metrics=victim_scores(probe, target, [v["index"] for v in victim_list]),
        claims={cls.name: [c.to_dict() for c in ev.claims] for cls, _, ev in evidence if ev.claims},
        domain=domain.to_dict() if domain is not None else {},
        outside_domain=gaps,
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
