"""FSDP2 (`torch.distributed.fsdp.fully_shard`) helpers: read a sharded tensor whole, write a whole value into its
shards, refuse adapters injected into an already sharded model.

Outside forward, FSDP2 keeps each parameter as a DTensor whose local tensor holds this rank's rows (dim-0 chunks, as
`torch.chunk`); buffers are not sharded. `full` and `write_whole` are collectives on a DTensor: every rank must call
them, for the same tensors, in the same order.
"""

from __future__ import annotations

import torch


def is_dtensor(t: object) -> bool:
    if not (torch.distributed.is_available() and isinstance(t, torch.Tensor)):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered from the shards of a DTensor; a plain tensor as it is)."""
    return t.full_tensor() if is_dtensor(t) else t


@torch.no_grad()
def write_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """target[...] = value, where `value` is the whole tensor: a DTensor `target` gets rank 0's `value` cut to its
    placements (scattered from rank 0, so every rank holds the same logical tensor even if the ranks' `value`s differ
    in their last bits), written into its local shard in place (the storage FSDP all-gathers from)."""
    if not is_dtensor(target):
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        return
    from torch.distributed.tensor import distribute_tensor

    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"cannot write a tensor of shape {tuple(value.shape)} into one of shape {tuple(target.shape)}")
    shard = distribute_tensor(value.to(device=target.device, dtype=target.dtype).contiguous(), target.device_mesh,
                              target.placements, src_data_rank=0)
    target.to_local().copy_(shard.to_local())


def refuse_sharded_base(base: torch.nn.Module, key: str, method: str) -> None:
    """A one-line refusal when `base` (a layer about to be adapted) already holds DTensor weights: adapters injected
    after `fully_shard` would be plain tensors outside FSDP's parameter groups, so their gradients would never be
    reduced across ranks (the replicas drift apart) and optimizers and gradient clipping meet mixed Tensor/DTensor
    parameters. Called before anything is replaced."""
    weight = getattr(base, "weight", None)
    if is_dtensor(weight):
        names = weight.device_mesh.mesh_dim_names
        raise ValueError(
            f"{method} cannot adapt {key!r}: its weight is already sharded (a DTensor on mesh "
            f"{tuple(names) if names else tuple(weight.device_mesh.shape)}, e.g. by fully_shard), and adapters "
            "added now would stay outside the sharding, their gradients never reduced across ranks; call "
            "get_peft_model before fully_shard / accelerator.prepare (the order accelerate and the Trainer use)"
        )
