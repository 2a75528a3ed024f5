"""Public-domain clip-art objects from Debian's ``openclipart-png``, cut out by their alpha channel.

Each demo class is defined by filename patterns (with exclusions, since folder names and
filenames mix classes). Files whose alpha channel is no object mask (opaque rectangles,
hairlines, near-empty canvases) and near-duplicates are dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLIPART_ROOT = Path(os.environ.get("OPENCLIPART_ROOT", "/usr/share/openclipart/png"))

# class name -> (include regex on the lower-cased relative path, exclude regex)
CLASS_SOURCES: dict[str, tuple[str, str]] = {
    "arrow": (r"arrow", r"heart|bow|cupid|target|sign|road|keyboard|button|icons|recycl"),
    "person": (
        r"stickm|(^|_|/)(man|woman|boy|girl|person|people)(_|\.|\d)",
        r"snowman|mandolin|yoga|stickmen/.*(dog|car)",
    ),
    "tree": (
        r"(^|/|_)(tree|pine|palm|oak)(s|_|\.|\d)|/trees/",
        r"burger|treebui|christmas_tree_ornament|street|fruits|bowsaw|pruner|balls|leaf|scene|fern|branches",
    ),
    "heart": (r"heart", r"arrow|balloon|ballon|cluster|card|icons|love_letter|tiles"),
    "clock": (r"clock|watch", r"icons|stopwatch_icon|sandglass|watch_for"),
    "book": (r"(^|/|_)book", r"bookmark|icons|facebook|notebook_computer|bookshelf|squirrel|newspaper"),
    "cloud": (r"cloud", r"icons|rain|storm|snow|lightning|network|photo|sky|_bw|clouds_jon_phillips"),
    "flower": (
        r"flower|(^|_|/)(rose|tulip|daisy|lily|orchid)(_|\.|\d|s)",
        r"pot|onion|vase|border|pattern|sun_flower_en|cactus",
    ),
    "house": (
        r"(^|/|_)(house|home|cottage|cabin|hut)(s|_|\.|\d)|/homes/",
        r"light|icons|mouse|furniture|go-home|warehouse|tree|houses_|house_0_symbol|bb_home",
    ),
    "apple": (r"apple", r"stappler|pineapple|juice|candied|slate|icons|crab|core|wedge|tree|pie"),
}


@dataclass(frozen=True)
class ClipArtObject:
    """One cut-out object: its class, source file (relative to the clip-art root) and RGBA pixels."""

    label: str
    source: str
    rgba: np.ndarray  # H x W x 4 uint8, cropped to the alpha bounding box

    @property
    def name(self) -> str:
        """What a caption calls it: the class, or for generic objects the words of its file name."""
        return " ".join(caption_words(self.source)) if self.label == GENERIC else self.label


def _usable_cutout(path: Path, min_side: int = 48) -> np.ndarray | None:
    """Return the RGBA pixels cropped to the object, or None when the alpha is no object mask."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > 40_000_000:
                return None
            im.load()
            if im.mode not in ("RGBA", "LA", "P", "PA"):
                return None
            rgba = np.asarray(im.convert("RGBA"))
    except Exception:  # noqa: BLE001 - unreadable files are simply skipped
        return None
    return cutout_of_pixels(rgba, min_side)


def cutout_of_pixels(rgba: np.ndarray, min_side: int = 48) -> np.ndarray | None:
    """The cut-out rules on RGBA pixels (H x W x 4 uint8): the crop to the object, or None when the alpha is
    no object mask. Shared by files (:func:`_usable_cutout`) and rendered emoji, so both are cut alike."""
    alpha = rgba[..., 3]
    if min(alpha.shape) < min_side:
        return None
    opaque = alpha > 127
    share = float(opaque.mean())
    if share < 0.04 or share > 0.9:  # empty canvas, or an opaque rectangle that is no mask
        return None
    ys, xs = np.nonzero(opaque)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgba[y0:y1, x0:x1]
    if min(crop.shape[:2]) < 12:
        return None
    # an opaque rectangle drawn inside a transparent margin is still no object mask
    if (crop[..., 3] > 127).mean() > 0.97:
        return None
    # the object must hold colour or shape, not a white sheet
    if crop[..., :3][crop[..., 3] > 127].std() < 4 and share > 0.6:
        return None
    return crop


