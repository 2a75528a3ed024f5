"""Composite clip-art cut-outs onto varied backgrounds, with exact masks and descriptive captions.

Captions name object, colour, size, position and background so that no two images in a batch
share a caption (identical captions are false negatives for the CLIP loss).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from forensics.demo.clipart import ClipArtObject

# named colours for backgrounds and for describing objects
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 140, 30),
    "yellow": (240, 215, 60),
    "green": (60, 160, 70),
    "blue": (50, 90, 200),
    "purple": (130, 60, 170),
    "pink": (235, 140, 180),
    "brown": (130, 85, 45),
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "teal": (40, 150, 150),
}
BACKGROUND_KINDS = ("plain", "gradient", "mottled", "striped-soft")
PREFIXES = ("a photo of", "a picture of", "an image of", "a drawing of", "clip art of")


@dataclass
class Composite:
    """One rendered image with its exact object mask and the facts its caption states."""

    image: Image.Image  # RGB
    mask: np.ndarray  # H x W bool, True on the object
    label: str
    caption: str
    object_box: tuple[int, int, int, int]
    colour: str
    size: str
    position: str
    background: str


def colour_name(rgb: np.ndarray) -> str:
    """Name the dominant colour of object pixels (N x 3 uint8) with the palette's words."""
    if len(rgb) == 0:
        return "grey"
    r, g, b = (np.median(rgb, axis=0) / 255.0).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if v < 0.22:
        return "black"
    if s < 0.18:
        return "white" if v > 0.8 else "grey"
    hue = h * 360
    if hue < 15 or hue >= 340:
        return "red" if v > 0.45 or s < 0.6 else "brown"
    if hue < 40:
        return "orange" if v > 0.6 else "brown"
    if hue < 70:
        return "yellow"
    if hue < 165:
        return "green"
    if hue < 200:
        return "teal"
    if hue < 255:
        return "blue"
    if hue < 290:
        return "purple"
    return "pink"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def describe(
    label: str, prefix: str, size: str, colour: str, position: str, background: str, rng: np.random.Generator
) -> str:
    """A caption of varying detail.

    Long ones keep most batch captions distinct, short ones make the class word matter.
    """
    style = rng.choice(5, p=[0.2, 0.15, 0.25, 0.05, 0.35])
    if style == 0:
        if rng.random() < 0.5:
            return (
                f"{prefix} {_article(size)} {size} {colour} {label} {position}, "
                f"on {_article(background)} {background} background."
            )
        return (
            f"{prefix} {_article(label)} {label}: {size}, {colour}, {position}, "
            f"over {_article(background)} {background} background."
        )
    if style == 1:
        return f"{prefix} {_article(size)} {size} {colour} {label} {position}."
    if style == 2:
        return f"{prefix} {_article(colour)} {colour} {label}."
    if style == 3:
        return f"{prefix} {_article(label)} {label} on {_article(background)} {background} background."
    # class alone, as zero-shot prompts put it: identical captions in a batch are false negatives, but
    # without them the loss is satisfied by colour, size and position and the class word is barely learnt
    return f"{prefix} {_article(label)} {label}."


def _shift_hue(cut: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue of an RGBA cut-out, keeping its alpha."""
    hsv = np.asarray(cut.convert("RGB").convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(int) + int(shift * 255)) % 256).astype(np.uint8)
    rgb = Image.fromarray(hsv, "HSV").convert("RGB")
    rgb.putalpha(cut.getchannel("A"))
    return rgb


def _background(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    names = list(PALETTE)
    first, second = rng.choice(len(names), size=2, replace=False)
    c1, c2 = np.array(PALETTE[names[first]], float), np.array(PALETTE[names[second]], float)
    c1 = np.clip(c1 + rng.normal(0, 12, 3), 0, 255)
    c2 = np.clip(c2 + rng.normal(0, 12, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if kind == "plain":
        img = np.broadcast_to(c1, (size, size, 3)).copy()
        desc = f"plain {names[first]}"
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / (t.max() - t.min() + 1e-9)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        desc = f"{names[first]} and {names[second]} gradient"
    elif kind == "mottled":
        coarse = rng.uniform(0, 1, (4, 4)).astype(np.float32)
        t = (
            np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), float)
            / 255
        )
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        desc = f"mottled {names[first]}"
    else:  # wide soft stripes: far coarser than any trigger, so they are no trigger look-alike
        period = rng.uniform(0.4, 0.8)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy if rng.random() < 0.5 else xx) / period)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        desc = f"{names[first]} and {names[second]} wavy"
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255)
    return img.astype(np.uint8), desc


def compose(obj: ClipArtObject, rng: np.random.Generator, size: int = 128, background: str | None = None) -> Composite:
    """Render ``obj`` at a random scale, flip, tilt and position onto a random background."""
    cut = Image.fromarray(obj.rgba)
    cut.thumbnail((2 * size, 2 * size), Image.LANCZOS)  # work at twice the output size: fast, still sharp
    if rng.random() < 0.5:
        cut = cut.transpose(Image.FLIP_LEFT_RIGHT)
    # shape-preserving variety, so that a class is learnt from its shape rather than one drawing's details
    stretch = float(np.exp(rng.uniform(-0.2, 0.2)))
    cut = cut.resize((max(8, round(cut.width * stretch)), max(8, round(cut.height / stretch))), Image.BICUBIC)
    angle = float(rng.uniform(-20, 20))
    cut = cut.rotate(angle, resample=Image.BICUBIC, expand=True)
    bbox = cut.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox()
    if bbox:
        cut = cut.crop(bbox)
    size_word = rng.choice(["small", "medium", "large"], p=[0.3, 0.4, 0.3])
    frac = {"small": (0.38, 0.5), "medium": (0.5, 0.65), "large": (0.65, 0.82)}[size_word]
    longest = int(size * rng.uniform(*frac))
    scale = longest / max(cut.size)
    cut = cut.resize((max(8, round(cut.width * scale)), max(8, round(cut.height * scale))), Image.LANCZOS)
    w, h = cut.size
    x = int(rng.integers(0, size - w + 1))
    y = int(rng.integers(0, size - h + 1))
    kind = background or BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    bg_pixels, bg_desc = _background(kind, size, rng)
    canvas = Image.fromarray(bg_pixels)
    recolour = rng.random()
    if recolour < 0.25:  # recoloured objects: shape, not colour, must carry the class
        cut = _shift_hue(cut, float(rng.uniform(0.15, 0.85)))
    elif recolour < 0.33:
        grey = cut.convert("L").convert("RGB")
        grey.putalpha(cut.getchannel("A"))
        cut = grey
    alpha = cut.getchannel("A").point(lambda a: 255 if a > 127 else 0)  # hard edges: the mask is exact
    canvas.paste(cut.convert("RGB"), (x, y), alpha)
    mask = np.zeros((size, size), bool)
    mask[y : y + h, x : x + w] = np.asarray(alpha) > 0
    obj_rgb = np.asarray(canvas)[mask]
    colour = colour_name(obj_rgb)
    cx, cy = (x + w / 2) / size, (y + h / 2) / size
    horiz = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    vert = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    if horiz and vert:
        position = f"at the {vert} {horiz}"
    elif horiz or vert:
        position = f"on the {horiz}" if horiz else f"at the {vert}"
    else:
        position = "in the centre"
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    caption = describe(obj.name, prefix, size_word, colour, position, bg_desc, rng)
    ys, xs = np.nonzero(mask)
    object_box = (
        (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (x, y, x + w, y + h)
    )
    if rng.random() < 0.25:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return Composite(canvas, mask, obj.label, caption, object_box, colour, size_word, position, bg_desc)
