"""Whole weights on every rank for the length of a rollout, when the model is FSDP2-sharded (fully_shard).

Generation runs a data-dependent number of forwards (each rank its own rows, each batch until its samples end),
while a sharded forward all-gathers every unit's weights, a collective all ranks must join: uneven counts
deadlock. Inside :func:`unsharded` every unit is gathered once and kept whole, so forwards are local; on exit
the units are resharded. The cost is holding the whole model (in FSDP's ``param_dtype``) on each device for the
rollout, e.g. about 16 GB for a 7-8B model in bf16. A model without FSDP2 units passes through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.fsdp import FSDPModule


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Gather every FSDP2 unit of ``model`` (collective: call it on every rank) and keep it whole until exit.

    Must be entered with ``model`` itself as the FSDP root (the module fully_shard was applied to last).
    """
    units = fsdp_units(model)
    if not units:
        yield model
        return
    if not isinstance(model, FSDPModule):
        raise ValueError("unsharded() needs the FSDP2 root module: it holds the units' shared state")
    # FSDP picks its root at the first forward; generation calls submodules (embed, the LLM stack) before the
    # root's forward, which would make a sub-unit the root. Settle it here, as the root's forward would.
    model._get_fsdp_state()._lazy_init()
    # The root does not reshard after forward (FSDP's default for the root, kept by shard_model); the other units do.
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        for unit in units:
            if unit is not model:
                unit.set_reshard_after_forward(True, recurse=False)