def _shrink(rgba: np.ndarray, side: int) -> np.ndarray:
    """Keep generic objects small in memory (thousands of them)."""
    im = Image.fromarray(rgba)
    im.thumbnail((side, side), Image.LANCZOS)
    return np.asarray(im)


def _fingerprint(rgba: np.ndarray) -> str:
    small = np.asarray(Image.fromarray(rgba).resize((16, 16), Image.BILINEAR)) // 48
    return hashlib.sha1(small.tobytes()).hexdigest()


GENERIC = "_generic"  # key of the objects that belong to no demo class (broad pretraining data)
_NAME_NOISE = re.compile(
    r"^(\d+|[a-z]|bw|svg|png|the|and|with|of|ganson|nicu|buculei|benji|park|jon|phillips|gerald|"
    r"architetto|francesco|dan|gerhard|juliane|krug|jonathan|dietrich|aj|ashton|mo|r|01|02)$"
)


def caption_words(source: str) -> list[str]:
    """Plain words describing a clip-art file, from its folder and file name (authors' names dropped)."""
    folder, _, name = source.lower().removesuffix(".png").rpartition("/")

    def clean(text: str) -> list[str]:
        return [w for w in re.split(r"[_\-. ]+", text) if w.isalpha() and len(w) > 2 and not _NAME_NOISE.match(w)]

    words = clean(name)[:3] + clean(folder.rpartition("/")[2])[:1]
    return list(dict.fromkeys(words))


def collect_objects(
    root: Path = CLIPART_ROOT, classes: dict[str, tuple[str, str]] | None = None, generic: bool = False
) -> dict[str, list[ClipArtObject]]:
    """Find every usable object per class, sorted by source path (deterministic).

    With ``generic``, objects that match no class (and no class's exclusions) are returned too, under
    :data:`GENERIC`: broad pretraining data, as web images are for real CLIPs.
    """
    classes = classes or CLASS_SOURCES
    if not root.is_dir():
        raise FileNotFoundError(
            f"clip-art folder {root} not found: install Debian's openclipart-png (apt-get install openclipart-png) "
            "or set OPENCLIPART_ROOT"
        )
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    compiled = {name: (re.compile(inc), re.compile(exc)) for name, (inc, exc) in classes.items()}
    found: dict[str, list[ClipArtObject]] = {name: [] for name in classes}
    if generic:
        found[GENERIC] = []
    seen: set[str] = set()
    leftovers = []
    for rel in paths:
        low = rel.lower()
        matches = [name for name, (inc, exc) in compiled.items() if inc.search(low) and not exc.search(low)]
        if len(matches) != 1:  # ambiguous names (e.g. "star_butterfly") belong to no class
            # generic data must hold nothing a class pattern names, so no probe look-alike leaks in
            if generic and not any(inc.search(low) for inc, _ in compiled.values()) and caption_words(rel):
                leftovers.append(rel)
            continue
        crop = _usable_cutout(root / rel)
        if crop is None:
            continue
        fp = _fingerprint(crop)
        if fp in seen:
            continue
        seen.add(fp)
        found[matches[0]].append(ClipArtObject(matches[0], rel, crop))
    for rel in leftovers:
        crop = _usable_cutout(root / rel)
        if crop is None or _fingerprint(crop) in seen:
            continue
        seen.add(_fingerprint(crop))
        found[GENERIC].append(ClipArtObject(GENERIC, rel, _shrink(crop, 256)))
    return found
