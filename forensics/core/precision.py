"""Numeric precision of the repairs' training passes: fp32, or bf16 autocast (mixed precision, fp32 weights).

bf16 autocast runs the towers' convolutions and matrix products in bfloat16 while the weights, the optimiser and
the losses stay in fp32 (torch.autocast, the mechanism accelerate's ``mixed_precision="bf16"`` uses; we call it
directly because accelerate fixes one precision per process, and one process runs several repairs). On a CPU with
native bf16 (AVX512-BF16 or AMX) or a bf16 GPU, a training step of the demo's tower runs about 1.6x faster
(bench/repair_speed.py); elsewhere it would be emulated and slower, so ``auto`` takes it only where it is native.
Scans and CA/ASR measurements always run in fp32. A bf16 repair is deterministic for a seed and a thread count;
an fp32 one for a seed alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from forensics.core.errors import ForensicsError

PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (a CUDA GPU that supports it, or a CPU with AVX512-BF16 / AMX)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``precision`` (fp32, bf16 or auto; None: fp32) on ``device``; refuses others, and
    bf16 where the device cannot run it."""
    chosen = "fp32" if precision is None else str(precision).lower()
    if chosen not in PRECISIONS:
        raise ForensicsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if chosen == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if chosen == "bf16" and torch.device(device).type not in ("cpu", "cuda"):
        raise ForensicsError(f"bf16 autocast runs on a CPU or a CUDA GPU, not on {torch.device(device).type}")
    return chosen


def training_layout(pixels: torch.Tensor, precision: str) -> torch.Tensor:
    """A training batch in the memory layout for ``precision``: channels-last for bf16 (1.2-1.3x faster convolutions
    on CPU), contiguous for fp32. Channels-last weight gradients depend on the thread count (the demo's CleanCLIP
    repair: CA 0.526 on 1 thread, 0.489 on 2; contiguous: 0.519 on both), so fp32 repairs keep the layout whose
    results a seed alone fixes; bf16 results depend on the thread count in either layout, so bf16 takes the fast
    one."""
    return pixels.contiguous(memory_format=torch.channels_last) if precision == "bf16" else pixels.contiguous()


@contextlib.contextmanager
def training_autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """The context for a repair's training forward passes: bf16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield
