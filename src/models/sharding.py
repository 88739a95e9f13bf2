"""FSDP2 (fully_shard) for AVLLM: one unit per decoder layer, vision block and Whisper layer, then the aligner
and the root, so each unit's parameters are gathered only while that unit runs."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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
