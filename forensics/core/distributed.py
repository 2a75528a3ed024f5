"""Several processes (``torchrun``, ``accelerate launch``, ``mpirun``): rank, world size, barrier, gather, shards.

In one process (no launcher) nothing here touches ``torch.distributed`` and every helper is the identity. Under a
launcher, :func:`init` joins its process group once, through accelerate (gloo on CPU, nccl on GPUs with each rank
on its own GPU), so the pipelines can shard probe images, gather per-image results and let one process write.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch

from forensics.core.errors import ForensicsError

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun, MPI launchers


def launched_world_size() -> int:
    """The number of processes the launcher started (its environment), 1 without a launcher."""
    for var in _WORLD_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return int(value)
    return 1


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init() -> None:
    """Join the launcher's process group (once; nothing in one process), so all helpers below see the others."""
    if launched_world_size() > 1 and not _initialized():
        from accelerate import PartialState

        # the same state the defenses' Accelerator then uses; a long timeout, as the others wait while rank 0 runs
        # the detectors that are not shared out and writes the outputs
        PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=3))


def shutdown(wait: bool = True) -> None:
    """Leave the process group before the interpreter exits (nothing in one process): a gloo group left to the exit's
    destructors can abort a rank ("terminate called without an active exception") once the other has gone. With
    ``wait``, a barrier first, so no rank tears down while another still talks to it; without (an error path), none,
    as the others may never get there."""
    if not _initialized():
        return
    if wait:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def world_size() -> int:
    """How many processes run this command (1 without a launcher)."""
    init()
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank, 0 to world_size - 1 (0 without a launcher)."""
    init()
    return torch.distributed.get_rank() if _initialized() else 0


def is_main() -> bool:
    """True in the one process that prints and writes a command's outputs (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing in one process)."""
    if world_size() > 1:
        torch.distributed.barrier()


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (``obj`` itself in one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's contiguous block ``[lo, hi)`` of ``n`` items, near-equal blocks in rank order (all of them in one
    process); contiguous, so per-item seeds and gathered results keep the one-process order."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    return n * rank_ // world, n * (rank_ + 1) // world


def shard_sizes(n: int, world: int | None = None) -> list[int]:
    """How many of ``n`` items each rank's :func:`shard_range` holds, in rank order."""
    world = world_size() if world is None else world
    return [hi - lo for lo, hi in (shard_range(n, r, world) for r in range(world))]


def rank_and_world(rank_: int | None = None, world: int | None = None) -> tuple[int, int, bool]:
    """This process's rank and the number of processes (given, else the launcher's) and whether the process group
    is up; refuses a rank outside 0..world-1."""
    init()
    distributed = _initialized()
    rank_ = (torch.distributed.get_rank() if distributed else 0) if rank_ is None else int(rank_)
    world = (torch.distributed.get_world_size() if distributed else 1) if world is None else int(world)
    if world < 1 or not 0 <= rank_ < world:
        raise ForensicsError(f"rank {rank_} of world size {world}: the rank must be in 0..world_size-1")
    return rank_, world, distributed


def global_mean(local: torch.Tensor, count: int) -> torch.Tensor:
    """This rank's term for the mean over ``count`` values shared out across the processes: ``local.mean()`` in one
    process, else ``local.sum() * world / count``, so DDP's averaging of gradients gives the gradient of that mean."""
    world = world_size()
    if world == 1:
        return local.mean()
    return local.sum() * (world / max(1, count))


def gather_rows(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's rows (``counts[r]`` of them, rank order) on every rank, gradients flowing back to each rank's own
    (a contrastive loss over the whole batch); ``local`` itself in one process."""
    if len(counts) == 1:
        return local
    from torch.distributed.nn.functional import all_gather  # its backward sums over ranks, on gloo too

    size = max(counts)
    if len(local) < size:  # all_gather needs equal shapes: pad, then drop the padding
        local = torch.cat([local, local.new_zeros(size - len(local), *local.shape[1:])])
    with warnings.catch_warnings():  # deprecated (functional collectives); this one is tested on gloo
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(local)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, values): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process, as DDP broadcasts them before each forward."""
    if world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _synced_batchnorm_forward(self: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm whose training-mode statistics are those of the whole batch across the processes (any backend)."""
    if not self.training:
        return type(self).forward(self, x)
    from torch.distributed.nn.functional import all_reduce  # its backward sums the gradients over ranks

    c, dims = x.shape[1], [0, *range(2, x.dim())]
    wide = x.double()  # E[x^2] - E[x]^2 in float64: no cancellation worth the name
    local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_tensor([x.numel() / max(1, c)])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        total = all_reduce(local)
    n = total[-1].clamp(min=1)
    mean = total[:c] / n
    var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * n / (n - 1).clamp(min=1)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


@contextmanager
def synced_batchnorm(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s BatchNorm layers in training mode normalise with the statistics of every
    process's share of the batch (torch's SyncBatchNorm needs GPUs), so a shared-out batch trains as one; nothing
    changes in one process."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if world_size() == 1 or not layers:
        yield
        return
    for layer in layers:
        layer.forward = _synced_batchnorm_forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
