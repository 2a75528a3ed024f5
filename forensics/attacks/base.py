"""The attack interface, the registry, and small helpers shared by every attack.

An attack turns one clean image (a 3xHxW float tensor in [0, 1]) into a triggered one and says
where the trigger is (a pixel box, or None for whole-image triggers). Everything fixed about an
attack (a noise pattern, a warp field) is drawn once from its ``seed``; everything drawn per image
(a random position, fresh noise) comes from the ``rng`` passed to :meth:`Attack.apply`, so a
poisoned data set is reproducible from (attack parameters, seed).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from forensics.core.checks import check_choice, check_image, check_int, check_number, check_seed
from forensics.core.errors import ForensicsError
from forensics.core.images import Box, to_pil, to_tensor
from forensics.core.progress import Progress
from forensics.core.registry import Registry

ATTACKS: Registry = Registry("attack", "parameter")
"""Registered attack classes by name; filled by ``@ATTACKS.register`` when the attack modules import."""
register = ATTACKS.register

POSITIONS = ("random", "bottom-right", "top-left", "top-right", "bottom-left", "center")
"""Where a patch may be placed; ``random`` is drawn per image, fully inside the image."""


class Attack(ABC):
    """A backdoor trigger: fixed parts come from ``seed``, per-image randomness from ``rng``.

    Subclasses validate their keyword parameters, then call ``super().__init__(seed=seed, **params)``
    with the normalised values; :meth:`params` returns exactly those, so
    ``build_attack(a.name, **a.params())`` rebuilds an identical attack.
    """

    name: ClassVar[str]

    def __init__(self, seed: int = 0, **params: Any) -> None:
        self.seed = check_seed(seed)
        self._params: dict[str, Any] = {"seed": self.seed, **params}

    @abstractmethod
    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Trigger one image.

        image: float tensor 3xHxW in [0,1] (any H, W). Returns (new image in [0,1], trigger box
        (x0,y0,x1,y1) in pixels, exclusive end, or None for whole-image triggers). Never modifies
        the input in place.
        """

    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters (including ``seed``) that rebuild this exact attack."""
        return copy.deepcopy(self._params)

    def to_dict(self) -> dict[str, Any]:
        """``{"attack": name, **params()}``: the form stored in poison.json and read by ``attack_from_dict``."""
        return {"attack": self.name, **self.params()}

    def apply_batch(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, list[Box | None]]:
        """Trigger a batch Bx3xHxW image by image (per-image draws come from ``rng`` in batch order)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ForensicsError(f"{self.name}: expected a batch of RGB images Bx3xHxW, got {shape}")
        outs, boxes = [], []
        for img in images:
            out, box = self.apply(img, rng)
            outs.append(out)
            boxes.append(box)
        if not outs:
            return images.clone(), []
        return torch.stack(outs), boxes

    def __repr__(self) -> str:
        shown = {k: ("<%d values>" % _count(v) if isinstance(v, list) else v) for k, v in self._params.items()}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _count(v: Any) -> int:
    return sum(_count(x) for x in v) if isinstance(v, list) else 1


# ----------------------------------------------------------------------------------------------
# patch placement


def patch_side(size: float, height: int, width: int) -> int:
    """Patch side in pixels: ``size`` times the shorter image side, rounded half up, at least 1."""
    return max(1, min(height, width, int(math.floor(size * min(height, width) + 0.5))))


def patch_box(height: int, width: int, side: int, position: str, margin: int, rng: np.random.Generator | None) -> Box:
    """Box of a ``side``-pixel square patch at ``position``, always fully inside the image.

    Fixed corners sit ``margin`` pixels from the borders; the margin shrinks when the image is too
    small to hold patch plus margin. ``random`` draws the top-left corner uniformly from ``rng``.
    """
    side = min(side, height, width)
    my = max(0, min(margin, height - side))
    mx = max(0, min(margin, width - side))
    if position == "random":
        if rng is None:
            raise ForensicsError("a random patch position needs an rng")
        y0 = int(rng.integers(0, height - side + 1))
        x0 = int(rng.integers(0, width - side + 1))
    elif position == "center":
        y0, x0 = (height - side) // 2, (width - side) // 2
    elif position == "top-left":
        y0, x0 = my, mx
    elif position == "top-right":
        y0, x0 = my, width - side - mx
    elif position == "bottom-left":
        y0, x0 = height - side - my, mx
    elif position == "bottom-right":
        y0, x0 = height - side - my, width - side - mx
    else:  # validated in the constructors; kept for direct callers
        raise ForensicsError(f"unknown patch position {position!r}; valid: {', '.join(POSITIONS)}")
    return (x0, y0, x0 + side, y0 + side)


ProgressFn = Progress

__all__ = [
    "ATTACKS",
    "POSITIONS",
    "Attack",
    "Box",
    "ProgressFn",
    "check_choice",
    "check_image",
    "check_int",
    "check_number",
    "check_seed",
    "patch_box",
    "patch_side",
    "register",
    "to_pil",
    "to_tensor",
]
