"""The verdict in one paragraph a non-expert reads first: what was found, how sure, what next; and for a partial
scan (the quick look) which detectors ran and what the full verdict adds."""

from __future__ import annotations

from forensics.detect import all_detectors
from forensics.pipelines.summary import detectors_ran, plain_verdict

QUICK = ["oracle-guided", "embedding-density"]


def _report(kind: str, ran: list[str], **verdict) -> dict:
    evidence = {name: {"flagged": [], "thresholds": None, "seconds": 1.0} for name in ran}
    base = {
        "verdict": kind,
        "target": None,
        "family": None,
        "trigger": None,
        "victims": [],
        "reasons": [],
        "evidence": evidence,
        "claims": {},
    }
    return {"verdict": {**base, **verdict}, "probe": {"images": 300}, "detector_profile": "default"}


def _backdoored(ran: list[str], naming: list[str]) -> dict:
    claims = {d: [{"label": "flower", "strength": "strong", "reason": "r", "margins": {}}] for d in naming}
    trigger = {"verified_asr": 0.97, "n_verified": 64, "method": "oracle-guided/local"}
    victims = [{"index": i} for i in range(43)]
    return _report("backdoored", ran, target="flower", family="local", trigger=trigger, victims=victims, claims=claims)


def test_backdoored_full_verdict_says_what_how_sure_and_what_next():
    text = plain_verdict(_backdoored(all_detectors(), ["trigger-inversion", "oracle-guided"]))
    assert text.startswith("**Backdoored**: this model sends images carrying a small-patch trigger to 'flower'")
    assert "(43 of the 300 probe images were hijacked by it)" in text
    assert f"How sure: high: 2 of the {len(all_detectors())} detectors that ran name 'flower' independently" in text
    assert "sends 97% of 64 held-out clean images of other classes to it" in text
    assert "Repair tab" in text and "Findings tab" in text
    assert "full verdict adds" not in text  # every detector ran


def test_backdoored_quick_look_names_what_ran_and_what_the_full_verdict_adds():
    text = plain_verdict(_backdoored(QUICK, ["oracle-guided"]))
    assert "How sure: moderate: one of the 2 detectors that ran (the oracle-guided scan) names it" in text
    assert (
        "Only the oracle-guided scan and embedding density ran; the full verdict adds the model-level trigger " in text
    )


def test_clean_says_nothing_found_with_its_limits():
    full = plain_verdict(_report("clean", all_detectors()))
    assert full.startswith("**Nothing found**: none of the detectors that ran (")
    assert "clean-calibrated threshold on these 300 images" in full and "no proof" in full
    assert "full verdict" not in full
    quick = plain_verdict(_report("clean", QUICK), markdown=False)
    assert quick.startswith("Nothing found: none of the detectors that ran (the oracle-guided scan and embedding ")
    assert quick.endswith("For a stronger answer run the full verdict: it adds the model-level trigger inversion "
                          "(it needs no triggered image in the probe set).")  # fmt: skip


def test_inconclusive_says_what_to_run_next():
    claims = {"oracle-guided": [{"label": "tree", "strength": "weak", "reason": "unverified oracle flag on 'tree'"}]}
    quick = plain_verdict(_report("inconclusive", QUICK, claims=claims))
    assert quick.startswith("**Inconclusive**: there are weak signs (unverified oracle flag on 'tree')")
    assert "Next: run the full verdict, which adds the model-level trigger inversion" in quick
    full = plain_verdict(_report("inconclusive", all_detectors(), reasons=["weak evidence only: a borderline x"]))
    assert "weak signs (weak evidence only: a borderline x)" in full
    assert "run the full verdict" not in full and "scan more images" in full


def test_skipped_detectors_and_uncalibrated_runs_are_said():
    report = _report("clean", QUICK)
    report["verdict"]["evidence"]["trigger-inversion"] = {"skipped": "needs at least 12 probe images"}
    report["detector_profile"] = "quick"
    report["verdict"]["outside_domain"] = ["architecture ViT-B-32"]
    ran, skipped, missing = detectors_ran(report)
    assert ran == QUICK and skipped == ["trigger-inversion"] and "trigger-inversion" not in missing
    text = plain_verdict(report)
    assert "Could not run on this probe set: trigger-inversion." in text
    assert "the quick detector profile ran" in text and "outside the models the thresholds were calibrated on" in text
    assert plain_verdict({}) == "No verdict: the scan's detectors were not merged."
