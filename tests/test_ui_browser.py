"""End to end in a real browser: Debian's Chromium driven by playwright against `python app.py`.

The page loads with the demo, both scan buttons show their expected time before the click, a quick look flags
the demo's target label with the verdict in the box on top of Findings, a repair makes ASR fall, and a malicious
checkpoint upload shows its error in the page. Screenshots of each step are saved under the test's temporary
directory (pytest prints where), or under the folder ``FORENSICS_SCREENSHOTS`` names (the Investigate tab and
Findings after the scan as ``investigate.png`` and ``findings.png``, what ``bench/browser_quicklook.py --docs``
writes into docs/images for the README).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed (apt-get install -y chromium)"),
]
MINUTE = 60_000


@pytest.fixture(scope="module")
def page(workbench, tmp_path_factory):
    named = os.environ.get("FORENSICS_SCREENSHOTS")
    shots = Path(named) if named else tmp_path_factory.mktemp("screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(workbench)
        pg.shots = shots
        print(f"\nscreenshots: {shots}")
        yield pg
        browser.close()


def shot(page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(page.shots / f"{name}.png"), full_page=full_page)
    assert (page.shots / f"{name}.png").stat().st_size > 10_000


ESTIMATED = re.compile(r"\(about \d+ (s|min)\)")


def test_scan_flags_the_demo_target_then_repair_lowers_asr(page):
    expect = sync_api.expect
    expect(page.locator("#model-status")).to_contain_text("Loaded: demo", timeout=2 * MINUTE)
    shot(page, "loaded")
    images = page.locator("#scan-images input[type=number]")
    images.fill("60")
    images.press("Enter")
    page.get_by_text("Detector settings").click()  # the quick profile: this tests the page, not the detectors
    page.locator("#detector-profile").get_by_text("quick", exact=True).click()
    # before the click, each depth shows its expected time, measured for this model on this machine
    expect(page.locator("#quick-look-button")).to_contain_text(ESTIMATED, timeout=5 * MINUTE)
    expect(page.locator("#full-verdict-button")).to_contain_text(ESTIMATED, timeout=MINUTE)
    expect(page.locator("#scan-estimate")).to_contain_text("on 60 images", timeout=MINUTE)
    page.locator("#quick-look-button").click()
    expect(page.locator("#scan-queue")).to_contain_text("quick look", timeout=MINUTE)  # starts now, or waits
    expect(page.locator("#scan-summary")).to_contain_text("Flagged labels: flower", timeout=20 * MINUTE)
    summary = page.locator("#scan-summary").inner_text()
    assert "Backdoored: this model sends images carrying" in summary and "Repair tab" in summary  # plain words
    assert "the full verdict adds the model-level trigger inversion" in summary  # a quick look says what it is
    shot(page, "investigate")
    page.get_by_role("tab", name="Findings").click()
    expect(page.locator("#verdict")).to_contain_text("Verdict: backdoored", timeout=MINUTE)  # the box on top
    expect(page.locator("#verdict")).to_contain_text("flower", timeout=MINUTE)
    expect(page.locator("#flagged-table")).to_contain_text("flower", timeout=MINUTE)
    # the pictures: the trigger at work on a clean image, each detector's scores against its threshold
    expect(page.locator("#trigger-pictures img")).to_have_count(1, timeout=MINUTE)
    expect(page.locator("#detector-scores img")).to_have_count(1, timeout=MINUTE)
    expect(page.locator("#evidence-table")).to_contain_text(">=", timeout=MINUTE)  # thresholds in words
    shot(page, "findings")
    page.get_by_role("tab", name="Repair").click()
    page.locator("#repair-button").click()
    summary = page.locator("#repair-summary")
    expect(summary).to_contain_text(re.compile(r"ASR [\d.]+ → [\d.]+"), timeout=20 * MINUTE)
    shot(page, "repaired")
    match = re.search(r"CA ([\d.]+) → ([\d.]+), ASR ([\d.]+) → ([\d.]+)", summary.inner_text())
    assert match, summary.inner_text()
    ca_before, ca_after, asr_before, asr_after = map(float, match.groups())
    assert asr_before >= 0.9 and asr_after < 0.5 * asr_before
    assert ca_after >= ca_before - 0.1


def test_malicious_checkpoint_shows_an_error_in_the_page(page, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    page.get_by_role("tab", name="Model").click()
    page.get_by_label("checkpoint file (upload or server path)").check()
    page.locator("input[type=file]").first.set_input_files(str(evil))
    page.wait_for_timeout(1500)  # the upload lands before the click reads it
    page.get_by_role("button", name="Load model").click()
    sync_api.expect(page.get_by_text("nothing in it was run").first).to_be_visible(timeout=MINUTE)
    shot(page, "malicious-upload")
    assert not (tmp_path / "pwned").exists()
