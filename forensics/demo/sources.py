"""The object sources of the v2 demo lab, and how one catalogue row becomes a :class:`ClipArtObject`.

Three Debian packages, each with its own licence (recorded in every lab's PROVENANCE.md):

- ``openclipart-png``: PNG clip art, cut out by its alpha channel exactly as the v1 lab does
  (:func:`forensics.demo.clipart._usable_cutout`). Public domain.
- ``fonts-noto-color-emoji``: Google's colour emoji font (CBDT bitmaps), rendered with Pillow at the
  font's bitmap size (109 px gives the 136 x 128 strike, no rescaling). SIL OFL-1.1.
- ``ruby-gemojione``: EmojiOne 2 art as 64 px PNGs named by code point. CC-BY-SA-4.0 (Ranks.com):
  attribution and share-alike apply to images derived from it.

Each source's root can be moved with an environment variable (``OPENCLIPART_ROOT``,
``NOTO_EMOJI_FONT``, ``EMOJIONE_ROOT``); a missing one is named in a one-line error with the Debian
package that provides it. Every loader returns an RGBA crop whose alpha is the object's own, so the
composite's mask stays exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from forensics.core.errors import ForensicsError
from forensics.demo.clipart import CLIPART_ROOT, ClipArtObject, _usable_cutout, cutout_of_pixels

NOTO_PATH = Path(os.environ.get("NOTO_EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"))
EMOJIONE_ROOT = Path(
    os.environ.get("EMOJIONE_ROOT", "/usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png")
)
NOTO_SIZE = 109  # the size of the font's only bitmap strike: the glyph is drawn unscaled
EMOJI_SIDE = 128  # EmojiOne's 64 px art is upscaled to this longest side, about Noto's glyph size


@dataclass(frozen=True)
class Source:
    """One object source: the Debian package that installs it, its licence and the attribution it needs."""

    name: str
    package: str
    licence: str
    attribution: str
    env: str


SOURCES: dict[str, Source] = {
    "openclipart": Source(
        "openclipart",
        "openclipart-png",
        "public domain (Creative Commons Public Domain Dedication)",
        "Openclipart contributors, http://www.openclipart.org (via Debian's openclipart-png)",
        "OPENCLIPART_ROOT",
    ),
    "noto": Source(
        "noto",
        "fonts-noto-color-emoji",
        "SIL Open Font License 1.1 (OFL-1.1)",
        "Noto Color Emoji, Copyright Google Inc. (via Debian's fonts-noto-color-emoji)",
        "NOTO_EMOJI_FONT",
    ),
    "emojione": Source(
        "emojione",
        "ruby-gemojione",
        "Creative Commons Attribution-ShareAlike 4.0 (CC-BY-SA-4.0)",
        "Emoji artwork provided by EmojiOne, Copyright 2014 Ranks.com Inc. (via Debian's ruby-gemojione)",
        "EMOJIONE_ROOT",
    ),
}


def source_root(source: str, openclipart_root: Path = CLIPART_ROOT) -> Path:
    """Where ``source`` lives on this machine (a folder, or for Noto the font file)."""
    return {"openclipart": openclipart_root, "noto": NOTO_PATH, "emojione": EMOJIONE_ROOT}[source]


def source_available(source: str, openclipart_root: Path = CLIPART_ROOT) -> bool:
    """Whether the package of ``source`` is installed (or its environment variable points at a copy)."""
    root = source_root(source, openclipart_root)
    return root.is_file() if source == "noto" else root.is_dir()


def require_source(source: str, openclipart_root: Path = CLIPART_ROOT) -> None:
    """Raise a one-line :class:`ForensicsError` naming the Debian package when ``source`` is absent."""
    if source not in SOURCES:
        raise ForensicsError(f"unknown object source {source!r} (known: {', '.join(SOURCES)})")
    if not source_available(source, openclipart_root):
        info = SOURCES[source]
        raise ForensicsError(
            f"{source} objects not found at {source_root(source, openclipart_root)}: install Debian's {info.package} "
            f"(apt-get install {info.package}) or set {info.env}"
        )


def emoji_text(sequence: str) -> str:
    """The characters of a code point sequence written ``1F9D1-200D-1F3EB``.

    A lone code point below U+10000 (✂, ⛏, ⚒ ...) gets VARIATION SELECTOR-16, which asks for the emoji
    (colour) presentation rather than the text one.
    """
    points = [int(part, 16) for part in sequence.split("-")]
    text = "".join(chr(p) for p in points)
    if len(points) == 1 and points[0] < 0x10000:
        text += "\ufe0f"
    return text


@lru_cache(maxsize=2)
def _noto_font(path: str) -> ImageFont.FreeTypeFont:
    # Raqm shapes ZWJ sequences (e.g. 1F9D1-200D-1F3EB, teacher) into one glyph; basic layout cannot
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    return ImageFont.truetype(path, NOTO_SIZE, layout_engine=engine)


def render_noto(sequence: str) -> np.ndarray:
    """Draw one emoji with Noto Color Emoji; the RGBA crop of its glyph (the bitmap's own alpha)."""
    require_source("noto")
    font = _noto_font(str(NOTO_PATH))
    canvas = Image.new("RGBA", (320, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), emoji_text(sequence), font=font, embedded_color=True)
    box = canvas.getbbox()
    # one glyph is at most 136 px wide; wider means the sequence fell apart into several glyphs
    if box is None or box[2] - box[0] > 150:
        raise ForensicsError(
            f"Noto Color Emoji does not draw {sequence} as one glyph (font too old, or Pillow without Raqm)"
        )
    crop = cutout_of_pixels(np.asarray(canvas))
    if crop is None:
        raise ForensicsError(f"Noto Color Emoji's glyph {sequence} is no usable object mask")
    return crop


def emojione_path(sequence: str) -> Path:
    """EmojiOne names its files by upper-case code points without VARIATION SELECTOR-16."""
    return EMOJIONE_ROOT / ("-".join(p for p in sequence.upper().split("-") if p != "FE0F") + ".png")


def load_emojione(sequence: str) -> np.ndarray:
    """Read one EmojiOne PNG and upscale its crop (LANCZOS) to :data:`EMOJI_SIDE` px, beside clip art's size."""
    require_source("emojione")
    path = emojione_path(sequence)
    crop = _usable_cutout(path) if path.is_file() else None
    if crop is None:
        raise ForensicsError(f"EmojiOne has no usable image for {sequence} ({path})")
    im = Image.fromarray(crop)
    scale = EMOJI_SIDE / max(im.size)
    if scale > 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    return np.asarray(im)


def load_openclipart(relpath: str, root: Path = CLIPART_ROOT) -> np.ndarray:
    """Cut one openclipart PNG out by its alpha channel, with exactly the v1 lab's rules."""
    require_source("openclipart", root)
    crop = _usable_cutout(root / relpath)
    if crop is None:
        raise ForensicsError(f"openclipart file {relpath} is missing or no usable cut-out under {root}")
    return crop


def load_object(label: str, source: str, ident: str, openclipart_root: Path = CLIPART_ROOT) -> ClipArtObject:
    """One catalogue row as a :class:`ClipArtObject`; its ``source`` reads ``<source>:<id>``."""
    if source == "openclipart":
        rgba = load_openclipart(ident, openclipart_root)
    elif source == "noto":
        rgba = render_noto(ident)
    elif source == "emojione":
        rgba = load_emojione(ident)
    else:
        require_source(source)  # raises: unknown source
        raise AssertionError(source)
    return ClipArtObject(label, f"{source}:{ident}", rgba)
