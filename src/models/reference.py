"""The DPO reference without a second model: the adapter bypassed, and the round-start values of the other
trainable parameters swapped in for the duration of a no-grad pass.

Why the snapshot: the LoRA bypass restores the LLM's round-start function only. Trainable non-LoRA parts (the
aligner and the visual merger in the paper's DPO stage, or the whole LLM in a from-scratch tiny run) drift with
training; a reference that used their current values would move with the policy (the official 7B code's bug).
So at each round start the values of exactly those parameters are copied (whole tensors, on the CPU: for the
aligner + merger a few percent of a 7B's size; for a fully trained LLM a full CPU copy), and the reference pass
writes them into the parameters, runs, and writes the current values back, bit for bit.

Sharded (FSDP2): the snapshot holds whole tensors (taken with an all-gather, so it is the same on every rank and
can live in a rank-0 checkpoint); each rank writes its own rows in. The gathered copies that the FSDP2 root keeps
after a forward are dropped before and after the swap, so no forward ever reads stale values.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from src.models.lora import adapters_disabled
from src.models.sharding import copy_full_, full_tensor, local_tensor, reshard_all


def trainable_base_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that train but are not LoRA tensors: what the adapter bypass cannot restore."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}


class ReferenceSnapshot:
    """Round-start values of the trainable non-LoRA parameters, by name (whole tensors, CPU)."""

    def __init__(self, values: dict[str, torch.Tensor] | None = None):
        self.values: dict[str, torch.Tensor] = dict(values or {})

    @classmethod
    @torch.no_grad()
    def take(cls, model: torch.nn.Module) -> ReferenceSnapshot:
        """Copy the current values (a collective under FSDP2: call on every rank)."""
        return cls({name: full_tensor(p.detach()).to("cpu", copy=True)
                    for name, p in trainable_base_parameters(model).items()})

    def __bool__(self) -> bool:
        return bool(self.values)

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Inside: the snapshot's values in the parameters. On exit: the values from before, exactly. Use under
        no_grad and outside any live autograd graph (the writes bump the parameters' version counters)."""
        if not self.values:
            yield model
            return
        params = dict(model.named_parameters())
        missing = sorted(set(self.values) - set(params))
        if missing:
            raise KeyError(f"reference snapshot names parameters the model lacks: {missing[:5]}")
        with torch.no_grad():
            reshard_all(model)
            current = {name: local_tensor(params[name]).detach().clone() for name in self.values}
            for name, value in self.values.items():
                copy_full_(params[name], value)
        try:
            yield model
        finally:
            with torch.no_grad():
                reshard_all(model)
                for name, value in current.items():
                    local_tensor(params[name]).copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.values = dict(state)


@contextmanager
def reference_mode(model: torch.nn.Module, snapshot: ReferenceSnapshot):
    """The round-start model: no grad, eval mode (no dropout, as the rollout scores its samples), adapter
    bypassed, snapshot swapped in. Train/eval mode and every value are restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapters_disabled(model), snapshot.swapped_in(model):
            yield model
    finally:
        model.train(was_training)
