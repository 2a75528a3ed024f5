"""Detector settings reach every detector from the API, the CLI and scan-many; wrong names and types are one-line
errors before any work, never replaced by defaults; profiles and ``all`` come from the registry."""

from __future__ import annotations

import json

import pytest

from forensics.core.errors import ForensicsError
from forensics.core.settings import build_settings, parse_assignments
from forensics.detect import DETECTORS, ScanSettings, TriggerInversionSettings, all_detectors, detector_settings
from forensics.pipelines.scan import detector_names, scan, scan_settings
from tests.test_cli import assert_one_line_error, run_cli

TINY = {"families": "local", "batch_size": "4", "grid_points": "3", "held_out_images": "8"}


def test_all_is_every_registered_detector_in_run_order():
    assert detector_names("all") == detector_names(None) == all_detectors()
    assert set(all_detectors()) == set(DETECTORS.names())
    assert all_detectors()[:2] == ["oracle-guided", "trigger-inversion"]


def test_settings_are_typed_and_layered_defaults_profile_common_then_given():
    chosen, oracle = scan_settings(
        all_detectors(), None, {"trigger-inversion": {"steps": "5", "alignment_threshold": "none"}}, "quick"
    )
    inv = chosen["trigger-inversion"]
    quick = DETECTORS.get("trigger-inversion").profiles["quick"]
    assert inv.steps == 5 and inv.held_out_images == quick["held_out_images"] and inv.alignment_threshold is None
    assert chosen["oracle-guided"].proposals == DETECTORS.get("oracle-guided").profiles["quick"]["proposals"]
    # the oracle scan's seed and templates are every detector's
    chosen, _ = scan_settings(all_detectors(), ScanSettings(seed=7, templates="openai"), None, None)
    assert {s.seed for s in (chosen["trigger-inversion"], chosen["oracle-guided"])} == {7}
    assert chosen["embedding-density"].templates == "openai" and chosen["trigger-inversion"].templates == "openai"
    assert build_settings(TriggerInversionSettings, {"families": "local, global"}).families == ("local", "global")
    assert build_settings(ScanSettings, {"cascade": "yes", "window": 0.25}).cascade is True
    given = TriggerInversionSettings(steps=3)
    assert detector_settings(["trigger-inversion"], {"trigger_inversion": given})["trigger-inversion"] is given


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trigger-inversion": {"stepz": 5}}, "trigger-inversion: unknown setting 'stepz'; valid: families, steps"),
        ({"trigger-inversion": {"steps": "abc"}}, "trigger-inversion.steps must be an integer, got 'abc'"),
        ({"trigger-inversion": {"steps": 2.5}}, "trigger-inversion.steps must be an integer"),
        ({"trigger-inversion": {"steps": True}}, "trigger-inversion.steps must be an integer"),
        ({"trigger-inversion": {"steps": 0}}, "trigger-inversion.steps must be at least 1, got 0"),
        ({"trigger-inversion": {"flip_goal": "nan"}}, "flip_goal must be a number, got 'nan'"),
        ({"trigger-inversion": {"flip_goal": -1}}, "flip_goal must be at least 0"),
        ({"oracle-guided": {"cascade": "maybe"}}, "oracle-guided.cascade must be true or false"),
        ({"embedding-density": {"k": "ten"}}, "embedding-density.k must be an integer"),
        ({"nosuch": {"a": 1}}, "unknown detector 'nosuch'; valid detectors"),
        ({"trigger-inversion": 5}, "must be a mapping of setting -> value"),
    ],
)
def test_wrong_names_and_types_are_one_line_errors(options, message):
    with pytest.raises(ForensicsError, match="^[^\n]*$") as raised:
        scan_settings(all_detectors(), None, options)
    assert message in str(raised.value)


def test_settings_for_a_detector_that_does_not_run_and_unknown_profiles_are_refused():
    with pytest.raises(ForensicsError, match="'trigger-inversion', which this scan does not run"):
        scan_settings(["oracle-guided"], None, {"trigger-inversion": {"steps": 5}})
    with pytest.raises(ForensicsError, match="unknown detector profile 'fast'; valid: default, quick"):
        scan_settings(all_detectors(), None, None, "fast")
    with pytest.raises(ForensicsError, match=r"must look like NAME\.KEY=VALUE"):
        parse_assignments(["steps=5"], "--detector-setting")
    assert parse_assignments(["trigger-inversion.steps = 5", "a.b=c=d"], "x") == {
        "trigger-inversion": {"steps": "5"},
        "a": {"b": "c=d"},
    }


def test_a_bad_detector_setting_is_refused_before_any_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("forensics.pipelines.scan.resolve_model", lambda *a, **k: calls.append(a))
    with pytest.raises(ForensicsError, match="families must be among local, global"):
        scan("demo", "demo", detectors="trigger-inversion", detector_options={"trigger-inversion": {"families": "x"}})
    assert calls == []  # the model was never loaded
    out = tmp_path / "out"
    for setting, text in [
        ("trigger-inversion.stepz=5", "unknown setting 'stepz'"),
        ("nosuch.steps=5", "unknown detector 'nosuch'"),
        ("steps=5", "must look like NAME.KEY=VALUE"),
        ("trigger-inversion.steps=abc", "trigger-inversion.steps must be an integer, got 'abc'"),
    ]:
        assert_one_line_error(
            run_cli("scan", "demo", "--detector-setting", setting, "--out", str(out), check=False), text
        )
    assert_one_line_error(run_cli("scan", "demo", "--detector-profile", "x", "--out", str(out), check=False), "profile")
    assert not out.exists() and calls == []


