"""Reports: ``report.json`` (findings, scores, hashes, settings, seeds, timings) and a self-contained ``report.html``.

Figures are drawn with matplotlib and embedded as base64 PNGs, so the HTML is one file that opens
anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
# Class names, titles and method names come from users and models: drawn as plain text, never parsed as TeX (a class
# named `$\frac{` crashed the report after a whole scan). Process-wide, since charts are also saved by Gradio.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from forensics.core.images import to_pil  # noqa: E402
from forensics.core.models import atomic_write_text  # noqa: E402
from forensics.core.zeroshot import ASR_NOTE  # noqa: E402


def _png_b64(fig_or_image: Any) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig_or_image)
    return base64.b64encode(buf.getvalue()).decode()


def mask_overlay(image: torch.Tensor, masks: Sequence[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """Oracle regions painted in distinct colours over the image."""
    base = image.detach().permute(1, 2, 0).cpu().numpy().copy()
    colours = plt.get_cmap("tab10")
    for k, mask in enumerate(masks):
        colour = np.array(colours(k % 10)[:3])
        base[mask] = (1 - alpha) * base[mask] + alpha * colour
    return Image.fromarray((base.clip(0, 1) * 255).round().astype(np.uint8))


def image_panels(
    image: torch.Tensor,
    masks: Sequence[np.ndarray],
    gradcam: torch.Tensor,
    occlusion: torch.Tensor,
    title: str,
    hijack_box: Sequence[int] | None = None,
    true_box: Sequence[int] | None = None,
) -> plt.Figure:
    """image | oracle masks | Grad-CAM | occlusion (discrepancy), with the localized and true trigger boxes."""
    from forensics.attribution import overlay

    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
    panels = [to_pil(image), mask_overlay(image, masks), overlay(image, gradcam), overlay(image, occlusion)]
    names = ["image", "oracle regions", "Grad-CAM", "estimated occlusion drop (where the prediction rests)"]
    for ax, panel, name in zip(axes, panels, names):
        ax.imshow(panel)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    for box, colour in ((true_box, "lime"), (hijack_box, "red")):
        if box:
            x0, y0, x1, y1 = box
            for ax in (axes[0], axes[3]):
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.5))
    fig.suptitle(title, fontsize=9)
    return fig


def flagged_chart(records: list[dict], class_names: Sequence[str], flagged: Sequence[str]) -> plt.Figure:
    """Per label: predictions, and how many of them a small non-object window captured."""
    predicted = [sum(r["predicted"] == c for r in records) for c in class_names]
    captured = [sum(r["predicted"] == c and r["captured"] for r in records) for c in class_names]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    x = np.arange(len(class_names))
    ax.bar(x - 0.2, predicted, 0.4, label="predicted", color="#9ab")
    ax.bar(
        x + 0.2,
        captured,
        0.4,
        label="captured by a small window",
        color=["#c33" if c in flagged else "#e99" for c in class_names],
    )
    ax.set_xticks(x, class_names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("Flagged labels (dark red)", fontsize=9)
    return fig


def before_after_chart(metrics: dict) -> plt.Figure:
    """CA and ASR before and after repair (every ASR entry present is drawn)."""
    keys = [k for k in metrics["before"] if metrics["before"].get(k) is not None and k.startswith(("ca", "asr"))]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [metrics["before"][k] for k in keys], 0.4, label="before", color="#c66")
    ax.bar(x + 0.2, [metrics["after"][k] for k in keys], 0.4, label="after", color="#6a6")
    ax.set_xticks(x, keys, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Before / after repair", fontsize=9)
    return fig


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _text(value: Any) -> str:
    """Any value as HTML text: labels, file names, captions and notes come from users and models (no stored XSS)."""
    return html.escape(str(value), quote=True)


def write_html(path: Path, title: str, summary: dict, sections: list[tuple[str, str]]) -> None:
    """One self-contained HTML page: a summary table, then titled sections of HTML (figures inline).

    ``title``, the summary and the section names are escaped here; each section's content is markup, so its
    builder must escape what it puts in (``table_html``, ``figure_html`` and ``_text`` do).
    """
    rows = "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in summary.items())
    body = "".join(f"<h2>{_text(name)}</h2>{content}" for name, content in sections)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_text(title)}</title>\n'
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222} "
        "table{border-collapse:collapse}\n"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px} img{max-width:100%}\n"
        ".note{color:#555;font-size:13px} "
        ".pattern{display:inline-block;margin:8px;text-align:center;font-size:12px} .small img{width:96px} "
        ".plot{margin:8px 0;font-size:12px}</style></head>\n"
        f"<body><h1>{_text(title)}</h1><table>{rows}</table>"
        f'<p class="note">{_text(ASR_NOTE)}.</p>{body}</body></html>'
    )
    atomic_write_text(Path(path), page)


def figure_html(fig_or_image: Any, alt: str = "") -> str:
    """A matplotlib figure (closed here) or PIL image as an inline PNG ``<img>``; ``alt`` is escaped."""
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{_png_b64(fig_or_image)}">'


def table_html(rows: list[dict], columns: Sequence[str]) -> str:
    """An HTML table of ``rows`` (dicts) in ``columns`` order; every header and cell is escaped text."""
    head = "".join(f"<th>{_text(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_text(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# --------------------------------------------------------------------------- the scan's report

PANELS = 12  # per-image panels in the HTML report (most discrepant first, then the top victims)


def write_scan_html(out: Path, report: dict, findings: Any, model: Any, probe_set: Any) -> None:
    """report.html of a scan: flagged labels, trigger candidates, victims, metrics and the most discrepant images."""
    from forensics.attribution import gradcam
    from forensics.core.zeroshot import class_text_embeddings

    artefacts = findings.artefacts
    records, images, maps = artefacts.get("records", []), artefacts.get("images"), artefacts.get("maps")
    class_names = probe_set.class_names
    order = sorted(range(len(records)), key=lambda i: -records[i]["discrepancy"])[:PANELS]
    class_emb = class_text_embeddings(model, class_names, findings.settings.get("templates", "short"))
    targets = [class_names.index(records[i]["predicted"]) for i in order]
    cams = gradcam(model, images[order], class_emb, targets) if order else []
    panels = []
    for k, i in enumerate(order):
        r = records[i]
        true_box = probe_set.trigger_box_at(i, model.image_size)
        title = (
            f"#{i}: CLIP says '{r['predicted']}' ({r['confidence']:.2f}); objects say '{r['object_view_label']}'; "
            f"discrepancy {r['discrepancy']:.2f}{' — captured' if r['captured'] else ''}"
        )
        fig = image_panels(
            images[i],
            [reg.mask for reg in r["regions"]],
            cams[k],
            maps[i],
            title,
            r["hijack_box"] if r["captured"] else None,
            true_box,
        )
        panels.append(figure_html(fig, f"image {i}"))
    summary, sections = scan_sections(out, report, records, class_names, panels)
    write_html(out / "report.html", f"Backdoor scan of {report['model']['spec']}", summary, sections)


def trigger_patterns_html(out: Path, triggers: Sequence[dict]) -> str:
    """The trigger candidates as preview images (read from ``out``) with escaped captions; "" when there are none."""
    return "".join(
        '<div class="pattern"><img src="data:image/png;base64,'
        f'{_b64_file(out / t["pattern"].replace(".png", "_preview.png"))}"><br>'
        f"{_text(t['label'])}: verified flip rate {t['verified_asr']:.0%} "
        f"on {_text(t['n_verified'])} clean images</div>"
        for t in triggers
    )


def scan_sections(
    out: Path, report: dict, records: list[dict], class_names: Sequence[str], panels: Sequence[str]
) -> tuple[dict, list[tuple[str, str]]]:
    """The scan page's summary and sections around the already drawn per-image ``panels`` (``figure_html`` each);
    apart from ``write_scan_html`` so the page can be built, and its escaping checked, without a model."""
    flagged = [f["label"] for f in report["flagged_labels"]]
    patterns = trigger_patterns_html(out, report["triggers"])
    metrics = {k: v for k, v in report["metrics"].items()}
    verdict = report.get("verdict") or {}
    summary = {
        "verdict": verdict.get("verdict", "not merged"),
        "target": verdict.get("target") or "none",
        "trigger family": verdict.get("family") or "none",
        "model": report["model"]["spec"],
        "SHA-256": report["model"]["sha256"],
        "architecture": report["model"]["architecture"],
        "probe set": report["probe"]["name"],
        "oracle": report["oracle"]["name"],
        "flagged labels": ", ".join(flagged) or "none",
        "victims": len(report["victims"]),
        "seconds": metrics.get("seconds_total"),
    }
    sections = [verdict_section(out, report)] if verdict else []
    sections += [
        (
            "Flagged labels (oracle-guided scan)",
            figure_html(flagged_chart(records, class_names, flagged))
            + (
                table_html(report["flagged_labels"], ["label", "score", "captured", "predicted", "explanation"])
                if flagged
                else "<p>No label is flagged: no label collects predictions that a small non-object window decides.</p>"
            ),
        ),
        ("Trigger candidates", patterns or "<p>None.</p>"),
        (
            "Victims",
            table_html(report["victims"][:50], ["index", "image", "label", "box", "grounded_label", "discrepancy"]),
        ),
        ("Metrics", table_html([metrics], list(metrics))),
        (
            "Images (most discrepant first): image | oracle regions | Grad-CAM | estimated occlusion drop; "
            "red = localized trigger, green = true trigger",
            "".join(panels),
        ),
    ]
    return summary, sections


def flagged_words(evidence: dict) -> str:
    """One detector's flagged labels with their scores (its hijacked labels too), or why it did not run."""
    flagged = ", ".join(f"{f['label']} ({f['score']})" for f in evidence.get("flagged", []))
    hijacked = ", ".join(c["label"] for c in evidence.get("hijacked", []))
    parts = [flagged, f"hijacked: {hijacked}" if hijacked else ""]
    return "; ".join(p for p in parts if p) or evidence.get("skipped", "none")


