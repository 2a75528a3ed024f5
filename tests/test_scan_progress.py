"""The scan's progress bar tracks time: each detector's part is sized by its expected seconds, and every message
names the detector running, its place and its share of the scan."""

from __future__ import annotations

import re

import pytest

from forensics.pipelines.scan import DETECTORS_SPAN, progress_spans, scan


def test_spans_follow_the_expected_seconds():
    spans = progress_spans(["oracle-guided", "trigger-inversion", "embedding-density"], {
        "oracle-guided": 30, "trigger-inversion": 250, "embedding-density": 5, "finishing": 15
    })  # fmt: skip
    lo, hi, share = spans["oracle-guided"]
    assert (lo, share) == (0.0, pytest.approx(0.10))
    assert hi == pytest.approx(DETECTORS_SPAN * 30 / 285)
    assert spans["trigger-inversion"][0] == pytest.approx(hi)  # back to back
    assert spans["trigger-inversion"][2] == pytest.approx(250 / 300)  # its share of the whole scan, report included
    assert spans["embedding-density"][1] == pytest.approx(DETECTORS_SPAN)


def test_spans_are_equal_without_an_estimate_and_a_missing_name_counts_as_the_mean():
    equal = progress_spans(["a", "b", "c"])
    assert [round(equal[n][1] - equal[n][0], 6) for n in "abc"] == [round(DETECTORS_SPAN / 3, 6)] * 3
    partial = progress_spans(["a", "b"], {"a": 10})
    assert partial["a"][1] == pytest.approx(DETECTORS_SPAN / 2)


def test_a_scan_reports_each_detector_by_name_and_share():
    seen: list[tuple[float, str]] = []
    expected = {"oracle-guided": 9.0, "embedding-density": 1.0}
    scan(
        "demo",
        "demo",
        detectors="oracle-guided,embedding-density",
        max_images=16,
        progress=lambda f, m: seen.append((f, m)),
        expected=expected,
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)  # never goes back
    oracle = [(f, m) for f, m in seen if m.startswith("oracle-guided (1 of 2, 90% of the scan): ")]
    density = [(f, m) for f, m in seen if m.startswith("embedding-density (2 of 2, 10% of the scan): ")]
    assert oracle and density
    assert max(f for f, _ in oracle) <= 0.9 * DETECTORS_SPAN + 1e-9  # the oracle scan's part: 90 % of the bar
    assert min(f for f, _ in density) >= 0.9 * DETECTORS_SPAN - 1e-9
    assert all(re.match(r"[a-z-]+ \(\d of 2, \d+% of the scan\): ", m) for f, m in seen if f < DETECTORS_SPAN)
