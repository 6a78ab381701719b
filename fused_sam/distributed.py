"""SAM across processes: the per-replica first pass (m-sharpness), agreement on skips, and
FSDP2's sharded parameters.

With ``DistributedDataParallel`` the default SAM step is *synchronised*: both passes
all-reduce their gradients, every replica perturbs by the same ``e`` and the result equals a
single process on the global batch. The official SAM perturbs each replica with the gradient
of its own sub-batch instead ("m-sharpness", m = the per-replica batch; smaller m generalises
better): pass 1 without the all-reduce, pass 2 all-reduced. DDP only skips its all-reduce when
*both* the forward and the backward run inside ``no_sync()``; :func:`per_replica_pass` wraps
them and tells the optimizer that its next first pass is local, so that a non-finite gradient
on one replica skips the step on every replica (replicas never diverge).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn


class ReplicaLocal(Protocol):
    """An optimizer whose next first pass can be told to be replica-local (``FusedSAM``)."""

    def mark_replica_local(self) -> None: ...


__all__ = [
    "agree_nonfinite",
    "all_finite_everywhere",
    "broadcast_from_rank0",
    "local",
    "per_replica_pass",
    "shard_group",
    "sum_over",
]


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def per_replica_pass(model: nn.Module, optimizer: ReplicaLocal) -> Iterator[None]:
    """Run the first SAM pass of this replica on its own batch (m-sharpness).

    Wrap the forward AND the backward of pass 1; the second pass runs outside, synchronised::

        with per_replica_pass(ddp_model, opt):
            loss_fn(ddp_model(x), y).backward()
        opt.first_step(zero_grad=True)       # e from this replica's own gradient
        loss_fn(ddp_model(x), y).backward()  # all-reduced
        opt.second_step(zero_grad=True)

    Args:
        model: the ``DistributedDataParallel`` module (any module with ``no_sync()``; a plain
            module runs unchanged, e.g. with a world of one).
        optimizer: the FusedSAM whose next :meth:`~fused_sam.FusedSAM.first_step` uses the
            local gradients; it agrees with the other replicas on a skip.
    """
    no_sync = getattr(model, "no_sync", None)
    optimizer.mark_replica_local()
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        yield


def agree_nonfinite(sumsq: Tensor) -> Tensor:
    """``sumsq``, or NaN partials when the norm of any replica is not finite.

    One all-reduce of a flag (MAX) over the default process group, on the device, no host
    sync: every replica then skips its perturbation and its base update together.
    """
    if _world() == 1:
        return sumsq
    import torch.distributed as dist

    flag = torch.logical_not(torch.isfinite(sumsq.sum())).to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return torch.where(flag > 0, torch.full_like(sumsq, float("nan")), sumsq)


# ---------------------------------------------------------------------------------------------
# FSDP2 shards (DTensor parameters)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def shard_group(params: list[Tensor]) -> object | None:
    """The process group over which ``params`` are sharded; ``None`` for plain tensors.

    FusedSAM runs its kernels on the local shards of ``DTensor`` parameters (FSDP2's
    ``fully_shard``) and sums the squared norm over this group, so the step equals the
    unsharded one. Supported: every parameter a DTensor sharded (``Shard(dim)``) over the same
    one-dimensional mesh, as ``fully_shard`` makes them.

    Raises:
        ValueError: a mix of DTensor and plain parameters, a replicated or partial placement,
            or several meshes.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return None
    sharded = [isinstance(p, dtensor) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        raise ValueError(
            "FusedSAM: some parameters are DTensors (FSDP2 shards) and some are not; shard the "
            "whole model with fully_shard, or none of it"
        )
    from torch.distributed.tensor import Shard

    meshes = {id(p.device_mesh) for p in params}
    mesh = params[0].device_mesh
    if len(meshes) != 1 or mesh.ndim != 1:
        raise ValueError("FusedSAM: DTensor parameters must share one one-dimensional mesh")
    if not all(isinstance(pl, Shard) for p in params for pl in p.placements):
        raise ValueError(
            "FusedSAM: DTensor parameters must be sharded (Shard placements, as fully_shard "
            "makes them); replicated ones would count twice in the norm"
        )
    return mesh.get_group()


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same tensor object every step), else ``t``."""
    return getattr(t, "_local_tensor", t)


def sum_over(sumsq: Tensor, group: object) -> Tensor:
    """The squared norm over every shard: the local partials summed over ``group``."""
    import torch.distributed as dist

    total = sumsq.sum().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def all_finite_everywhere(grads: list[Tensor]) -> bool:
    """Whether every gradient is finite, on every rank (so that all ranks refresh together)."""
    import torch.distributed as dist

    if not grads:
        return True
    bad = torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).any()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = bad.float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())
    return not bool(bad)


def broadcast_from_rank0(packed: list[Tensor]) -> None:
    """Give every rank rank 0's masks (one broadcast per device holding masks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_device: dict[torch.device, list[Tensor]] = {}
    for m in packed:
        by_device.setdefault(m.device, []).append(m)
    for ms in by_device.values():
        flat = torch.cat(ms)
        dist.broadcast(flat, src=0)
        for m, part in zip(ms, flat.split([m.numel() for m in ms])):
            m.copy_(part)
