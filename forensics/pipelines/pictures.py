"""The scan's pictures, for the Findings tab and report.html alike: each trigger on a clean image, the victims with
their trigger box, and each detector's per-label score against its threshold.

A raw inverted trigger is a grey square with a few dots; what it *does* is what a reader wants: so each trigger is
drawn beside a clean probe image and the same image stamped with it, with the model's answer on both. Those need
the model and the trigger tensors, so :func:`scan_pictures` draws them from the scan in memory and
:func:`~forensics.pipelines.scan.write_scan` saves them under ``pictures/`` with an index in report.json
(``report["pictures"]``); :func:`pictures_from_report` lists them for a report read back later, and falls back to the
written pattern files when a report has no pictures. The score plots are drawn from report.json alone
(:func:`score_figures`), so a report read back gets them too.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from forensics.core.images import paste, to_pil
from forensics.core.zeroshot import class_text_embeddings, predict
from forensics.pipelines.report import plt  # matplotlib, Agg, class names drawn as plain text

MAX_TRIGGERS = 6  # trigger pictures drawn (the verdict's first)
MAX_VICTIMS = 60  # victims drawn with their box (the Findings gallery's size)
GRID_VICTIMS = 24  # victims in report.html's grid
GRID_COLUMNS = 8
BOX_COLOUR = (230, 30, 30)


@dataclass
class TriggerPicture:
    """One trigger shown at work: a clean probe image, the trigger, the image stamped; the model's answer on each."""

    label: str  # the label the trigger is said to send images to
    source: str  # where it comes from, in words
    verified_asr: float  # its flip rate on held-out clean images of other classes
    image_index: int  # the clean probe image used
    before: str
    before_p: float
    after: str
    after_p: float
    file: str = ""  # under the scan folder, once written

    def caption(self) -> str:
        flips = "flips" if self.after != self.before else "does not flip"
        return (
            f"{self.source} for '{self.label}' (flips {self.verified_asr:.0%} of held-out clean images): image "
            f"#{self.image_index} is '{self.before}' ({self.before_p:.2f}), stamped '{self.after}' "
            f"({self.after_p:.2f}): it {flips}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "caption": self.caption()}


@dataclass
class ScanPictures:
    """The pictures of one scan: file name (under the scan folder) -> image, and the index report.json keeps."""

    files: dict[str, Image.Image] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- drawing helpers


def figure_image(fig: Any, dpi: int = 100) -> Image.Image:
    """A matplotlib figure as a PIL image (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def boxed(image: torch.Tensor, box: Sequence[int] | None, scale: int = 1) -> Image.Image:
    """The image (3 x S x S in [0, 1]) with ``box`` (x0, y0, x1, y1 in its pixels) drawn in red, enlarged ``scale``
    times (nearest neighbour: the trigger's pixels stay visible)."""
    picture = to_pil(image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if box:
        x0, y0, x1, y1 = (int(v) * scale for v in box)
        width = max(2, picture.width // 50)  # thick and just outside the trigger, so a thumbnail still shows it
        outline = (x0 - 2 * width, y0 - 2 * width, x1 + 2 * width - 1, y1 + 2 * width - 1)
        ImageDraw.Draw(picture).rectangle(outline, outline=BOX_COLOUR, width=width)
    return picture


def trigger_figure(clean: torch.Tensor, trigger: torch.Tensor, stamped: torch.Tensor, shown: TriggerPicture) -> Any:
    """Three panels: the clean image with the model's answer, the trigger, the stamped image with the answer."""
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.6))
    panels = [
        (clean, f"clean: {shown.before} ({shown.before_p:.2f})"),
        (trigger, "the trigger"),
        (stamped, f"stamped: {shown.after} ({shown.after_p:.2f})"),
    ]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(to_pil(image), interpolation="nearest")
        ax.set_title(title, fontsize=8, color="#b00" if image is stamped and shown.after != shown.before else "black")
        ax.axis("off")
    fig.suptitle(f"{shown.source} for '{shown.label}': flips {shown.verified_asr:.0%} of held-out images", fontsize=8)
    return fig


def victims_grid(images: torch.Tensor, victims: Sequence[dict], columns: int = GRID_COLUMNS) -> Image.Image:
    """Up to :data:`GRID_VICTIMS` victims in a grid, each with its trigger box (when one was found) and its index and
    label above it (drawn with Pillow: a figure of two dozen panels took seconds)."""
    shown = list(victims)[:GRID_VICTIMS]
    tiles = [boxed(images[v["index"]], v.get("box"), scale=1) for v in shown]
    side = max((t.width for t in tiles), default=64)
    font = ImageFont.load_default(size=11)
    head, pad = 16, 6
    rows = max(1, -(-len(tiles) // columns))
    grid = Image.new("RGB", (columns * (side + pad) + pad, 22 + rows * (side + head + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 4), "Victims: the trigger's box in red (none: found by their embeddings)", fill="black", font=font)
    for k, (tile, v) in enumerate(zip(tiles, shown)):
        x, y = pad + (k % columns) * (side + pad), 22 + (k // columns) * (side + head + pad)
        draw.text((x, y), f"#{v['index']}: {v.get('label', '')}"[:24], fill="black", font=font)
        grid.paste(tile, (x, y + head))
    return grid


# --------------------------------------------------------------------------- triggers at work


def _stamp_patch(image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """A reconstructed patch pasted at the bottom-right corner, as the Findings tab's paste experiment does."""
    size, (h, w) = image.shape[-1], patch.shape[1:]
    margin = max(1, size // 32)
    x, y = max(0, size - w - margin), max(0, size - h - margin)
    return paste(image, patch[:, : size - y, : size - x], (x, y, min(size, x + w), min(size, y + h)))


def _clean_image(
    predicted: Sequence[int], labels: Sequence[int | None], target: int, avoid: set[int], seed: int
) -> int:
    """A clean probe image to stamp: in a seeded order, the first one the model gets right (when the probe names its
    class) whose class is not the target and that no detector called a victim."""
    order = np.random.default_rng(seed).permutation(len(predicted)).tolist()
    fits = [i for i in order if i not in avoid and predicted[i] != target]
    right = [i for i in fits if labels[i] is None or labels[i] == predicted[i]]
    return (right or fits or order)[0]


def trigger_pictures(
    outcome: Any, images: torch.Tensor, predicted: torch.Tensor | None = None
) -> list[tuple[TriggerPicture, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each trigger the scan holds in memory, at work on a clean probe image (``images``: the probe at the model's
    size; ``predicted``: the model's labels for them, when a detector kept them): the victims' shared trigger, the
    inversion's triggers, the oracle scan's reconstructed patches (at most :data:`MAX_TRIGGERS`). Returns
    (picture record, clean image, trigger picture, stamped image) each."""
    model, probe = outcome.model, outcome.probe
    names = list(probe.class_names)
    triggers: list[tuple[str, str, float, torch.Tensor, Any]] = []  # label, source, rate, picture, stamp
    if outcome.victim_trigger is not None:
        vt = outcome.victim_trigger
        shared = (vt.trigger.label, "the trigger the victims share", vt.trigger.verified_asr)
        triggers.append((*shared, vt.pattern.picture().cpu(), vt.pattern.apply))
    inversion = (outcome.results or {}).get("trigger-inversion")
    if inversion is not None and "inverted_patterns" in inversion.artefacts:
        for t in inversion.inverted:
            pattern = inversion.artefacts["inverted_patterns"].get(t.stats.get("key"))
            if pattern is not None:
                source = f"inverted {t.stats.get('family', '')} trigger".replace("  ", " ")
                triggers.append((t.label, source, t.verified_asr, pattern.picture().cpu(), pattern.apply))
    saved = outcome.findings.artefacts.get("patterns") or {}
    for t in outcome.report.get("triggers", []):
        patch = saved.get(t["pattern"], {}).get("pattern")
        if patch is not None:
            patch = patch.detach().float().cpu().clamp(0, 1)
            stamp = lambda x, p=patch: torch.stack([_stamp_patch(i, p) for i in x])  # noqa: E731
            triggers.append((t["label"], "patch rebuilt from the victims' crops", t["verified_asr"], patch, stamp))
    triggers = triggers[:MAX_TRIGGERS]
    if not triggers:
        return []
    images = images.cpu()
    class_emb = class_text_embeddings(model, names, "short")
    records = outcome.findings.artefacts.get("records") or []
    if predicted is None and len(records) == len(images):  # the oracle scan's own predictions
        predicted = torch.tensor([names.index(r["predicted"]) for r in records])
    if predicted is None:
        predicted = predict(model, images.to(model.device), class_emb).argmax(-1)
    predicted = [int(v) for v in predicted]
    labels = [it.label for it in probe.items]
    victims = {int(v["index"]) for v in (outcome.report.get("verdict") or {}).get("victims", [])}
    victims |= {int(v["index"]) for v in outcome.report.get("victims", [])}
    out = []
    for label, source, rate, picture, stamp in triggers:
        target = names.index(label) if label in names else -1
        k = _clean_image(predicted, labels, target, victims, int(outcome.report.get("seed", 0)))
        clean = images[k]
        with torch.no_grad():
            stamped = stamp(clean[None].to(model.device))[0].detach().cpu().clamp(0, 1)
        probs = predict(model, torch.stack([clean, stamped]).to(model.device), class_emb)
        (p0, y0), (p1, y1) = (probs[0].max(0), probs[1].max(0))
        shown = TriggerPicture(label, source, float(rate), k, names[int(y0)], float(p0), names[int(y1)], float(p1))
        out.append((shown, clean, picture, stamped))
    return out


# --------------------------------------------------------------------------- each detector's scores


def oracle_label_scores(report: dict) -> tuple[list[str], list[float], list[float]] | None:
    """The oracle-guided scan's per-label score and cut, from report.json: captured predictions per label, and the
    count a label needs to be flagged (at least ``min_flag_count`` and ``min_flag_share`` of the images, and
    ``flag_ratio`` times the median other label's count plus one). Images a cascade left unexamined count as not
    captured here (the scan imputes its sample's rate)."""
    images, settings = report.get("images") or [], report.get("settings") or {}
    names = (report.get("probe") or {}).get("classes") or []
    if not images or not names or "flag_ratio" not in settings:
        return None
    captured = [sum(1 for r in images if r["predicted"] == c and r.get("captured")) for c in names]
    floor = max(settings.get("min_flag_count", 0), settings.get("min_flag_share", 0) * len(images))
    cuts = []
    for k in range(len(names)):
        others = captured[:k] + captured[k + 1 :]
        cuts.append(max(floor, settings["flag_ratio"] * (float(np.median(others)) + 1.0) if others else floor))
    return list(names), [float(c) for c in captured], cuts


def _bars(ax: Any, names: Sequence[str], values: Sequence[float], flagged: set[str], title: str) -> None:
    x = np.arange(len(names))
    ax.bar(x, values, 0.6, color=["#c33" if n in flagged else "#9ab" for n in names])
    ax.set_xticks(x, names, rotation=40, ha="right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def score_figures(report: dict) -> dict[str, Any]:
    """Per detector that ran, a small plot of its per-label score against its clean-calibrated threshold (dashed),
    flagged labels in red; drawn from report.json alone."""
    figures: dict[str, Any] = {}
    verdict = report.get("verdict") or {}
    evidence = verdict.get("evidence") or {}
    flagged = {name: {f["label"] for f in e.get("flagged", [])} for name, e in evidence.items()}
    oracle = oracle_label_scores(report) if "oracle-guided" in evidence else None
    if oracle:
        names, captured, cuts = oracle
        fig, ax = plt.subplots(figsize=(5.2, 2.6))
        _bars(ax, names, captured, flagged.get("oracle-guided", set()), "oracle-guided: captured predictions per label")
        ax.scatter(np.arange(len(names)), cuts, marker="_", s=300, color="black", label="flag cut (per label)")
        ax.legend(fontsize=7)
        figures["oracle-guided"] = fig
    detectors = report.get("detectors") or {}
    inversion = detectors.get("trigger-inversion") or {}
    per_family = inversion.get("label_evidence") or {}
    cuts = (inversion.get("metrics") or {}).get("thresholds") or {}
    if per_family and "anomaly" in cuts:
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 2.8))
        names = list(dict.fromkeys(r["label"] for rows in per_family.values() for r in rows))
        width = 0.8 / max(1, len(per_family))
        for j, (family, rows) in enumerate(per_family.items()):
            by = {r["label"]: r for r in rows}
            x = np.arange(len(names)) + (j - (len(per_family) - 1) / 2) * width
            anomaly = [by[n].get("anomaly", 0.0) if n in by else 0.0 for n in names]
            axes[0].bar(x, anomaly, width, label=family)
            aligned = [(i, by[n]["alignment"]) for i, n in enumerate(names) if n in by and by[n].get("alignment")]
            axes[1].scatter([x[i] for i, _ in aligned], [a for _, a in aligned], s=14, label=family)
        axes[0].axhline(cuts["anomaly"], ls="--", color="black", lw=1, label=f"cut {cuts['anomaly']:g}")
        axes[0].set_title("trigger-inversion: anomaly index (flag: above the cut)", fontsize=8)
        if "alignment" in cuts:
            axes[1].axhline(cuts["alignment"], ls="--", color="black", lw=1, label=f"cut {cuts['alignment']:g}")
        axes[1].set_title("alignment with the label's own images (flag: below)", fontsize=8)
        for ax in axes:
            ax.set_xticks(np.arange(len(names)), names, rotation=40, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=6)
        figures["trigger-inversion"] = fig
    density = detectors.get("embedding-density") or {}
    labels = (density.get("label_evidence") or {}).get("labels") or []
    cuts = (density.get("metrics") or {}).get("thresholds") or {}
    if labels and "label" in cuts:
        clusters = [c for c in (density.get("label_evidence") or {}).get("clusters", []) if c.get("alignment")]
        fig, axes = plt.subplots(1, 2 if clusters else 1, figsize=(8.4 if clusters else 5.2, 2.6), squeeze=False)
        names = [r["label"] for r in labels]
        title = "embedding-density: dense-image anomaly per label"
        _bars(axes[0][0], names, [r["anomaly"] for r in labels], flagged.get("embedding-density", set()), title)
        axes[0][0].axhline(cuts["label"], ls="--", color="black", lw=1, label=f"cut {cuts['label']:g}")
        axes[0][0].legend(fontsize=7)
        if clusters:
            hijacked = {c["label"] for c in clusters if c.get("hijacked")}
            title = "dense clusters: alignment with the label's own images (flag: below)"
            _bars(axes[0][1], [c["label"] for c in clusters], [c["alignment"] for c in clusters], hijacked, title)
            if "cluster_alignment" in cuts:
                cut = cuts["cluster_alignment"]
                axes[0][1].axhline(cut, ls="--", color="black", lw=1, label=f"cut {cut:g}")
                axes[0][1].legend(fontsize=7)
        figures["embedding-density"] = fig
    return figures


# --------------------------------------------------------------------------- one scan's pictures


def _file_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:40] or "x"


def scan_pictures(outcome: Any, images: torch.Tensor, predicted: torch.Tensor | None = None) -> ScanPictures:
    """Every picture of a scan in memory (``images``, ``predicted``: as :func:`trigger_pictures` takes them), with
    the index report.json keeps under ``pictures``: the triggers at work (``triggers``: file and caption each), the
    victims with their box (``victims``: file and caption each, and ``victims_grid``), the detectors' score plots
    (``scores``: detector -> file)."""
    out = ScanPictures(index={"triggers": [], "victims": [], "victims_grid": None, "scores": {}})
    for k, (shown, clean, picture, stamped) in enumerate(trigger_pictures(outcome, images, predicted)):
        shown.file = f"pictures/trigger_{k}_{_file_name(shown.label)}.png"
        out.files[shown.file] = figure_image(trigger_figure(clean, picture, stamped, shown))
        out.index["triggers"].append(shown.to_dict())
    victims = (outcome.report.get("verdict") or {}).get("victims") or [
        {**v, "found_by": ["oracle-guided"]} for v in outcome.report.get("victims", [])
    ]
    if victims:
        images = images.cpu()
        for v in victims[:MAX_VICTIMS]:
            name = f"pictures/victims/victim_{int(v['index']):05d}.png"
            out.files[name] = boxed(images[v["index"]], v.get("box"), scale=2)
            found = ", ".join(v.get("found_by") or [])
            caption = f"#{v['index']} → {v.get('label', '')}" + (f" (found by {found})" if found else "")
            out.index["victims"].append({"file": name, "caption": caption, "index": int(v["index"])})
        out.files["pictures/victims.png"] = victims_grid(images, victims)
        out.index["victims_grid"] = "pictures/victims.png"
    for name, fig in score_figures(outcome.report).items():
        file = f"pictures/scores_{_file_name(name)}.png"
        out.files[file] = figure_image(fig)
        out.index["scores"][name] = file
    return out


def pictures_from_report(report: dict, folder: str | Path) -> dict[str, list[tuple[str, str]]]:
    """(path, caption) lists of a written scan's pictures (``triggers``, ``victims``, ``scores``, ``grid``) for a
    front end: the files report.json's ``pictures`` names that exist; a report without them (an older one, read
    back) gets the trigger pattern files it names instead, and the victims' own images."""
    folder = Path(folder)
    index = report.get("pictures") or {}

    def there(name: str | None) -> bool:
        return bool(name) and (folder / str(name)).is_file()

    triggers = [(str(folder / t["file"]), t["caption"]) for t in index.get("triggers", []) if there(t.get("file"))]
    if not index:
        named = [*(report.get("detectors", {}).get("trigger-inversion", {}).get("inverted_triggers", []))]
        trigger = (report.get("verdict") or {}).get("trigger") or {}
        if trigger.get("detector") == "victims":
            named.insert(0, trigger)
        triggers = [
            (str(folder / t["pattern"]), f"{t['label']}: flips {float(t['verified_asr']):.0%} (the pattern alone)")
            for t in named
            if there(t.get("pattern"))
        ]
        triggers += [
            (str(folder / t["pattern"].replace(".png", "_preview.png")), f"{t['label']}: flips {t['verified_asr']:.0%}")
            for t in report.get("triggers", [])
            if there(t["pattern"].replace(".png", "_preview.png"))
        ]
    victims = [(str(folder / v["file"]), v["caption"]) for v in index.get("victims", []) if there(v.get("file"))]
    if not index:
        victims = [(v["image"], f"#{v['index']} → {v['label']}") for v in report.get("victims", [])[:MAX_VICTIMS]]
    scores = [
        (str(folder / f), f"{name}: per-label score against its threshold")
        for name, f in index.get("scores", {}).items()
        if there(f)
    ]
    grid = index.get("victims_grid")
    return {
        "triggers": triggers,
        "victims": victims,
        "scores": scores,
        "grid": [(str(folder / grid), "victims")] if there(grid) else [],
    }


def picture_sheet(paths: Sequence[str | Path], gap: int = 12, top: int = 28) -> Image.Image | None:
    """The pictures at ``paths`` stacked top to bottom on white, centred, ``top`` pixels free above them (where a
    front end writes its label): one image shown whole, at its width (a gallery crops wide pictures to its tiles).
    None when there are none."""
    images = [Image.open(p).convert("RGB") for p in paths]
    if not images:
        return None
    width = max(i.width for i in images)
    sheet = Image.new("RGB", (width, top + sum(i.height for i in images) + gap * (len(images) - 1)), "white")
    y = top
    for image in images:
        sheet.paste(image, ((width - image.width) // 2, y))
        y += image.height + gap
    return sheet
