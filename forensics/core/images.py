"""Images as the whole library handles them: float tensors 3 x H x W in [0, 1], pixel boxes, one safe file
loader, and the paste / blend / crop operations that attacks, detectors and defenses share."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from forensics.core.errors import ForensicsError

Box = tuple[int, int, int, int]
"""A pixel box (x0, y0, x1, y1), end exclusive; (0, 0, 0, 0) for an empty mask."""

MAX_IMAGE_PIXELS = 64_000_000
"""Larger images are refused by every loader (decompression bombs)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a PIL image of any mode (the same object when it is RGB already).

    PIL's own ``convert("RGB")`` clips 16-bit, 32-bit and float values to 0..255, so a 16-bit PNG turns all
    white; here they are scaled instead (16-bit: 0..65535 to 0..255; ``I``: by its range, see
    ``_gray_to_uint8``; ``F``: [0, 1] or 0..max to 0..255). Transparent pixels (alpha, a palette or colour key)
    are composited onto white, as a browser shows them on a white page, rather than revealing whatever colour
    the file stores under them. Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, ...) goes through PIL.
    """
    mode = image.mode
    if mode == "RGB" and not image.has_transparency_data:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _gray_to_uint8(image)
        key = image.info.get("transparency")
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            gray[np.asarray(image) == key] = 255  # a colour-keyed transparent value: white, like alpha below
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("LA" if mode == "La" else "RGBA").convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """The values of a one-channel ``I;16*``, ``I`` or ``F`` image scaled to uint8 (H x W, a fresh array).

    16-bit: / 257 (0..65535 to 0..255). ``I`` (32-bit int) holds any range, so it is read as 8-bit when its
    maximum is <= 255, as 16-bit when <= 65535 (how PIL loads many 16-bit files), else scaled by its maximum.
    ``F``: values within [0, 1] times 255, else scaled by the maximum; NaN is 0, +inf the maximum. Negative
    values become 0.
    """
    arr = np.asarray(image).astype(np.float32)  # float32 is exact for 16-bit values and halves 64 MP's memory
    if image.mode.startswith("I;16"):
        scale = 1.0 / 257.0
    else:
        finite = np.isfinite(arr)
        if not finite.all():
            top_finite = float(arr[finite].max()) if finite.any() else 0.0
            arr = np.where(np.isposinf(arr), top_finite, np.where(finite, arr, 0.0)).astype(np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if image.mode == "F":
            low = float(arr.min()) if arr.size else 0.0
            scale = 255.0 if low >= 0.0 and top <= 1.0 else (255.0 / top if top > 0 else 0.0)
        elif top <= 255:
            scale = 1.0
        elif top <= 65535:
            scale = 1.0 / 257.0
        else:
            scale = 255.0 / top
    arr *= scale
    np.clip(arr, 0.0, 255.0, out=arr)
    return np.rint(arr).astype(np.uint8)


def to_tensor(pil: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) as a float32 3xHxW tensor in [0, 1] (converted by ``to_rgb`` first)."""
    arr = np.asarray(to_rgb(pil), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A 3xHxW (or HxW) float tensor in [0, 1] as an 8-bit RGB (or L) PIL image; values are clamped and rounded."""
    t = tensor.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    if t.dim() == 3 and t.shape[0] == 3:
        return Image.fromarray(t.permute(1, 2, 0).numpy(), mode="RGB")
    if t.dim() == 2:
        return Image.fromarray(t.numpy(), mode="L")
    raise ForensicsError(f"to_pil: expected a 3xHxW or HxW tensor, got shape {tuple(tensor.shape)}")


MAX_RESIZED_AREA = 16
"""The resize before the centre crop makes at most this many model-sized squares (a 16:1 image); a longer one has
only its centred square resized."""


def pil_to_model_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP-style resize (shorter side to ``size``, bicubic) + centre crop of a PIL image (any mode, via ``to_rgb``)
    to a tensor in [0, 1]."""
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if new_w * new_h > MAX_RESIZED_AREA * size * size:
        # a long thin image (1 x 60000) would be resized to millions of pixels only to be cropped: resize just the
        # centred square that the crop keeps
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    else:
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return data.permute(2, 0, 1).float().div(255.0)


def read_pil(path: str | Path, what: str = "image") -> Image.Image:
    """Open and decode one image file, refusing oversized ones (decompression bombs) before decoding; every
    failure is one ForensicsError line naming the file. The one way this library opens an image file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ForensicsError(
                    f"{what} {path.name} is too large ({im.width}x{im.height} pixels; limit {MAX_IMAGE_PIXELS:,})"
                )
            im.load()
            return ImageOps.exif_transpose(im)  # upright as a camera meant it; a copy, detached from the file
    except ForensicsError:
        raise
    except FileNotFoundError:
        raise ForensicsError(f"{what} {path.name} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ForensicsError(f"cannot read {what} {path.name}: {exc}") from None


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read one image file as 3 x size x size in [0, 1]; unreadable or oversized files give a clear error.

    The one loader for probe sets, training data and poisoning, so every path has the same size limit.
    """
    return pil_to_model_tensor(read_pil(path), size)


def paste(images: torch.Tensor, patch: torch.Tensor, boxes: Box | Sequence[Box]) -> torch.Tensor:
    """A copy of ``images`` (3 x H x W, or B x 3 x H x W) with ``patch`` pasted into ``boxes``: one box for all
    images, or one per image. Differentiable in ``patch`` (optimised patches and inverted triggers use it)."""
    out = images.clone()
    patch = patch.to(device=images.device, dtype=images.dtype)
    if images.dim() == 3:
        x0, y0, x1, y1 = boxes  # type: ignore[misc]
        out[:, y0:y1, x0:x1] = patch
        return out
    if isinstance(boxes, tuple) and len(boxes) == 4 and all(isinstance(v, (int, np.integer)) for v in boxes):
        boxes = [boxes] * len(images)  # type: ignore[list-item]
    boxes = list(boxes)  # type: ignore[arg-type]
    if boxes and all(b == boxes[0] for b in boxes):
        x0, y0, x1, y1 = boxes[0]
        out[:, :, y0:y1, x0:x1] = patch
        return out
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, :, y0:y1, x0:x1] = patch
    return out


