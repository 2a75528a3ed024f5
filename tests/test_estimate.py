"""A scan's expected time: unit costs measured on the loaded model, extrapolated per detector; checked against
scans measured here (within a factor of 2), and the waiting line's arithmetic."""

from __future__ import annotations

import time

import pytest

from forensics.core.data import load_probe_set
from forensics.core.models import ModelRef
from forensics.detect import all_detectors
from forensics.pipelines.estimate import (
    FINISHING,
    QUICK_LOOK,
    ScanBoard,
    UnitCosts,
    depth_detectors,
    duration_words,
    estimate_depths,
    estimate_scan,
    expected_wait,
    measure_costs,
    wait_words,
)
from forensics.pipelines.scan import pick_oracle, scan, scan_settings, write_scan

COSTS = UnitCosts(
    decode=0.005, oracle=0.05, regions=2.0, forward=0.01, backward=0.03, first_pass=0.03, figure=0.2, png=0.01
)


@pytest.fixture(scope="module")
def demo():
    return ModelRef("demo").load(), load_probe_set("demo")


def test_depths_name_their_detectors():
    assert depth_detectors("quick") == [n for n in all_detectors() if n in QUICK_LOOK]
    assert set(depth_detectors("quick")) == {"oracle-guided", "embedding-density"}
    assert depth_detectors("full") == all_detectors() and "trigger-inversion" in depth_detectors("full")
    with pytest.raises(ValueError, match="unknown scan depth"):
        depth_detectors("deep")


def test_the_estimate_follows_images_labels_and_steps():
    names = all_detectors()
    chosen, _ = scan_settings(names)
    small = estimate_scan(COSTS, 100, 10, names, chosen)
    large = estimate_scan(COSTS, 300, 10, names, chosen)
    for name in ("oracle-guided", "embedding-density", FINISHING):
        assert large.seconds[name] > small.seconds[name]
    # per-image passes scale with the images: three times the images, about three times the time
    assert large.seconds["embedding-density"] == pytest.approx(3 * small.seconds["embedding-density"], rel=0.05)
    # the embedding pass is one forward per image (and the probe decoded once, by the first detector)
    assert small.seconds["embedding-density"] == pytest.approx(100 * COSTS.forward)
    assert small.seconds["oracle-guided"] > 100 * (COSTS.decode + COSTS.oracle + COSTS.first_pass)
    twice, _ = scan_settings(names, detector_options={"trigger-inversion": {"steps": 80}})
    longer = estimate_scan(COSTS, 100, 10, names, twice)
    assert 1.6 < longer.seconds["trigger-inversion"] / small.seconds["trigger-inversion"] < 2.0  # steps dominate
    more_labels = estimate_scan(COSTS, 100, 5, names, chosen)
    assert more_labels.seconds["trigger-inversion"] < small.seconds["trigger-inversion"]  # 5 labels inverted, not 10
    many = estimate_scan(COSTS, 100, 1000, names, chosen)  # top_k labels inverted, plus the ranking pass
    assert many.seconds["trigger-inversion"] > small.seconds["trigger-inversion"]
    assert small.total == pytest.approx(sum(small.seconds.values()))
    assert sum(small.shares().values()) == pytest.approx(1.0)


def test_an_unmodelled_detector_is_guessed_and_said_so():
    settings = {"oracle-guided": scan_settings(["oracle-guided"])[0]["oracle-guided"], "new-one": None}
    est = estimate_scan(COSTS, 50, 10, ["oracle-guided", "new-one"], settings)
    assert est.seconds["new-one"] == pytest.approx(50 * (COSTS.forward + COSTS.backward))
    assert est.notes == ["new-one: not modelled, guessed at one forward and backward per image"]


def test_duration_words():
    assert duration_words(2) == "about 5 s"
    assert duration_words(38) == "about 40 s"
    assert duration_words(109) == "about 110 s"
    assert duration_words(290) == "about 5 min"


