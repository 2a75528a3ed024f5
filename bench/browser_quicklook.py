"""The quick look as a visitor meets it: ``python app.py``, the demo in Chromium, one click, the verdict on top of
Findings; how long it took against the estimate the button showed before the click.

Starts ``python app.py`` on a free local port (its temp folder its own), drives Debian's Chromium with playwright
as tests/test_ui_browser.py does: waits for the demo to load and the Quick look button to show its estimate for
``--images`` images (read from the button: ``Quick look (about 40 s)``, as the line below it says for how many
images), clicks it, opens Findings and waits until the box on top says ``Verdict:``. The time is from the click to
that moment: the queue, the scan, the report and the page's update, all of it. Writes ``browser_quicklook.json``
and ``.md`` under ``--out`` (estimate, measured seconds, their ratio, the verdict, the machine and its load
average before and after), and screenshots of the Investigate tab and of Findings after the scan under
``--screenshots``; ``--docs`` also copies them to docs/images/workbench-investigate.png and -findings.png for the
README. The goal: under 60 s on a quiet 2-core machine for the demo's 300 images, the estimate within a factor 2.

    python bench/browser_quicklook.py                         # 300 images, results in bench/results
    python bench/browser_quicklook.py --docs                  # and the README's screenshots
    python bench/browser_quicklook.py --images 60 --out /tmp/q   # a trial on a busy machine (not a result)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MINUTE = 60_000
ESTIMATE = re.compile(r"Quick look \(about (\d+) (s|min)\)")
LINE = re.compile(r"Quick look \([^)]*\): about \d+ (?:s|min) on (\d+) images \((\d+) s expected\)")
GOAL_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(log: Path, temp: Path) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on a free port with its own temp folder; returns the process and its URL once it answers."""
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(temp),
        "GRADIO_TEMP_DIR": str(temp / "gradio"),
    }
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url
        except OSError:
            if time.time() > deadline:
                proc.terminate()
                raise SystemExit(f"app.py did not answer on {url}") from None
            time.sleep(1)


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def run(url: str, images: int, shots: Path) -> dict:
    """Drive one quick look in Chromium; returns what was shown and measured."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        expect(page.locator("#model-status")).to_contain_text("Loaded: demo", timeout=5 * MINUTE)
        field = page.locator("#scan-images input[type=number]")
        if field.input_value() != str(images):
            field.fill(str(images))
            field.press("Enter")
        button, line = page.locator("#quick-look-button"), page.locator("#scan-estimate")
        expect(line).to_contain_text(f"on {images} images", timeout=5 * MINUTE)
        expect(button).to_contain_text(ESTIMATE, timeout=MINUTE)
        label, words = button.inner_text(), line.inner_text()
        exact = LINE.search(words)  # the estimate in seconds, and the images it is for
        start = time.time()
        button.click()
        page.get_by_role("tab", name="Findings").click()
        expect(page.locator("#verdict")).to_contain_text("Verdict:", timeout=30 * MINUTE)
        took = time.time() - start
        verdict = page.locator("#verdict").inner_text()
        page.wait_for_timeout(1500)  # the galleries' pictures load
        page.locator("#verdict").evaluate("e => e.scrollIntoView()")  # the verdict on top of the view
        page.screenshot(path=str(shots / "findings.png"), full_page=False)
        page.get_by_role("tab", name="Investigate").click()
        page.locator("#quick-look-button").evaluate("e => e.scrollIntoView()")  # the buttons, then the summary
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "investigate.png"), full_page=False)
        browser.close()
    if exact is None or int(exact.group(1)) != images:
        raise SystemExit(f"the estimate line does not give the quick look's seconds for {images} images: {words!r}")
    estimate = float(exact.group(2))
    return {
        "images": images,
        "button_before_click": label,
        "estimate_line": words,
        "estimate_seconds": estimate,
        "measured_seconds": round(took, 1),
        "ratio_measured_to_estimate": round(took / estimate, 2) if estimate else None,
        "verdict": verdict.splitlines()[0] if verdict else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300, help="images the quick look scans (the demo has 300)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the .json and .md go")
    ap.add_argument("--screenshots", type=Path, default=None, help="where the screenshots go (default: a temp folder)")
    ap.add_argument("--docs", action="store_true", help="copy the screenshots to docs/images for the README")
    args = ap.parse_args()
    if not os.path.exists(CHROMIUM):
        raise SystemExit("Chromium is not installed (apt-get install -y chromium)")
    work = Path(tempfile.mkdtemp(prefix="browser-quicklook-"))
    shots = args.screenshots or work / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    proc, url = start_app(work / "app.log", work)
    try:
        result = run(url, args.images, shots)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    result |= {
        "machine": machine(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "command": "python bench/browser_quicklook.py " + " ".join(sys.argv[1:]),
        "goal": f"under {GOAL_SECONDS} s on a quiet 2-core machine for 300 images, the estimate within a factor 2",
        "met": result["images"] == 300
        and result["measured_seconds"] < GOAL_SECONDS
        and result["ratio_measured_to_estimate"] is not None
        and 0.5 <= result["ratio_measured_to_estimate"] <= 2.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "browser_quicklook.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# The quick look in a browser",
        "",
        f"`{result['command']}` on {m['processor']}, {m['cpu_count']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), {m['platform']}; load average before {result['load_average_before'][0]}, "
        f"after {result['load_average_after'][0]}. From the click on Quick look to the verdict in the box on top of "
        "Findings, in Chromium (queue, scan, report and the page's update).",
        "",
        "| images | shown before the click | estimate s | measured s | measured / estimate | verdict |",
        "|---|---|---|---|---|---|",
        f"| {result['images']} | {result['button_before_click']} | {result['estimate_seconds']:.0f} | "
        f"{result['measured_seconds']} | {result['ratio_measured_to_estimate']} | {result['verdict']} |",
        "",
        f"Goal: {result['goal']}: {'met' if result['met'] else 'not met'}.",
    ]
    (args.out / "browser_quicklook.md").write_text("\n".join(lines) + "\n")
    if args.docs:
        images = REPO / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        for name in ("investigate", "findings"):  # 256 colours: a third of the size, the same page to the eye
            with Image.open(shots / f"{name}.png") as shot:
                shot.convert("RGB").quantize(256).save(images / f"workbench-{name}.png", optimize=True)
    print("\n".join(lines))
    print(f"screenshots: {shots}")


if __name__ == "__main__":
    main()