def random_boxes(n: int, height: int, width: int, side: int, generator: torch.Generator) -> list[Box]:
    """``n`` square boxes of ``side`` pixels, each fully inside the image, placed uniformly by ``generator``."""
    ys = torch.randint(0, height - side + 1, (n,), generator=generator).tolist()
    xs = torch.randint(0, width - side + 1, (n,), generator=generator).tolist()
    return [(x, y, x + side, y + side) for y, x in zip(ys, xs)]


def blend(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Stamp a mask + pattern trigger: ``m * t + (1 - m) * x`` (mask 1 or 3 x H x W broadcast over the batch)."""
    mask, pattern = mask.to(images.device), pattern.to(images.device)
    return mask * pattern + (1 - mask) * images


def crop_resize(image: torch.Tensor, box: Box, size: int, pad: float = 0.08) -> torch.Tensor:
    """The box (padded by ``pad`` of its size) cut out and resized to size x size: how CLIP sees one region."""
    x0, y0, x1, y1 = box
    px, py = int((x1 - x0) * pad) + 1, int((y1 - y0) * pad) + 1
    x0, y0 = max(0, x0 - px), max(0, y0 - py)
    x1, y1 = min(image.shape[2], x1 + px), min(image.shape[1], y1 + py)
    crop = image[:, y0:y1, x0:x1]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def inpaint_box(image: torch.Tensor, box: Box) -> torch.Tensor:
    """The image with the box inpainted from its surroundings (OpenCV Telea), so a trigger there is gone."""
    import cv2

    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    x0, y0, x1, y1 = box
    mask[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = 255
    out = cv2.inpaint(rgb, mask, 5, cv2.INPAINT_TELEA)
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255.0


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two pixel boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def load_pattern(path: str | Path) -> torch.Tensor:
    """A trigger pattern file as a 3 x h x w tensor in [0, 1] at its own size (patterns are pasted, not resized),
    with the same size limit and one-line errors as :func:`load_image`."""
    return to_tensor(read_pil(path, "trigger pattern"))
