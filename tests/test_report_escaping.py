"""report.html is served by the app, so every label, class name, file name, caption, note and model name in it
must be escaped text: hostile strings from a probe set or a model must not become markup (stored XSS)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import forensics.attribution
import forensics.core.zeroshot
from forensics.pipelines.report import (
    figure_html,
    scan_sections,
    table_html,
    trigger_patterns_html,
    write_compare_outputs,
    write_html,
    write_repair_html,
    write_scan_html,
)

LABEL = "flower<svg onload=alert(1)>"
BREAKOUT = '"><script>alert(1)</script>'
FILE = 'x"><img src=x onerror=alert(1)>.png'
CAPTION = "a caption</table><script>alert(2)</script>"
HOSTILE = [LABEL, BREAKOUT, FILE, CAPTION]

# the markup the report code itself builds, and nothing else
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "table", "tr", "th", "td"}
ALLOWED_TAGS |= {"p", "div", "img", "br", "ul", "li", "b"}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_inert(page: str, expected: list[str]) -> None:
    """No hostile markup in ``page``: only the report's own tags, no event handlers, only inline PNG images; and
    each of ``expected`` is there as visible (escaped) text."""
    lowered = page.lower()
    for bad in ("<svg", "<script", "<img src=x", "</table><script"):
        assert bad not in lowered, bad
    parser = _Tags()
    parser.feed(page)
    parser.close()
    for tag, attrs in parser.tags:
        assert tag in ALLOWED_TAGS, tag
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            assert name in ("alt", "src", "charset", "class"), (tag, name)
            if name == "src":
                assert (value or "").startswith("data:image/png;base64,"), value
    shown = "".join(parser.text)
    for text in expected:
        assert text in shown, text  # the text survives, shown as text
    if any("<svg" in text for text in expected):
        assert "&lt;svg" in page


def _figure() -> Image.Image:
    return Image.new("RGB", (4, 4), (10, 20, 30))


# --------------------------------------------------------------------------- the helpers


def test_table_html_escapes_headers_and_cells() -> None:
    rows = [{LABEL: BREAKOUT, "file": FILE, "caption": CAPTION}, {LABEL: 3, "file": None}]
    out = table_html(rows, [LABEL, "file", "caption"])
    assert_inert(out, HOSTILE)
    assert out.startswith("<table><tr><th>flower&lt;svg onload=alert(1)&gt;</th>")
    assert table_html([{1: "a"}], [1]) == "<table><tr><th>1</th></tr><tr><td>a</td></tr></table>"  # non-str keys


def test_figure_html_escapes_alt() -> None:
    out = figure_html(_figure(), FILE)
    assert_inert(out, [])
    assert 'alt="x&quot;&gt;&lt;img src=x onerror=alert(1)&gt;.png"' in out
    assert out.count("<img ") == 1


def test_write_html_escapes_title_summary_and_section_names(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(
        path,
        f"Scan of {BREAKOUT}",
        {LABEL: FILE, "caption": CAPTION},
        [(LABEL, table_html([{"label": LABEL}], ["label"])), (CAPTION, figure_html(_figure(), LABEL))],
    )
    page = path.read_text()
    assert_inert(page, HOSTILE + [f"Scan of {BREAKOUT}"])
    assert "<title>Scan of &quot;&gt;&lt;script&gt;" in page


def test_trigger_captions_are_escaped(tmp_path: Path) -> None:
    name = "trigger_0_flower<svg_onload=alert(1)>.png"  # the scan names pattern files after the label
    Image.new("RGB", (4, 4)).save(tmp_path / name.replace(".png", "_preview.png"), format="PNG")
    out = trigger_patterns_html(tmp_path, [{"label": LABEL, "pattern": name, "verified_asr": 0.5, "n_verified": 12}])
    assert_inert(out, [f"{LABEL}: verified flip rate 50% on 12 clean images"])
    assert trigger_patterns_html(tmp_path, []) == ""


# --------------------------------------------------------------------------- the scan page


def _scan_inputs(out: Path, n: int = 2, size: int = 16) -> tuple[dict, list[dict], list[str]]:
    class_names = [LABEL, BREAKOUT, "dog"]
    name = "trigger_0_flower<svg_onload=alert(1)>.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(out / name.replace(".png", "_preview.png"), format="PNG")
    mask = np.zeros((size, size), bool)
    mask[2:6, 2:6] = True
    records = [
        {
            "predicted": class_names[i % 2],
            "captured": i == 0,
            "discrepancy": 0.9 - 0.1 * i,
            "confidence": 0.8,
            "object_view_label": "dog",
            "regions": [SimpleNamespace(mask=mask)],
            "hijack_box": [1, 1, 5, 5],
        }
        for i in range(n)
    ]
    report = {
        "model": {"spec": f"model {BREAKOUT}", "sha256": "ab" * 32, "architecture": CAPTION},
        "probe": {"name": f"probe {LABEL}"},
        "oracle": {"name": "grid"},
        "flagged_labels": [
            {"label": LABEL, "score": 0.9, "captured": 1, "predicted": 1, "explanation": CAPTION},
        ],
        "triggers": [{"label": LABEL, "pattern": name, "verified_asr": 0.75, "n_verified": 4}],
        "victims": [
            {
                "index": 0,
                "image": FILE,
                "label": LABEL,
                "box": [1, 1, 5, 5],
                "grounded_label": BREAKOUT,
                "discrepancy": 0.9,
            }
        ],
        "metrics": {"seconds_total": 1.5, f"{LABEL} rate": 0.1},
    }
    return report, records, class_names


def test_scan_sections_escape_everything(tmp_path: Path) -> None:
    report, records, class_names = _scan_inputs(tmp_path)
    summary, sections = scan_sections(tmp_path, report, records, class_names, [figure_html(_figure(), "image 0")])
    write_html(tmp_path / "report.html", f"Backdoor scan of {report['model']['spec']}", summary, sections)
    page = (tmp_path / "report.html").read_text()
    assert_inert(page, HOSTILE + [f"{LABEL}: verified flip rate 75% on 4 clean images", f"{LABEL} rate"])


def test_write_scan_html_with_a_fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole page, Grad-CAM and the text embeddings faked (they need a real CLIP; only the HTML is tested)."""
    size = 16
    report, records, class_names = _scan_inputs(tmp_path, size=size)
    monkeypatch.setattr(forensics.core.zeroshot, "class_text_embeddings", lambda m, names, t: torch.zeros(len(names)))
    monkeypatch.setattr(
        forensics.attribution, "gradcam", lambda m, imgs, emb, targets: torch.rand(len(imgs), size, size)
    )
    findings = SimpleNamespace(
        artefacts={
            "records": records,
            "images": torch.rand(len(records), 3, size, size),
            "maps": torch.rand(2, size, size),
        },
        settings={},
    )
    probe = SimpleNamespace(class_names=class_names, trigger_box_at=lambda i, s: (0, 0, 4, 4) if i == 0 else None)
    write_scan_html(tmp_path, report, findings, SimpleNamespace(image_size=size), probe)
    page = (tmp_path / "report.html").read_text()
    assert_inert(
        page, HOSTILE + [f"{LABEL}: verified flip rate 75% on 4 clean images", f"Backdoor scan of model {BREAKOUT}"]
    )
    assert page.count('alt="image ') == len(records)  # the per-image panels are there


