"""Parameter validation shared by attacks, oracles and defenses: every failure is one plain ForensicsError line."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from forensics.core.errors import ForensicsError


def check_image(image: Any, who: str) -> torch.Tensor:
    """Refuse anything that is not a floating 3xHxW tensor, with a plain message."""
    if not isinstance(image, torch.Tensor):
        raise ForensicsError(f"{who}: expected a torch tensor image, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ForensicsError(f"{who}: expected an RGB image tensor of shape 3xHxW, got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ForensicsError(f"{who}: expected a float image in [0,1], got dtype {image.dtype}")
    return image


def check_seed(seed: Any) -> int:
    """Seeds are non-negative integers (what numpy's default_rng accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ForensicsError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_number(
    who: str,
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
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


def check_labelled_images(
    model: Any, images: torch.Tensor, labels: Sequence[int], class_names: Sequence[str]
) -> torch.Tensor:
    """Validate labelled images against the model and classes; return labels as a long tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ForensicsError(
            f"expected a batch of RGB images (N x 3 x H x W), got {getattr(images, 'shape', type(images))}"
        )
    if len(images) == 0:
        raise ForensicsError("no clean images given")
    if tuple(images.shape[-2:]) != (model.image_size, model.image_size):
        raise ForensicsError(f"images are {tuple(images.shape[-2:])} px but the model takes {model.image_size} px")
    if len(labels) != len(images):
        raise ForensicsError(f"{len(images)} images but {len(labels)} labels")
    if not class_names:
        raise ForensicsError("no class names given")
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= len(class_names)):
        raise ForensicsError(f"labels must index the {len(class_names)} class names")
    return labels_t
