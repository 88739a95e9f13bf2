"""FSDP2 (fully_shard) for AVLLM: one unit per decoder layer, vision block and Whisper layer, then the aligner
and the root, so each unit's parameters are gathered only while that unit runs."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_model(model, device_mesh, *, param_dtype: torch.dtype | None = None) -> None:
    """Shard in place over the mesh's data-parallel dimension. ``param_dtype`` (e.g. bf16) runs the units'
    compute in that dtype with fp32 gradient reduction; None keeps the parameters' own dtype."""
    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    units = [*model.llm.layers, *model.visual.blocks, *model.whisper.layers, model.aligner]
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)


# -- writing parameters that may be FSDP2 shards (DTensor) ------------------------------------------------------


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: writing it writes the parameter), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: a collective, call on every rank)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole-tensor value ``full`` into ``param``; a DTensor keeps its own part (every rank slices the
    same ``full``: no communication)."""
    if isinstance(param, DTensor):
        part = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)


def reshard_all(model: torch.nn.Module) -> None:
    """Make every FSDP2 unit's registered parameters its shards again. The root keeps its gathered copies after
    forward (reshard_after_forward defaults to False there): writes to shards are invisible to the next forward,
    and writes to gathered copies are lost, until this runs."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