# --------------------------------------------------------------------------- the repair and comparison pages


def test_write_repair_html_escapes(tmp_path: Path) -> None:
    metrics = {
        "before": {"ca": 0.9, f"asr_{LABEL}": 0.8},
        "after": {"ca": 0.88, f"asr_{LABEL}": 0.1},
        "method": BREAKOUT,
        "samples_used": 10,
        "seconds": 2.0,
        "original_sha256": CAPTION,
    }
    write_repair_html(tmp_path / "report.html", f"model {LABEL}", metrics, f"images {CAPTION}", tmp_path / FILE)
    page = (tmp_path / "report.html").read_text()
    assert_inert(page, HOSTILE[:2] + [f"Repair of model {LABEL}", f"asr_{LABEL}", f"images {CAPTION}", FILE])


def test_write_compare_outputs_escapes(tmp_path: Path) -> None:
    key = "patch<svg onload=alert(1)>"

    def row(method: str, status: str = "ok") -> dict:
        return {
            "method": method,
            "status": status,
            "error": f"boom {CAPTION}" if status != "ok" else None,
            "ca_before": 0.9,
            "ca_after": 0.85 if status == "ok" else None,
            "asr_before": {key: 0.9},
            "asr_after": {key: 0.1} if status == "ok" else {},
            "clean_samples": 32,
            "samples_used": 32,
            "seconds": 1.0,
            "peak_mib": 10.0,
            "notes": [f"note {FILE}"],
        }

    report = {
        "model": f"model {BREAKOUT}",
        "sha256": "00" * 32,
        "probe": f"probe {LABEL}",
        "budget": 32,
        "held_out": 64,
        "seed": 0,
        "attacks": [{"key": key, "attack": "badnets", "target": LABEL, "origin": "known"}],
        "before": {"ca": 0.9, "asr": {key: 0.9}},
        "rows": [row(LABEL), row(BREAKOUT, status="error")],
        "note": "ASR note",
        "memory_note": f"memory {CAPTION}",
        "seconds": 3.0,
    }
    write_compare_outputs(tmp_path, report)
    page = (tmp_path / "report.html").read_text()
    expected = [
        f"Repair comparison: model {BREAKOUT}",
        f"{key} -> {LABEL}",
        f"ASR {key} after",
        f"error: boom {CAPTION}",
    ]
    expected += [f"{LABEL}: note {FILE}", f"{BREAKOUT}: note {FILE}", f"memory {CAPTION}"]
    assert_inert(page, expected)
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare.json").exists()


@pytest.mark.parametrize(
    "names", [["$\\frac{$", "apple"], ["a$x^2$b", "$", "under_score"], ["\\$\\mathrm{", "$$", "}{"]], ids=str
)
def test_class_names_are_drawn_as_plain_text_in_every_chart(names):
    """matplotlib parses `$...$` as TeX by default: a class named `$\\frac{` crashed drawing after a whole scan. Names
    are drawn as they are, whether the report saves the figure or Gradio does (its own savefig, outside ours)."""
    import io

    from forensics.pipelines.report import _png_b64, comparison_chart, flagged_chart

    records = [{"predicted": n, "captured": k == 0} for k, n in enumerate(names)]
    fig = flagged_chart(records, names, [names[0]])
    fig.savefig(io.BytesIO(), format="png")  # as gr.Plot saves it
    ticks = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == names and not any(t.get_parse_math() for t in ticks)
    assert _png_b64(fig)
    key = names[-1]  # an attack's key from the user's attack file
    rows = [{"method": n, "status": "ok", "ca_after": 0.5, "asr_after": {key: 0.1}} for n in names]
    report = {"rows": rows, "attacks": [{"key": key}], "before": {"ca": 0.6, "asr": {key: 0.9}}}
    chart = comparison_chart(report)
    assert [t.get_text() for t in chart.axes[0].get_xticklabels()] == names and _png_b64(chart)
