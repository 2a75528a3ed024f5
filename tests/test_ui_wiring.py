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
    assert {"scan", "load_model", "evaluate", "paste_trigger", "repair", "compare"} <= names, names


def test_the_scan_takes_the_profile_and_settings_and_fills_the_verdict_box_on_top(app):
    scan = _endpoint(app, "scan")
    ids = [getattr(c, "elem_id", None) for c in scan.inputs]
    assert "scan-images" in ids and "detector-profile" in ids and "detector-settings" in ids
    profile = next(c for c in scan.inputs if getattr(c, "elem_id", None) == "detector-profile")
    assert [choice[1] for choice in profile.choices] == ["default", "quick"] and profile.value == "default"
    outputs = [getattr(c, "elem_id", None) for c in scan.outputs]
    # the verdict goes into the box on top of Findings, not into the paste experiment's result below it
    assert "verdict" in outputs and "paste-result" not in outputs
    assert _endpoint(app, "paste_trigger").outputs[-1].elem_id == "paste-result"


def test_python_dash_m_forensics_is_the_cli(monkeypatch, capsys):
    import forensics.__main__ as entry  # importing it runs nothing
    from forensics.cli import main

    assert entry.main is main
    monkeypatch.setattr(sys, "argv", ["forensics", "--help"])
    with pytest.raises(SystemExit) as raised:
        runpy.run_path(entry.__file__, run_name="__main__")
    assert raised.value.code == 0 and "scan" in capsys.readouterr().out
