"""Probe sets: the images an investigator holds, with labels and, when known, object masks and trigger flags.

Sources: an ImageFolder (one folder per class), a CSV (``image,caption[,label,mask,triggered,trigger_box]``),
or the bundled demo sets (``demo``: mostly clean held-out images plus ~15 % carrying the planted
trigger; ``demo-clean``: the same images, all clean).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from forensics.core.errors import ForensicsError
from forensics.core.images import Box, load_image, pil_to_model_tensor, read_pil
from forensics.core.models import ASSETS_DIR

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEMO_DIR = ASSETS_DIR / "demo"
DEMO_PROBES = {"demo": DEMO_DIR / "probe" / "probe.csv", "demo-clean": DEMO_DIR / "probe" / "probe_clean.csv"}
Progress = Callable[[float, str], None]


@dataclass
class ProbeItem:
    """One probe image and what is known about it."""

    image: Path
    label: int | None = None
    caption: str | None = None
    mask: Path | None = None
    triggered: bool | None = None  # None: unknown
    trigger_box: Box | None = None  # in the image's own pixels


@dataclass
class ProbeSet:
    """A named list of probe images with the class names their labels index."""

    name: str
    items: list[ProbeItem]
    class_names: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int | None]:
        return [item.label for item in self.items]

    @property
    def has_trigger_flags(self) -> bool:
        return any(item.triggered is not None for item in self.items)

    def clean_indices(self) -> list[int]:
        """Labelled images not known to carry a trigger (these give CA)."""
        return [i for i, it in enumerate(self.items) if it.label is not None and not it.triggered]

    def triggered_indices(self) -> list[int]:
        return [i for i, it in enumerate(self.items) if it.triggered]

    def load_images(
        self, size: int, indices: Sequence[int] | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        """Images as N x 3 x size x size floats in [0, 1] (resize + centre crop)."""
        indices = range(len(self.items)) if indices is None else indices
        out = []
        for n, i in enumerate(indices):
            out.append(load_image(self.items[i].image, size))
            if progress and (n % 50 == 0 or n == len(indices) - 1):
                progress((n + 1) / len(indices), f"loading images {n + 1}/{len(indices)}")
        if not out:
            return torch.empty(0, 3, size, size)
        return torch.stack(out)

    def subset(self, max_images: int | None, seed: int = 0) -> "ProbeSet":
        """At most ``max_images`` items, a seeded random choice kept in the original order (quicker scans)."""
        if max_images is None or max_images >= len(self.items):
            return self
        if max_images < 1:
            raise ForensicsError("the number of images to use must be at least 1")
        import numpy as np

        keep = sorted(np.random.default_rng(seed).choice(len(self.items), size=max_images, replace=False).tolist())
        return ProbeSet(
            name=f"{self.name} ({max_images} of {len(self.items)})",
            items=[self.items[i] for i in keep],
            class_names=self.class_names,
            meta={**self.meta, "subset_of": len(self.items), "subset_indices": keep, "subset_seed": seed},
        )

    def select(self, indices: Sequence[int], name: str | None = None) -> "ProbeSet":
        """The items at ``indices`` (in that order) as a probe set of their own, same classes (no copy to disk)."""
        indices = [int(i) for i in indices]
        return ProbeSet(
            name=name or f"{self.name} ({len(indices)} of {len(self.items)})",
            items=[self.items[i] for i in indices],
            class_names=self.class_names,
            meta={**self.meta, "subset_of": len(self.items), "subset_indices": indices},
        )

    def files(self) -> list[Path]:
        """Every file this probe set was read from (its CSV and classes.json, images, masks): outputs never
        replace these."""
        listed = [Path(f) for f in self.meta.get("files", [])]
        return listed + [Path(it.image) for it in self.items] + [Path(it.mask) for it in self.items if it.mask]

    def load_mask(self, index: int, size: int) -> torch.Tensor | None:
        """The ground-truth object mask (size x size bool) aligned with :meth:`load_images`, if known."""
        item = self.items[index]
        if item.mask is None:
            return None
        mask = read_pil(item.mask, "mask")
        return pil_to_model_tensor(mask.convert("L").convert("RGB"), size)[0] > 0.5

    def trigger_box_at(self, index: int, size: int) -> Box | None:
        """The trigger box mapped through the same resize + centre crop as the images."""
        item = self.items[index]
        if item.trigger_box is None:
            return None
        with Image.open(item.image) as im:
            w, h = im.size
        return map_box(item.trigger_box, w, h, size)


def map_box(box: Box, width: int, height: int, size: int) -> Box:
    """Map a pixel box through CLIP's resize-shorter-side + centre-crop to ``size``."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    x0, y0, x1, y1 = box
    mapped = [round(x0 * scale) - left, round(y0 * scale) - top, round(x1 * scale) - left, round(y1 * scale) - top]
    return tuple(int(min(max(v, 0), size)) for v in mapped)  # type: ignore[return-value]


def _parse_box(text: str | None) -> Box | None:
    if not text or not text.strip():
        return None
    parts = text.replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ForensicsError(f"trigger_box {text!r} must be four numbers x0 y0 x1 y1")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _parse_flag(text: str | None) -> bool | None:
    if text is None or text.strip() == "":
        return None
    return text.strip().lower() in ("1", "true", "yes", "y")


