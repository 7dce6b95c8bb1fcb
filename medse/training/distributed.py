"""DistributedDataParallel plumbing for ``torchrun`` (no launcher of medse's own).

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address; :func:`init_distributed` joins the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without
them everything runs as a single process through the same code path (world size 1, rank 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process. ``enabled`` is False for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); otherwise a no-op.

    Args:
        device_type: ``"cuda"`` selects the ``nccl`` backend, anything else ``gloo``.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device_type == "cuda":
        import torch

        torch.cuda.set_device(local)  # before any collective: nccl uses the current device
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, enabled=True, owns_group=owns
    )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: Any, info: DistInfo, device: Any = "cpu") -> Any:
    """Sum a float tensor (or a list of floats) over ranks; returns the same kind it was given.

    ``device`` must be the rank's CUDA device under nccl (gloo reduces CPU tensors).
    """
    import torch

    if not info.enabled:
        return values
    import torch.distributed as dist

    as_list = not torch.is_tensor(values)
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.double().cpu().tolist() if as_list else t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (used to share an error or a decision made on rank 0)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(step: int, batch_size: int, info: DistInfo) -> list[int]:
    """Sample indices of this rank's share of global batch ``step``.

    The global batch ``step`` holds indices ``[step * B, (step + 1) * B)``; rank r takes the contiguous
    slice ``r * B/W .. (r + 1) * B/W``, so the union over ranks is exactly the single-process batch and
    the averaged DDP gradient equals the single-process gradient for a per-sample-mean loss.
    """
    if batch_size % info.world_size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the world size {info.world_size}")
    per = batch_size // info.world_size
    start = step * batch_size + info.rank * per
    return list(range(start, start + per))


def cleanup(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if info.enabled and info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