def test_expected_wait_plays_the_queue_through_the_slots():
    assert expected_wait([], [], 2) == 0
    assert expected_wait([30], [], 2) == 0  # a free slot
    assert expected_wait([30, 50], [], 2) == 30  # the first to finish frees one
    assert expected_wait([30, 50], [40], 2) == 50  # the one waiting takes the first slot (30 -> 70)
    assert expected_wait([30, 50], [40, 10], 2) == 60  # then the second (50 -> 60)
    assert expected_wait([300], [], 1) == 300
    assert expected_wait([-5], [], 1) == 0  # over its estimate: any moment now
    with pytest.raises(ValueError):
        expected_wait([], [], 0)


def test_the_board_counts_running_and_waiting_jobs_per_depth():
    board = ScanBoard(stale=100)
    board.start("a", "full", 300, now=0)
    assert board.wait("full", 1, now=100) == (1, 0, 200)
    assert board.wait("quick", 2, now=100) == (0, 0, 0)  # a full verdict holds no quick look's slot
    board.start("b", "quick", 40, now=90)
    board.start("c", "quick", 40, now=95)
    board.announce("d", "quick", 40, now=96)
    assert board.wait("quick", 2, now=100) == (2, 1, 35)  # b frees at 130 and d takes it; c frees at 135
    board.start("d", "quick", 40, now=130)
    board.finish("b")
    assert board.wait("quick", 2, now=130)[:2] == (2, 0)
    board.announce("e", "quick", 40, now=0)  # announced and never started (the tab was closed): forgotten
    assert board.wait("quick", 2, now=200)[1] == 0
    assert wait_words("quick", 0, 0, 0, 2) == "Starting your quick look now."
    words = wait_words("full", 1, 2, 250, 1)
    assert "1 full verdict running, 2 waiting before yours" in words and "about 4 min" in words


def test_measured_costs_are_positive_and_cover_the_oracle(demo):
    model, probe = demo
    costs = measure_costs(model, probe, pick_oracle(), sample=3, batch=8)
    for name in ("decode", "oracle", "forward", "backward", "first_pass", "figure", "png"):
        assert getattr(costs, name) > 0, name
    assert costs.backward > costs.forward  # a backward pass costs more than the forward alone
    assert costs.regions >= 0 and costs.image_size == model.image_size and costs.sample == 3
    assert set(costs.to_dict()) >= {"forward", "backward", "oracle"}


def _measured_scan(demo, n: int, depth: str, profile: str, tmp_path) -> tuple[float, float, float]:
    """(estimate from costs measured before, seconds the scan and its report took, estimate from costs after):
    the machine's load can change during a scan, so the band between the two estimates is the one to hold."""
    model, probe = demo
    subset = probe.subset(n)
    before = estimate_depths(measure_costs(model, probe, pick_oracle()), subset, profile=profile)[depth]
    start = time.time()
    outcome = scan(model, probe, detectors=before.detectors, max_images=n, profile=profile)
    write_scan(outcome, tmp_path / "scan")
    took = time.time() - start
    after = estimate_depths(measure_costs(model, probe, pick_oracle()), subset, profile=profile)[depth]
    assert list(outcome.results) == before.detectors
    return before.total, took, after.total


def test_a_quick_look_takes_about_its_estimate(demo, tmp_path):
    before, took, after = _measured_scan(demo, 30, "quick", "default", tmp_path)
    assert min(before, after) / 2 <= took <= 2 * max(before, after), (before, took, after)


@pytest.mark.slow
def test_a_full_verdict_takes_about_its_estimate(demo, tmp_path):
    before, took, after = _measured_scan(demo, 30, "full", "default", tmp_path)
    assert min(before, after) / 2 <= took <= 2 * max(before, after), (before, took, after)


def test_estimate_depths_keeps_each_depths_own_options():
    probe = type("P", (), {"class_names": list("abcdefghij"), "__len__": lambda self: 100})()
    out = estimate_depths(COSTS, probe, {"trigger-inversion": {"steps": 80}})
    assert out["quick"].detectors == depth_detectors("quick") and out["full"].detectors == depth_detectors("full")
    assert out["full"].total > out["quick"].total
    assert out["full"].seconds["oracle-guided"] == pytest.approx(out["quick"].seconds["oracle-guided"])
