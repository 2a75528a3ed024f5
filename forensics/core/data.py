"""Probe sets: the images an investigator holds, with labels and, when known, object masks and trigger flags.

Sources: an ImageFolder (one folder per class), a CSV (``image,caption[,label,mask,triggered,trigger_box]``),
or the bundled demo sets (``demo``: mostly clean held-out images plus ~15 % carrying the planted
trigger; ``demo-clean``: the same images, all clean).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from forensics.core.errors import ForensicsError
from forensics.core.files import resolves_inside
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
    _shared: dict | None = field(default=None, repr=False, compare=False)  # size -> the loaded full set

    def sharing_loaded_images(self) -> "ProbeSet":
        """A copy whose whole-set :meth:`load_images` decodes once per size and hands every caller the same
        tensor (a scan's detectors read the same pixels; callers must not write into it)."""
        return replace(self, _shared={})

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
        if indices is None and self._shared is not None:
            if size not in self._shared:
                self._shared[size] = replace(self, _shared=None).load_images(size, None, progress)
            return self._shared[size]
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


def _root(root: str | Path | None) -> Path | None:
    if root is None:
        return None
    resolved = Path(root).expanduser().resolve()
    if not resolved.is_dir():
        raise ForensicsError(f"the probe root {Path(root).name!r} is not a folder")
    return resolved


def _read_json_object(path: Path, shape: str = "a JSON object") -> dict:
    """A JSON file holding an object; anything else is one line naming the file and the ``shape`` expected."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ForensicsError(f"{path.name} is not UTF-8 text (byte {exc.start} cannot be read)") from None
    except json.JSONDecodeError as exc:
        raise ForensicsError(f"{path.name} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(value, dict):
        raise ForensicsError(f"{path.name} must hold {shape}, got a JSON {type(value).__name__}")
    return value


def read_class_names(path: Path) -> list[str]:
    """``classes.json``: ``{"classes": [names]}``, each a distinct non-empty text; a bare list, a single name or a
    repeated name is one line naming the file and the field (a string would otherwise be read letter by letter)."""
    names = _read_json_object(path, 'an object {"classes": [class names]}').get("classes")
    if not isinstance(names, list):
        got = "nothing" if names is None else f"a {type(names).__name__}"
        raise ForensicsError(f"{path.name}: 'classes' must be a list of class names, got {got}")
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ForensicsError(f"{path.name}: 'classes' must be a non-empty list of non-empty class names")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ForensicsError(f"{path.name}: 'classes' names {name!r} twice; class names must be distinct")
        seen.add(name)
    return list(names)


def load_csv_probe(path: Path, class_names: Sequence[str] | None = None, root: str | Path | None = None) -> ProbeSet:
    """A CSV of image paths (relative to the CSV) with caption and optional label/mask/trigger columns.

    With ``root`` (a folder: an uploaded zip's extraction folder, an allowed server folder) the CSV and every
    image and mask it names must resolve inside ``root``; an absolute path, a ``..`` escape or a symlink leading
    out is refused with one line naming the row. Without it any path is read (the CLI, the library).
    """
    path = Path(path)
    base = _root(root)
    if base is not None and not resolves_inside(path, base):
        raise ForensicsError(f"{path.name} lies outside the probe folder")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if "image" not in fields:
                raise ForensicsError(
                    f"{path.name} needs a header with an 'image' column (found: {', '.join(fields) or 'none'})"
                )
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ForensicsError(
            f"{path.name} is not UTF-8 text (byte {exc.start} cannot be read); save the CSV as UTF-8"
        ) from None
    except csv.Error as exc:
        raise ForensicsError(f"{path.name} is not a readable CSV: {exc}") from None
    if not rows:
        raise ForensicsError(f"probe set {path.name} is empty")
    labels_text = [r.get("label", "") or "" for r in rows]
    classes_file = path.parent / "classes.json"
    if class_names is None:
        if classes_file.is_file() and (base is None or resolves_inside(classes_file, base)):
            class_names = read_class_names(classes_file)
        else:
            class_names = sorted({t for t in labels_text if t})
    class_names = list(class_names)
    index = {name: i for i, name in enumerate(class_names)}

    def resolve(text: str | None, column: str, number: int) -> Path | None:
        if not text:
            return None
        given = Path(text)
        full = given if given.is_absolute() else path.parent / given
        if base is not None and not resolves_inside(full, base):
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise ForensicsError(
                f"row {number} of {path.name}: {column} {shown!r} lies outside the probe folder "
                "(paths must be relative to the CSV and stay inside the upload)"
            )
        return full

    items = []
    for number, (row, label) in enumerate(zip(rows, labels_text), start=1):
        if label and label not in index:
            raise ForensicsError(
                f"label {label!r} in {path.name} is not among the class names ({', '.join(class_names)})"
            )
        items.append(
            ProbeItem(
                image=resolve(row["image"], "image", number),
                label=index[label] if label else None,
                caption=row.get("caption") or None,
                mask=resolve(row.get("mask"), "mask", number),
                triggered=_parse_flag(row.get("triggered")),
                trigger_box=_parse_box(row.get("trigger_box")),
            )
        )
    meta = {}
    manifest = path.parent.parent / "manifest.json"
    if manifest.is_file() and (base is None or resolves_inside(manifest, base)):
        meta = _read_json_object(manifest)
    meta["files"] = [str(path), str(classes_file)]  # inputs no output may replace
    return ProbeSet(name=path.stem, items=items, class_names=class_names, meta=meta)


def load_image_folder(root: Path, within: str | Path | None = None) -> ProbeSet:
    """An ImageFolder: each sub-folder is a class (its name, underscores as spaces), holding its images.

    With ``within`` every image must resolve inside that folder (a symlink leading out is refused).
    """
    root = Path(root)
    base = _root(within)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = []
    for i, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                if base is not None and not resolves_inside(file, base):
                    raise ForensicsError(f"{name}/{file.name} lies outside the probe folder")
                items.append(ProbeItem(image=file, label=i))
    if not items:
        raise ForensicsError(f"probe folder {root.name} holds no images in class sub-folders")
    return ProbeSet(name=root.name, items=items, class_names=[c.replace("_", " ") for c in classes])


def load_probe_set(
    spec: str | Path, class_names: Sequence[str] | None = None, root: str | Path | None = None
) -> ProbeSet:
    """``demo``, ``demo-clean``, a CSV file, or an ImageFolder directory.

    ``root``: a folder the probe set and every file it names must stay inside (see :func:`load_csv_probe`);
    the demo sets ignore it.
    """
    key = str(spec)
    if key in DEMO_PROBES:
        path = DEMO_PROBES[key]
        if not path.is_file():
            raise ForensicsError(
                f"demo probe set {path.name} is missing; rebuild it with `python -m forensics make-demo`"
            )
        probe = load_csv_probe(path, class_names)
        probe.name = key
        return probe
    path = Path(spec).expanduser()
    base = _root(root)
    if base is not None and not resolves_inside(path, base):
        raise ForensicsError(f"probe set {path.name!r} lies outside the probe folder")
    if not path.exists():
        raise ForensicsError(
            f"probe set {str(spec)!r} does not exist (give demo, demo-clean, a CSV or an image folder)"
        )
    if path.is_dir():
        return load_image_folder(path, within=base)
    if path.suffix.lower() != ".csv":
        raise ForensicsError(f"probe set {path.name} must be a .csv file or a folder of class folders")
    return load_csv_probe(path, class_names, root=base)


MAX_ARCHIVE_BYTES = 1_000_000_000  # uncompressed
MAX_ARCHIVE_FILES = 50_000
_CHUNK = 1 << 20


def _member_parts(archive: Path, info) -> tuple[str, ...]:
    """The path parts a zip member would be written to, or a ForensicsError for any unsafe name."""
    name = info.filename.replace("\\", "/")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
    drive = bool(parts) and len(parts[0]) == 2 and parts[0][1] == ":"  # C: on Windows
    if name.startswith("/") or is_link or drive or ".." in parts or not parts or "\0" in name:
        raise ForensicsError(f"{archive.name} holds an unsafe path {info.filename!r}; nothing was extracted")
    return parts


def _check_layout(archive: Path, members: list) -> dict:
    """Every member's parts, checked for unsafe names, duplicates and a file that is also a folder."""
    files: dict[tuple[str, ...], object] = {}
    folders: set[tuple[str, ...]] = set()
    for m in members:
        parts = _member_parts(archive, m)
        if m.is_dir():
            folders.add(parts)
            continue
        if parts in files:
            raise ForensicsError(f"{archive.name} holds {'/'.join(parts)!r} twice; nothing was extracted")
        files[parts] = m
        folders.update(parts[:k] for k in range(1, len(parts)))
    clash = sorted(set(files) & folders)
    if clash:
        raise ForensicsError(
            f"{archive.name} holds {'/'.join(clash[0])!r} both as a file and as a folder; nothing was extracted"
        )
    return files


def extract_probe_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack an uploaded zip (an ImageFolder, or a CSV with its images) into ``dest``; returns the probe path.

    Members that would land outside ``dest`` (absolute or ``..`` paths, links), duplicate names, a name that is
    both a file and a folder, and archives that are too large are refused before anything is written. An entry
    whose data does not match its header (a declared size that is wrong, a bad checksum, a truncated stream) is
    refused while extracting, and whatever was written is removed again. Every refusal is one line.
    """
    import zipfile
    import zlib

    archive, dest = Path(archive), Path(dest)
    if not zipfile.is_zipfile(archive):
        raise ForensicsError(
            f"{archive.name} is not a zip archive; upload a .zip of class folders or of a CSV with its images"
        )
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ForensicsError(f"{archive.name} is not a readable zip archive ({_first_line(exc)})") from None
    with zf:
        infos = zf.infolist()
        members = [m for m in infos if not m.is_dir()]
        if not members:
            raise ForensicsError(f"{archive.name} is empty")
        if len(members) > MAX_ARCHIVE_FILES or sum(m.file_size for m in members) > MAX_ARCHIVE_BYTES:
            raise ForensicsError(_too_large(archive))
        files = _check_layout(archive, infos)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        created: list[Path] = []  # removed again if an entry fails
        written = 0
        try:
            for parts, m in files.items():
                if "__MACOSX" in parts:
                    continue
                target = root.joinpath(*parts)
                for k in range(1, len(parts)):
                    folder = root.joinpath(*parts[:k])
                    if not folder.exists():
                        folder.mkdir()
                        created.append(folder)
                    elif folder.is_symlink() or not folder.is_dir():
                        raise ForensicsError(
                            f"{archive.name}: {'/'.join(parts[:k])!r} is not a folder in {dest.name}; "
                            "nothing was extracted"
                        )
                try:
                    out = open(target, "xb")  # never through an existing file or link
                except FileExistsError:
                    raise ForensicsError(
                        f"{archive.name}: {'/'.join(parts)!r} already exists in {dest.name}; nothing was extracted"
                    ) from None
                created.append(target)
                size = 0
                with out, zf.open(m) as src:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if size > m.file_size:
                            raise ForensicsError(_lying(archive, m, "holds more data than its header declares"))
                        if written > MAX_ARCHIVE_BYTES:
                            raise ForensicsError(_too_large(archive))
                        out.write(chunk)
                if size != m.file_size:
                    raise ForensicsError(_lying(archive, m, "holds less data than its header declares"))
        except ForensicsError:
            _remove(created)
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
            _remove(created)
            raise ForensicsError(_lying(archive, m, f"is damaged or its header lies ({_first_line(exc)})")) from None
        except NotImplementedError as exc:
            _remove(created)
            raise ForensicsError(
                f"{archive.name}: {m.filename!r} uses an unsupported compression ({_first_line(exc)}); "
                "nothing was extracted"
            ) from None
        except RuntimeError as exc:  # encrypted entries
            _remove(created)
            raise ForensicsError(
                f"{archive.name}: {m.filename!r} cannot be read ({_first_line(exc)}); nothing was extracted"
            ) from None
        except OSError as exc:
            _remove(created)
            raise ForensicsError(
                f"{archive.name}: {m.filename!r} cannot be written ({exc.strerror or type(exc).__name__}); "
                "nothing was extracted"
            ) from None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:160]


def _too_large(archive: Path) -> str:
    return (
        f"{archive.name} is too large (limit {MAX_ARCHIVE_FILES:,} files, "
        f"{MAX_ARCHIVE_BYTES // 1_000_000:,} MB unpacked)"
    )


def _lying(archive: Path, member, why: str) -> str:
    return f"{archive.name}: entry {member.filename!r} {why}; nothing was extracted"


def _remove(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError:
            pass


def demo_backdoor() -> dict | None:
    """The demo lab's planted trigger and target (from its manifest), for teaching and evaluation."""
    manifest = DEMO_DIR / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    return {"attack": data["attack"]["attack"], "target": data["target"], "trigger": data["attack"]}
