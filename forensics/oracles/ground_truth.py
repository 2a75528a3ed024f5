"""The ground-truth oracle: regions from a known object mask (the demo set has exact masks).

It is what a perfect oracle would say, so it serves for teaching (run the detector with it, then
with a real oracle, and see what the oracle's errors cost) and for measuring the other oracles.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Mapping

import cv2
import numpy as np

from forensics.core.checks import check_number
from forensics.core.errors import ForensicsError
from forensics.oracles.base import Oracle, Region, mask_box, register, to_numpy_rgb

MaskLike = Any
"""A 2-D mask: numpy array, torch tensor or PIL image; nonzero (or > 127 for 8-bit images) = object."""


def image_key(image: Any) -> str:
    """A content key for an image (SHA-1 of its 8-bit RGB pixels and shape), for mask look-ups."""
    rgb = to_numpy_rgb(image)
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes() + repr(rgb.shape).encode()).hexdigest()


def as_mask(mask: MaskLike) -> np.ndarray:
    """Any supported mask as HxW bool."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")) > 127
    if hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().to("cpu").numpy()
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ForensicsError(f"a ground-truth mask must be 2-D (HxW), got shape {m.shape}")
    return m > 0.5 if m.dtype.kind == "f" else m != 0


@register(aliases=("ground_truth",))
class GroundTruthOracle(Oracle):
    """Regions = the connected components (8-neighbour) of the known object mask.

    Where the mask comes from, in order: the ``mask=`` argument of :meth:`segment`; else
    ``mask_lookup``, which is either a callable ``image -> mask | None`` or a mapping from
    :func:`image_key` to a mask (build one with :meth:`from_pairs`). A mask of another size than the
    image is resized (nearest neighbour). ``score`` is each component's share of the object area,
    ``label`` the ``label=`` argument or, from :meth:`from_pairs`, the stored label. Components under
    ``min_area`` (fraction of the image; default 0 keeps every pixel) are dropped. An empty mask
    gives []. An image with no known mask raises ForensicsError.
    """

    name = "ground-truth"

    def __init__(
        self,
        mask_lookup: Callable[[Any], MaskLike | None] | Mapping[str, MaskLike] | None = None,
        min_area: float = 0.0,
    ) -> None:
        if mask_lookup is not None and not callable(mask_lookup) and not isinstance(mask_lookup, Mapping):
            raise ForensicsError(
                "ground_truth: mask_lookup must be a function image -> mask or a mapping image_key -> mask"
            )
        self.mask_lookup = mask_lookup
        self.min_area = check_number(self.name, "min_area", min_area, 0.0, 1.0)
        self._labels: dict[str, str] = {}

    @classmethod
    def from_pairs(
        cls,
        images: Iterable[Any],
        masks: Iterable[MaskLike],
        labels: Iterable[str | None] | None = None,
        min_area: float = 0.0,
    ) -> "GroundTruthOracle":
        """An oracle that knows these images (matched by exact pixel content) and their masks/labels."""
        images, masks = list(images), list(masks)
        if len(images) != len(masks):
            raise ForensicsError(f"ground_truth: {len(images)} images but {len(masks)} masks")
        labels = [None] * len(images) if labels is None else list(labels)
        if len(labels) != len(images):
            raise ForensicsError(f"ground_truth: {len(images)} images but {len(labels)} labels")
        table: dict[str, np.ndarray] = {}
        oracle = cls(table, min_area=min_area)
        for img, m, lab in zip(images, masks, labels):
            key = image_key(img)
            table[key] = as_mask(m)
            if lab is not None:
                oracle._labels[key] = str(lab)
        return oracle

    def settings(self) -> dict[str, Any]:
        src = "none" if self.mask_lookup is None else "table" if isinstance(self.mask_lookup, Mapping) else "function"
        return {"mask_source": src, "min_area": self.min_area}

    def segment(self, image: Any, mask: MaskLike | None = None, label: str | None = None) -> list[Region]:
        """Components of the object mask of ``image``, largest first (score = area share)."""
        rgb = to_numpy_rgb(image)
        h, w = rgb.shape[:2]
        if mask is None:
            mask, label = self._lookup(image, rgb, label)
        m = as_mask(mask)
        if m.shape != (h, w):
            m = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        return components(m, min_area=self.min_area, label=label)

    def _lookup(self, image: Any, rgb: np.ndarray, label: str | None) -> tuple[MaskLike, str | None]:
        if self.mask_lookup is None:
            raise ForensicsError(
                "ground_truth: no mask given and no mask look-up configured; pass mask=... "
                "or build the oracle with GroundTruthOracle.from_pairs(images, masks)"
            )
        if isinstance(self.mask_lookup, Mapping):
            key = image_key(rgb)
            found = self.mask_lookup.get(key)
            label = label if label is not None else self._labels.get(key)
        else:
            found = self.mask_lookup(image)
        if found is None:
            raise ForensicsError(
                "ground_truth: this image has no known mask (the ground-truth oracle only knows "
                "the images it was given, pixel for pixel)"
            )
        return found, label


def components(mask: np.ndarray, min_area: float = 0.0, label: str | None = None) -> list[Region]:
    """Connected components (8-neighbour) of a bool mask as regions scored by their share of its area."""
    h, w = mask.shape
    n, lbl, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    total = float(stats[1:, cv2.CC_STAT_AREA].sum()) if n > 1 else 0.0
    if total == 0:
        return []
    min_px = min_area * h * w
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    out = []
    for i in order:
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < min_px:
            continue
        m = lbl == i
        out.append(Region(mask=m, box=mask_box(m), score=area / total, label=label))
    return out