def test_a_detector_setting_changes_what_the_inversion_does(tmp_path):
    """`scan --detector-setting trigger-inversion.steps=N`: the steps reach the fit (the report records them and
    the fitted triggers differ), and the oracle scan's flags from the command line still hold."""
    reports = {}
    for steps in ("1", "5"):
        out = tmp_path / steps
        args = ["scan", "demo", "--detectors", "trigger-inversion", "--max-images", "40", "--out", str(out)]
        args += ["--detector-setting", f"trigger-inversion.steps={steps}"]
        for key, value in TINY.items():
            args += ["--detector-setting", f"trigger-inversion.{key}={value}"]
        run_cli(*args)
        reports[steps] = json.loads((out / "report.json").read_text())
    one, five = reports["1"], reports["5"]
    assert one["detector_settings"]["trigger-inversion"]["steps"] == 1
    assert five["detector_settings"]["trigger-inversion"]["steps"] == 5
    assert five["detectors"]["trigger-inversion"]["settings"]["steps"] == 5
    curves = {
        s: [t["curve"] for t in r["detectors"]["trigger-inversion"]["label_evidence"]["local"]]
        for s, r in reports.items()
    }
    assert curves["1"] != curves["5"]


def test_the_workbench_passes_its_profile_and_settings_to_the_scan(monkeypatch):
    """The Investigate tab's profile and settings box reach the scan as the API takes them; a wrong line is the
    scan's one-line error in the page, before any work (the scan's own checks stand behind it)."""
    pytest.importorskip("gradio")
    import gradio as gr

    from forensics.core.settings import parse_assignment_text
    from forensics.ui import investigate_tab
    from forensics.ui.common import initial_state

    seen = {}

    class Stop(ForensicsError):
        pass

    def recording_scan(model, **kwargs):
        seen.update(kwargs)
        raise Stop("scan reached")

    monkeypatch.setattr(investigate_tab, "run_scan_outcome", recording_scan)
    text = "trigger-inversion.steps=5\n\noracle-guided.proposals=6; trigger-inversion.families=local,global"
    with pytest.raises(gr.Error, match="scan reached"):
        investigate_tab.scan(initial_state(), "demo", None, 20, "quick", text)
    assert seen["profile"] == "quick" and seen["detector_options"] == {
        "trigger-inversion": {"steps": "5", "families": "local,global"},
        "oracle-guided": {"proposals": "6"},
    }
    seen.clear()
    with pytest.raises(gr.Error) as raised:
        investigate_tab.scan(initial_state(), "demo", None, 20, "default", "steps=5")
    assert raised.value.message.startswith("detector settings 'steps=5' must look like NAME.KEY=VALUE")
    assert "\n" not in raised.value.message and seen == {}
    assert parse_assignment_text("", "x") == {} and parse_assignment_text(None, "x") == {}
    # the scan's own check of names and types is what the page shows for a well-formed but wrong setting
    monkeypatch.undo()
    with pytest.raises(gr.Error, match="trigger-inversion: unknown setting 'stepz'"):
        investigate_tab.scan(initial_state(), "demo", None, 20, "default", "trigger-inversion.stepz=5")
    with pytest.raises(gr.Error, match="unknown detector profile 'fast'"):
        investigate_tab.scan(initial_state(), "demo", None, 20, "fast", "")


def test_a_scan_too_small_for_some_detectors_writes_its_report_saying_why(tmp_path):
    """Ten images (the workbench's smallest scan): the inversion and the density detector cannot compare labels and
    are reported as skipped; the oracle's findings and the report are written all the same."""
    from forensics.pipelines.scan import write_scan

    outcome = scan("demo", "demo", max_images=10, profile="quick")
    write_scan(outcome, tmp_path / "scan")
    report = json.loads((tmp_path / "scan" / "report.json").read_text())
    evidence = report["verdict"]["evidence"]
    assert "needs at least 12 probe images" in evidence["trigger-inversion"]["skipped"]
    assert "needs at least 12 probe images" in evidence["embedding-density"]["skipped"]
    assert len(report["images"]) == 10 and (tmp_path / "scan" / "report.html").is_file()
    # a quick scan says so wherever its verdict is shown: the report, its reasons, the workbench's summary
    assert report["detector_profile"] == "quick" and "quick detector profile ran" in report["verdict"]["reasons"][-1]
    pytest.importorskip("gradio")
    from forensics.ui.investigate_tab import scan_outputs

    assert "quick profile: not calibrated" in scan_outputs(report, tmp_path / "scan")[0]


def test_a_probe_of_two_classes_skips_the_label_comparing_detectors_and_reports_why(tmp_path):
    """The same class of probe, too few classes rather than images: the inversion needs three labels to compare, the
    report says so and the verdict stands on the detectors that ran."""
    from forensics.core.data import ProbeSet, load_probe_set
    from forensics.pipelines.scan import write_scan

    demo = load_probe_set("demo")
    two = [it for it in demo.items if it.label in (0, 1)][:24]
    probe = ProbeSet("two-classes", two, list(demo.class_names[:2]))
    outcome = scan("demo", probe, detectors="oracle-guided,trigger-inversion", profile="quick")
    write_scan(outcome, tmp_path / "scan")
    report = json.loads((tmp_path / "scan" / "report.json").read_text())
    assert "3 classes" in report["verdict"]["evidence"]["trigger-inversion"]["skipped"]
    assert "skipped" not in report["verdict"]["evidence"]["oracle-guided"] and len(report["images"]) == 24
