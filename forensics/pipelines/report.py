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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from forensics.core.models import atomic_write_text  # noqa: E402
from forensics.core.zeroshot import ASR_NOTE  # noqa: E402


def to_pil(image: torch.Tensor) -> Image.Image:
    """A 3 x H x W tensor in [0, 1] as a PIL image."""
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


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


def image_panels(image: torch.Tensor, masks: Sequence[np.ndarray], gradcam: torch.Tensor, occlusion: torch.Tensor,
                 title: str, hijack_box: Sequence[int] | None = None, true_box: Sequence[int] | None = None) -> plt.Figure:
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
    ax.bar(x + 0.2, captured, 0.4, label="captured by a small window", color=["#c33" if c in flagged else "#e99" for c in class_names])
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


def write_html(path: Path, title: str, summary: dict, sections: list[tuple[str, str]]) -> None:
    """One self-contained HTML page: a summary table, then titled sections of HTML (figures inline)."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}} img{{max-width:100%}}
.note{{color:#555;font-size:13px}} .pattern{{display:inline-block;margin:8px;text-align:center;font-size:12px}}</style></head>
<body><h1>{html.escape(title)}</h1><table>{rows}</table><p class="note">{html.escape(ASR_NOTE)}.</p>{body}</body></html>"""
    atomic_write_text(Path(path), page)


def figure_html(fig_or_image: Any, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_b64(fig_or_image)}">'


def table_html(rows: list[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