THRESHOLD_WORDS = {  # key -> (what it measures, the side a flag lies on)
    "anomaly": ("anomaly index", ">="),
    "alignment": ("alignment with the label's own images", "<="),
    "uniqueness": ("next label's trigger size over this one", ">="),
    "victim_z": ("density z of a victim", ">="),
    "label": ("label anomaly", ">="),
    "min_sources": ("classes feeding a cluster", ">="),
    "max_source_share": ("share of a cluster from one class", "<="),
    "cluster_alignment": ("cluster alignment with the label's own images", "<="),
    "verified_flip": ("rebuilt trigger's flip rate to verify a flag", ">="),
    "refuted_flip": ("flip rate below which a flag is refuted", "<"),
}


def threshold_words(thresholds: Any) -> str:
    """A detector's thresholds as readable text (``anomaly index >= 2; alignment ... <= 0.46``), not a raw dict;
    keys it does not know are shown as ``key = value``."""
    if not thresholds:
        return ""
    if not isinstance(thresholds, dict):
        return str(thresholds)
    parts = []
    for key, value in thresholds.items():
        if isinstance(value, dict):
            parts.append(f"{key}: {threshold_words(value)}")
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        what, side = THRESHOLD_WORDS.get(key, (key, "="))
        parts.append(f"{what} {side} {shown}")
    return "; ".join(parts)


