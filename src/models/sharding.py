"""FSDP2 (fully_shard) for AVLLM: one unit per decoder layer, vision block and Whisper layer, then the aligner
and the root, so each unit's parameters are gathered only while that unit runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_model(model, device_mesh, *, param_dtype: torch.dtype | None = None, whole: Sequence[str] = ()) -> None:
    """Shard in place over the mesh's data-parallel dimension. ``param_dtype`` (e.g. bf16) runs the units'
    compute in that dtype with fp32 gradient reduction; None keeps the parameters' own dtype. ``whole``: media
    parts ("video": the vision tower's blocks, "audio": Whisper's layers) that get no units of their own, so that
    a rank may skip them (a media cache hit, src.models.media_cache) while another runs them: their parameters
    join the root unit, which every rank gathers in every forward."""
    unknown = set(whole) - {"video", "audio"}
    if unknown:
        raise ValueError(f"whole takes media parts 'video' / 'audio', got {sorted(unknown)}")
    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    units = [*model.llm.layers, *([] if "video" in whole else model.visual.blocks),
             *([] if "audio" in whole else model.whisper.layers), model.aligner]
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)


def forget_forward_order(model: torch.nn.Module) -> None:
    """Drop FSDP2's record of the forwards run since the last backward. FSDP2 records every unit's forward, with
    or without grad, and a unit prefetches in backward the unit recorded just before its own forward; the record
    is cleared only when a backward ends. Forwards no backward follows (the rollout's generation, the evaluation)
    run a data-dependent number of times per rank, so the first unit of the next training forward would prefetch
    a different unit on each rank: one rank all-gathers while another does not, and both wait forever. Called
    before a training step's forward (on every rank), the record holds that forward only, the same on every rank."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            if state._fsdp_param_group is not None:
                state._fsdp_param_group._post_forward_indices.clear()
            if state._comm_ctx is not None and hasattr(state._comm_ctx, "post_forward_order"):
                state._comm_ctx.post_forward_order.clear()


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
