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
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
import torch
from PIL import Image

from forensics.errors import ForensicsError

Box = tuple[int, int, int, int]
"""A trigger box (x0, y0, x1, y1) in pixels, end exclusive."""

ATTACKS: dict[str, type["Attack"]] = {}
"""Registered attack classes by name; filled by :func:`register` when the attack modules import."""

POSITIONS = ("random", "bottom-right", "top-left", "top-right", "bottom-left", "center")
"""Where a patch may be placed; ``random`` is drawn per image, fully inside the image."""

_A = TypeVar("_A", bound="type[Attack]")


def register(cls: _A) -> _A:
    """Class decorator: add an :class:`Attack` subclass to :data:`ATTACKS` under its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    if name in ATTACKS and ATTACKS[name] is not cls:
        raise TypeError(f"attack name {name!r} is already registered by {ATTACKS[name].__name__}")
    ATTACKS[name] = cls
    return cls


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
# image helpers


def to_tensor(pil: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) as a float32 3xHxW tensor in [0, 1] (converted to RGB first)."""
    arr = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A 3xHxW (or HxW) float tensor in [0, 1] as an 8-bit RGB (or L) PIL image; values are clamped and rounded."""
    t = tensor.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    if t.dim() == 3 and t.shape[0] == 3:
        return Image.fromarray(t.permute(1, 2, 0).numpy(), mode="RGB")
    if t.dim() == 2:
        return Image.fromarray(t.numpy(), mode="L")
    raise ForensicsError(f"to_pil: expected a 3xHxW or HxW tensor, got shape {tuple(tensor.shape)}")


def check_image(image: Any, who: str) -> torch.Tensor:
    """Refuse anything that is not a floating 3xHxW tensor, with a plain message."""
    if not isinstance(image, torch.Tensor):
        raise ForensicsError(f"{who}: expected a torch tensor image, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ForensicsError(f"{who}: expected an RGB image tensor of shape 3xHxW, got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ForensicsError(f"{who}: expected a float image in [0,1], got dtype {image.dtype}")
    return image


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


# ----------------------------------------------------------------------------------------------
# parameter validation (every failure is a one-line ForensicsError)


def check_seed(seed: Any) -> int:
    """Seeds are non-negative integers (what numpy's default_rng accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ForensicsError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_number(who: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number within the given (open or closed) bounds, returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ForensicsError(f"{who}: {name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        rng = f"{'(' if lo_open or lo is None else '['}{lo_s}, {hi_s}{')' if hi_open or hi is None else ']'}"
        raise ForensicsError(f"{who}: {name} must be in {rng}, got {value!r}")
    return v


def check_int(who: str, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (floats with an integral value are accepted, as JSON may produce them) within bounds."""
    if isinstance(value, bool):
        raise ForensicsError(f"{who}: {name} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ForensicsError(f"{who}: {name} must be an integer, got {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ForensicsError(f"{who}: {name} must be an integer {bounds}, got {value!r}")
    return v


def check_choice(who: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of a fixed set of strings."""
    if not isinstance(value, str) or value not in choices:
        raise ForensicsError(f"{who}: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


ProgressFn = Callable[[float, str], None]
"""Optional progress callback: ``progress(fraction_done, message)``."""