def _picture_html(out: Path, name: str | None, caption: str, css: str = "pattern") -> str:
    """A picture written under ``out`` as an inline PNG with its caption (both escaped); "" when it is not there."""
    path = out / str(name or "")
    if not name or not path.is_file():
        return ""
    return (
        f'<div class="{css}"><img alt="{_text(caption)}" src="data:image/png;base64,{_b64_file(path)}"><br>'
        f"{_text(caption)}</div>"
    )


def verdict_section(out: Path, report: dict) -> tuple[str, str]:
    """The verdict on top: the answer in plain words, why, the triggers at work on a clean image (else the best
    trigger's pattern), each detector's evidence with its thresholds in words and its per-label scores against
    them, and the victims with their trigger box."""
    from forensics.pipelines.summary import plain_verdict

    verdict = report["verdict"]
    pictures = report.get("pictures") or {}
    trigger = verdict.get("trigger")
    parts = [f"<p>{_text(plain_verdict(report, markdown=False))}</p>"]
    parts.append(
        f"<p><b>{_text(verdict['verdict'])}</b>"
        + (f": target {_text(verdict['target'])}" if verdict.get("target") else "")
        + (f", {_text(verdict['family'])} trigger" if verdict.get("family") else "")
        + "</p>"
    )
    parts.append("<ul>" + "".join(f"<li>{_text(r)}</li>" for r in verdict.get("reasons", [])) + "</ul>")
    shown = "".join(_picture_html(out, t.get("file"), t.get("caption", "")) for t in pictures.get("triggers", []))
    if shown:
        parts.append(f"<p>Each trigger on a clean probe image: the image, the trigger, the image stamped.</p>{shown}")
    elif trigger:
        caption = (
            f"{trigger.get('method', '')}: verified flip rate {float(trigger['verified_asr']):.0%} on "
            f"{trigger['n_verified']} held-out clean images"
        )
        parts.append(_picture_html(out, trigger.get("pattern"), caption, "pattern small"))
    rows = []
    for name, evidence in verdict.get("evidence", {}).items():
        rows.append(
            {
                "detector": name,
                "flagged (score)": flagged_words(evidence),
                "thresholds": threshold_words(evidence.get("thresholds")),
                "seconds": evidence.get("seconds"),
            }
        )
    parts.append(table_html(rows, ["detector", "flagged (score)", "thresholds", "seconds"]))
    parts.append(
        "".join(
            _picture_html(out, f, f"{name}: per-label score against its clean-calibrated threshold (dashed)", "plot")
            for name, f in pictures.get("scores", {}).items()
        )
    )
    if not shown:
        for t in report.get("detectors", {}).get("trigger-inversion", {}).get("inverted_triggers", []):
            caption = (
                f"{t['label']} ({t['stats'].get('family')}): flip {float(t['verified_asr']):.0%}, "
                f"anomaly {t['stats'].get('anomaly')}, alignment {t['stats'].get('alignment')}"
            )
            parts.append(_picture_html(out, t.get("pattern"), caption, "pattern small"))
    if verdict.get("victims"):
        grid = pictures.get("victims_grid")
        parts.append(_picture_html(out, grid, "the victims, with the trigger's box in red", "plot"))
        parts.append(table_html(verdict["victims"][:50], ["index", "image", "label", "box", "found_by"]))
    return "Verdict", "".join(parts)


