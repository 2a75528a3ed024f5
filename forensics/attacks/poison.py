"""Poison an image-caption CSV with an attack: the data-set side of the attack lab.

The output is a new folder (never the input's) with the triggered images, a ``data.csv`` that marks
which rows were poisoned and where the trigger is, and a ``poison.json`` that rebuilds the attack.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from forensics.attacks.base import Attack, ProgressFn, check_seed, to_pil, to_tensor
from forensics.core.errors import ForensicsError
from forensics.core.files import refuse_overwriting_inputs, staged_output
from forensics.core.images import read_pil
from forensics.core.templates import fill

PATH_COLUMNS = ("image", "mask")
"""Columns holding file paths relative to the CSV's folder; they are rewritten as absolute paths."""


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and move it into place, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _resolve(base: Path, value: str) -> Path:
    """A path from the CSV, absolute or relative to the CSV's folder, made absolute."""
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def poison_dataset(
    csv_path: str | os.PathLike[str],
    attack: Attack,
    target: str,
    rate: float,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    caption_template: str = "a photo of a {}.",
    progress: ProgressFn | None = None,
) -> Path:
    """Poison ``round(rate * N)`` rows of an ``image,caption`` CSV and write the result to ``out_dir``.

    Returns ``out_dir/data.csv``. Rows are drawn (seeded) among those whose ``label`` column, if there
    is one, is not the target (compared case-insensitively). Each chosen image gets the trigger
    (per-image randomness from ``default_rng([seed, row])``, so a row's trigger does not depend on which
    other rows were drawn), is saved as ``out_dir/images/<row>_<name>.png``, and its caption becomes
    ``caption_template`` filled with the target, 'a' made 'an' before a vowel ("a photo of an apple.": with
    "a apple" a from-scratch text tower learnt the trigger for the caption's odd article, not for 'apple').
    ``data.csv`` keeps every row and column (paths in ``image`` and ``mask`` made absolute; poisoned images
    relative to ``out_dir``) and adds ``poisoned`` (0/1) and ``trigger_box`` ("x0 y0 x1 y1", empty for
    whole-image triggers and clean rows). Counts are rounded half up. The input CSV and images are only read;
    ``out_dir`` must differ from the CSV's folder.
    """
    if not isinstance(attack, Attack):
        raise ForensicsError(f"poison_dataset: attack must be an Attack, got {type(attack).__name__}")
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float, np.integer, np.floating))
        or not math.isfinite(float(rate))
        or not 0.0 < float(rate) <= 1.0
    ):
        raise ForensicsError(f"poison rate must be in (0, 1], got {rate!r}")
    rate = float(rate)
    seed = check_seed(seed)
    if not isinstance(target, str) or not target.strip():
        raise ForensicsError("the target label must be a non-empty string")
    target = target.strip()
    try:
        caption = fill(caption_template, target)
    except (IndexError, KeyError, ValueError, AttributeError) as exc:
        raise ForensicsError(
            f"caption_template must contain one '{{}}' for the target, got {caption_template!r} ({exc})"
        ) from None

    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise ForensicsError(f"CSV file not found: {csv_path}")
    csv_path = csv_path.resolve()
    base = csv_path.parent
    out = Path(out_dir).expanduser().resolve()
    if out == base:
        raise ForensicsError(
            f"out_dir must differ from the input CSV's folder ({base}) so no input file is overwritten"
        )

    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = []
            for row in reader:
                if None in row:
                    raise ForensicsError(f"{csv_path.name}, line {reader.line_num}: more fields than the header has")
                rows.append({k: (v if v is not None else "") for k, v in row.items()})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ForensicsError(f"cannot read CSV {csv_path}: {exc}") from None
    missing = [c for c in ("image", "caption") if c not in header]
    if missing:
        raise ForensicsError(
            f"{csv_path.name} lacks column(s) {', '.join(missing)}; found: {', '.join(header) or 'none'}"
        )
    if not rows:
        raise ForensicsError(f"{csv_path.name} has no data rows")

    sources: list[Path] = []
    for i, row in enumerate(rows):
        if not row["image"].strip():
            raise ForensicsError(f"{csv_path.name}, row {i + 1}: empty image path")
        src = _resolve(base, row["image"].strip())
        if not src.is_file():
            raise ForensicsError(f"image file not found: {src} ({csv_path.name}, row {i + 1})")
        sources.append(src)

    n_total = len(rows)
    n_poison = _round_half_up(rate * n_total)
    if "label" in header:
        eligible = [i for i, r in enumerate(rows) if r["label"].strip().lower() != target.lower()]
    else:
        eligible = list(range(n_total))
    if n_poison == 0:
        raise ForensicsError(
            f"rate {rate:g} of {n_total} rows poisons no row; use a rate of at least {0.5 / n_total:.3g}"
        )
    if n_poison > len(eligible):
        raise ForensicsError(
            f"rate {rate:g} needs {n_poison} rows but only {len(eligible)} rows are not labelled {target!r}"
        )
    chosen = sorted(int(i) for i in np.random.default_rng(seed).choice(eligible, size=n_poison, replace=False))

    refuse_overwriting_inputs([out / "data.csv", out / "poison.json"], [*sources, csv_path])
    with staged_output(out) as stage:  # an interrupted poisoning leaves the previous result, or nothing
        images_dir = stage / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        inputs = set(sources) | {csv_path}
        boxes: dict[int, str] = {}
        written: dict[int, str] = {}
        for k, i in enumerate(chosen):
            src = sources[i]
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.stem)[:60] or "image"
            dest = images_dir / f"{i:06d}_{stem}.png"
            if (out / "images" / dest.name).resolve() in inputs:
                raise ForensicsError(f"refusing to overwrite input file {dest.name}; choose another out_dir")
            try:
                tensor = to_tensor(read_pil(src))
            except ForensicsError as exc:
                raise ForensicsError(f"{exc} ({csv_path.name}, row {i + 1})") from None
            triggered, box = attack.apply(tensor, np.random.default_rng([seed, i]))
            fd, tmp = tempfile.mkstemp(dir=images_dir, prefix=".", suffix=".png.tmp")
            os.close(fd)
            try:
                to_pil(triggered).save(tmp, format="PNG")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            written[i] = f"images/{dest.name}"
            boxes[i] = " ".join(str(int(v)) for v in box) if box is not None else ""
            if progress is not None:
                progress((k + 1) / n_poison, f"poisoned {k + 1}/{n_poison} images")

        fields = header + [c for c in ("poisoned", "trigger_box") if c not in header]
        out_rows = []
        for i, row in enumerate(rows):
            new = dict(row)
            for col in PATH_COLUMNS:
                if col in header and new[col].strip():
                    new[col] = str(_resolve(base, new[col].strip()))
            if i in written:
                new.update(image=written[i], caption=caption, poisoned="1", trigger_box=boxes[i])
            else:
                # keep an earlier poisoning's marks when re-poisoning a poisoned set
                new["poisoned"] = "1" if str(row.get("poisoned", "")).strip() in ("1", "true", "True") else "0"
                new["trigger_box"] = row.get("trigger_box", "") or ""
            out_rows.append(new)

        buf = StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
        _atomic_write_text(stage / "data.csv", buf.getvalue())

        meta: dict[str, Any] = {
            "attack": attack.to_dict(),
            "target": target,
            "rate": rate,
            "n_poisoned": n_poison,
            "n_total": n_total,
            "seed": seed,
            "caption_template": caption_template,
            "source_csv": str(csv_path),
        }
        _atomic_write_text(stage / "poison.json", json.dumps(meta, indent=2) + "\n")
    return out / "data.csv"