def load_csv_probe(path: Path, class_names: Sequence[str] | None = None) -> ProbeSet:
    """A CSV of image paths (relative to the CSV) with caption and optional label/mask/trigger columns."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "image" not in fields:
            raise ForensicsError(
                f"{path.name} needs a header with an 'image' column (found: {', '.join(fields) or 'none'})"
            )
        rows = list(reader)
    if not rows:
        raise ForensicsError(f"probe set {path.name} is empty")
    labels_text = [r.get("label", "") or "" for r in rows]
    if class_names is None:
        classes_file = path.parent / "classes.json"
        if classes_file.is_file():
            class_names = json.loads(classes_file.read_text())["classes"]
        else:
            class_names = sorted({t for t in labels_text if t})
    class_names = list(class_names)
    index = {name: i for i, name in enumerate(class_names)}
    items = []
    for row, label in zip(rows, labels_text):
        if label and label not in index:
            raise ForensicsError(
                f"label {label!r} in {path.name} is not among the class names ({', '.join(class_names)})"
            )

        def resolve(p):
            return None if not p else (Path(p) if Path(p).is_absolute() else path.parent / p)

        items.append(
            ProbeItem(
                image=resolve(row["image"]),
                label=index[label] if label else None,
                caption=row.get("caption") or None,
                mask=resolve(row.get("mask")),
                triggered=_parse_flag(row.get("triggered")),
                trigger_box=_parse_box(row.get("trigger_box")),
            )
        )
    meta = {}
    manifest = path.parent.parent / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
    meta["files"] = [str(path), str(path.parent / "classes.json")]  # inputs no output may replace
    return ProbeSet(name=path.stem, items=items, class_names=class_names, meta=meta)


def load_image_folder(root: Path) -> ProbeSet:
    """An ImageFolder: each sub-folder is a class (its name, underscores as spaces), holding its images."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = []
    for i, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                items.append(ProbeItem(image=file, label=i))
    if not items:
        raise ForensicsError(f"probe folder {root} holds no images in class sub-folders")
    return ProbeSet(name=root.name, items=items, class_names=[c.replace("_", " ") for c in classes])


def load_probe_set(spec: str | Path, class_names: Sequence[str] | None = None) -> ProbeSet:
    """``demo``, ``demo-clean``, a CSV file, or an ImageFolder directory."""
    key = str(spec)
    if key in DEMO_PROBES:
        path = DEMO_PROBES[key]
        if not path.is_file():
            raise ForensicsError(f"demo probe set {path} is missing; rebuild it with `python -m forensics make-demo`")
        probe = load_csv_probe(path, class_names)
        probe.name = key
        return probe
    path = Path(spec).expanduser()
    if not path.exists():
        raise ForensicsError(f"probe set {spec!r} does not exist (give demo, demo-clean, a CSV or an image folder)")
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix.lower() != ".csv":
        raise ForensicsError(f"probe set {path.name} must be a .csv file or a folder of class folders")
    return load_csv_probe(path, class_names)


MAX_ARCHIVE_BYTES = 1_000_000_000  # uncompressed
MAX_ARCHIVE_FILES = 50_000


def extract_probe_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack an uploaded zip (an ImageFolder, or a CSV with its images) into ``dest``; returns the probe path.

    Members that would land outside ``dest`` (absolute or ``..`` paths, links) and archives that are
    too large are refused before anything is written.
    """
    import zipfile

    archive, dest = Path(archive), Path(dest)
    if not zipfile.is_zipfile(archive):
        raise ForensicsError(
            f"{archive.name} is not a zip archive; upload a .zip of class folders or of a CSV with its images"
        )
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise ForensicsError(f"{archive.name} is empty")
        if len(members) > MAX_ARCHIVE_FILES or sum(m.file_size for m in members) > MAX_ARCHIVE_BYTES:
            raise ForensicsError(
                f"{archive.name} is too large (limit {MAX_ARCHIVE_FILES:,} files, "
                f"{MAX_ARCHIVE_BYTES // 1_000_000:,} MB unpacked)"
            )
        root = dest.resolve()
        for m in members:
            name = m.filename.replace("\\", "/")
            target = (root / name).resolve()
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            if name.startswith("/") or is_link or (target != root and root not in target.parents):
                raise ForensicsError(f"{archive.name} holds an unsafe path {m.filename!r}; nothing was extracted")
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            if "__MACOSX" in m.filename.split("/"):
                continue
            zf.extract(m, dest)
    csvs = sorted(p for p in dest.rglob("*.csv") if "__MACOSX" not in p.parts)
    if csvs:
        return min(csvs, key=lambda p: len(p.parts))
    base = dest
    entries = [p for p in dest.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    while (
        len(entries) == 1
        and entries[0].is_dir()
        and not any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in entries[0].iterdir())
    ):
        base = entries[0]
        entries = [p for p in base.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return base


def demo_backdoor() -> dict | None:
    """The demo lab's planted trigger and target (from its manifest), for teaching and evaluation."""
    manifest = DEMO_DIR / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    return {"attack": data["attack"]["attack"], "target": data["target"], "trigger": data["attack"]}