def _b64_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


# --------------------------------------------------------------------------- the repair's report


def write_repair_html(path: Path, model_name: str, metrics: dict, where: str, model_path: Path | str) -> None:
    """report.html of a repair: CA/ASR before and after, as a chart and a table."""
    before, after = metrics["before"], metrics["after"]
    rows = [
        {"": "before", **{k: round(v, 4) for k, v in before.items() if v is not None}},
        {"": "after", **{k: round(v, 4) for k, v in after.items() if v is not None}},
    ]
    write_html(
        path,
        f"Repair of {model_name}",
        {
            "method": metrics["method"],
            "samples used": metrics["samples_used"],
            "seconds": metrics["seconds"],
            "evaluated on": where,
            "original SHA-256": metrics["original_sha256"],
            "repaired model": str(model_path),
        },
        [("Before / after", figure_html(before_after_chart(metrics)) + table_html(rows, list(rows[0])))],
    )


# --------------------------------------------------------------------------- the comparison's report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(report: dict) -> tuple[list[dict], list[str]]:
    """The comparison as flat rows of formatted cells, and the column order (shared by compare.md and report.html)."""
    keys = [a["key"] for a in report["attacks"]]
    columns = (
        ["method", "CA before", "CA after"]
        + [f"ASR {k} {w}" for k in keys for w in ("before", "after")]
        + ["clean samples", "repair samples", "seconds", "peak MiB", "status"]
    )
    flat = []
    for r in report["rows"]:
        cells = {
            "method": r["method"],
            "CA before": _fmt(r["ca_before"]),
            "CA after": _fmt(r["ca_after"]),
            "clean samples": _fmt(r["clean_samples"]),
            "repair samples": _fmt(r["samples_used"]),
            "seconds": _fmt(r["seconds"], 1),
            "peak MiB": _fmt(r["peak_mib"], 1),
            "status": "ok" if r["status"] == "ok" else f"error: {r['error']}",
        }
        for k in keys:
            cells[f"ASR {k} before"] = _fmt(r["asr_before"].get(k))
            cells[f"ASR {k} after"] = _fmt(r["asr_after"].get(k))
        flat.append(cells)
    return flat, columns


