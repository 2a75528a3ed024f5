"""The workbench assembled without serving it: every tab builds, and each endpoint takes and fills the components
it should (a fast check of the wiring; the served app is tested through its API and a browser in the slow tier)."""

from __future__ import annotations

import runpy
import sys

import pytest

gr = pytest.importorskip("gradio")

from forensics.ui.workbench import build_app  # noqa: E402


@pytest.fixture(scope="module")
def app() -> gr.Blocks:
    return build_app()


def _endpoint(app: gr.Blocks, name: str):
    found = [fn for fn in app.fns.values() if fn.api_name == name]
    assert len(found) == 1, [fn.api_name for fn in app.fns.values()]
    return found[0]


def test_every_endpoint_the_tests_and_clients_call_is_there(app):
    names = {fn.api_name for fn in app.fns.values() if fn.api_name}
    assert {"scan", "quick_look", "load_model", "evaluate", "paste_trigger", "repair", "compare"} <= names, names


@pytest.mark.parametrize("name", ["scan", "quick_look"])
def test_the_scan_takes_the_profile_and_settings_and_fills_the_verdict_box_on_top(app, name):
    scan = _endpoint(app, name)
    ids = [getattr(c, "elem_id", None) for c in scan.inputs]
    assert "scan-images" in ids and "detector-profile" in ids and "detector-settings" in ids
    profile = next(c for c in scan.inputs if getattr(c, "elem_id", None) == "detector-profile")
    assert [choice[1] for choice in profile.choices] == ["default", "quick"] and profile.value == "default"
    outputs = [getattr(c, "elem_id", None) for c in scan.outputs]
    # the verdict goes into the box on top of Findings, not into the paste experiment's result below it
    assert "verdict" in outputs and "paste-result" not in outputs
    assert "scan-queue" in outputs  # the waiting line is cleared when the scan ends
    assert [c.elem_id for c in scan.show_progress_on] == ["scan-summary"]  # the waiting line stays readable
    assert _endpoint(app, "paste_trigger").outputs[-1].elem_id == "paste-result"


def test_quick_looks_and_full_verdicts_queue_apart(app):
    """Each depth has its own concurrency group: a full verdict never holds a quick look's slot."""
    quick, full = _endpoint(app, "quick_look"), _endpoint(app, "scan")
    assert (quick.concurrency_id, quick.concurrency_limit) == ("quick-look", 2)
    assert (full.concurrency_id, full.concurrency_limit) == ("full-verdict", 1)
    others = {fn.concurrency_id for fn in app.fns.values() if fn not in (quick, full)}
    assert not others & {"quick-look", "full-verdict"}  # no other event takes their slots
    # each depth's button shows its expected time (filled in on load) and answers at once before it queues
    buttons = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None) in (
        "quick-look-button", "full-verdict-button")}  # fmt: skip
    assert len(buttons) == 2
    announcers = [fn for fn in app.fns.values() if not fn.queue and [c.elem_id for c in fn.outputs] == ["scan-queue"]]
    assert len(announcers) == 2


def test_two_quick_looks_run_beside_a_full_verdict_and_a_second_full_verdict_waits(app):
    """The served queue with the scans replaced by timed stand-ins: one full verdict, then two quick looks and a
    second full verdict at once. Both quick looks start while the first full verdict runs and run side by side;
    the second full verdict starts only when the first has ended."""
    import socket
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    quick, full = _endpoint(app, "quick_look"), _endpoint(app, "scan")
    times: dict[str, list[tuple[float, float]]] = {"quick": [], "full": []}
    lock = threading.Lock()

    def stand_in(depth: str, seconds: float):
        def run(*args, **kwargs):
            start = time.time()
            time.sleep(seconds)
            with lock:
                times[depth].append((start, time.time()))
            return tuple(gr.skip() for _ in quick.outputs)

        return run

    saved = quick.fn, full.fn
    quick.fn, full.fn = stand_in("quick", 1.0), stand_in("full", 2.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.queue(default_concurrency_limit=1).launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True
    )
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(4)]
        args = ("demo", None, 10, "default", "")
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(clients[0].predict, *args, api_name="/scan")
            time.sleep(0.8)  # the first full verdict holds its slot
            rest = [pool.submit(c.predict, *args, api_name=api) for c, api in zip(
                clients[1:], ("/quick_look", "/quick_look", "/scan"))]  # fmt: skip
            for job in (first, *rest):
                job.result(timeout=60)
    finally:
        app.close()
        quick.fn, full.fn = saved
    (f1, f2), quicks = sorted(times["full"]), sorted(times["quick"])
    assert len(quicks) == 2
    assert all(start < f1[1] for start, _ in quicks)  # neither quick look waited for the full verdict
    assert quicks[1][0] < quicks[0][1]  # the two quick looks ran side by side
    assert f2[0] >= f1[1] - 0.05  # the second full verdict waited for the first


def test_python_dash_m_forensics_is_the_cli(monkeypatch, capsys):
    import forensics.__main__ as entry  # importing it runs nothing
    from forensics.cli import main

    assert entry.main is main
    monkeypatch.setattr(sys, "argv", ["forensics", "--help"])
    with pytest.raises(SystemExit) as raised:
        runpy.run_path(entry.__file__, run_name="__main__")
    assert raised.value.code == 0 and "scan" in capsys.readouterr().out