def comparison_chart(report: dict):
    """CA and each ASR after repair, per method, with the values before repair as dashed lines."""
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    keys = ["ca"] + [a["key"] for a in report["attacks"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ok) + 2), 3))
    width = 0.8 / len(keys)
    x = np.arange(len(ok))
    colours = plt.get_cmap("tab10")
    for j, key in enumerate(keys):
        values = [r["ca_after"] if key == "ca" else r["asr_after"].get(key) for r in ok]
        label = "CA" if key == "ca" else f"ASR {key}"
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, [v or 0 for v in values], width, label=label, color=colours(j))
        before = report["before"]["ca"] if key == "ca" else report["before"]["asr"].get(key)
        if before is not None:
            ax.axhline(before, color=colours(j), ls="--", lw=1)
    ax.set_xticks(x, [r["method"] for r in ok], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("After repair (bars) vs before (dashed lines)", fontsize=9)
    return fig


def write_compare_outputs(out: Path, report: dict) -> None:
    """compare.json, compare.md (one markdown table) and report.html (chart + table), each written atomically."""
    write_json(out / "compare.json", report)
    flat, columns = table_rows(report)
    lines = [
        f"# Repair comparison: {report['model']}",
        "",
        f"Probe `{report['probe']}`: {report['budget']} clean budget images (seed {report['seed']}), "
        f"CA/ASR on {report['held_out']} held-out clean images.",
        "",
    ]
    for a in report["attacks"]:
        lines.append(f"- ASR `{a['key']}`: {a['attack']} -> {a['target']} ({a['origin']})")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c[col]).replace("|", "/") for col in columns) + " |" for c in flat]
    notes = [f"- {r['method']}: {n}" for r in report["rows"] for n in r["notes"]]
    lines += ["", f"{report['note']}.", f"{report['memory_note']}."] + ([""] + notes if notes else [])
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    write_html(
        out / "report.html",
        f"Repair comparison: {report['model']}",
        {
            "model": report["model"],
            "SHA-256": report["sha256"],
            "probe": report["probe"],
            "clean budget": report["budget"],
            "held-out images": report["held_out"],
            "seed": report["seed"],
            "triggers": ", ".join(f"{a['key']} -> {a['target']}" for a in report["attacks"]) or "none known",
            "seconds": report["seconds"],
        },
        [
            (
                "Defenses compared",
                figure_html(comparison_chart(report), "comparison chart") + table_html(flat, columns),
            ),
            (
                "Notes",
                f"<p class='note'>{_text(report['memory_note'])}.</p><ul>"
                + "".join(f"<li>{_text(n[2:])}</li>" for n in notes)
                + "</ul>",
            ),
        ],
    )
