"""LoRA on the LLM only (peft), the merged view of a model for export, and the MrDPO round primitives: fold the
adapter into the base in place, re-initialise it, bypass it (the reference), forget its optimizer state.

Targets are matched by a regex over the language model's module paths, so the vision tower and Whisper, which
have q/k/v projections of their own, stay untouched. LoRA layers are injected in place
(peft.inject_adapter_in_model): the module tree keeps its names, so the rest of the code never sees a wrapper.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch.distributed.tensor import DTensor, Replicate, Shard

from src.models.sharding import copy_full_, full_tensor, local_tensor, reshard_all

ADAPTER = "default"


@dataclass
class LoraSettings:
    """The paper's defaults: r 128, alpha 256, dropout 0.05 on q/k/v of the LLM."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def llm_target_regex(targets: tuple[str, ...]) -> str:
    """A regex over the LLM decoder's attention and MLP projections named in `targets` (the names of Qwen2's
    linear layers: q/k/v/o_proj under self_attn, gate/up/down_proj under mlp); an unknown name is refused, since
    it would match nothing or something outside the decoder."""
    unknown = [t for t in targets if t not in ATTENTION_PROJECTIONS + MLP_PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}: use {ATTENTION_PROJECTIONS + MLP_PROJECTIONS}")
    attention = [t for t in targets if t in ATTENTION_PROJECTIONS]
    mlp = [t for t in targets if t in MLP_PROJECTIONS]
    paths = ([r"self_attn\.(" + "|".join(attention) + ")"] if attention else []) + (
        [r"mlp\.(" + "|".join(mlp) + ")"] if mlp else [])
    return r".*language_model\.layers\.\d+\.(" + "|".join(paths) + r")$"


def attach_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject LoRA (A random, B = 0: the model's output is unchanged) into the LLM's target projections."""
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=llm_target_regex(tuple(settings.targets)), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError(f"LoRA matched no module for targets {settings.targets}")
    return model


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """alpha / r of each LoRA layer, by module name."""
    return {name: float(layer.scaling[ADAPTER]) for name, layer in lora_layers(model) if ADAPTER in layer.scaling}


@torch.no_grad()
def merged_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict with every LoRA delta folded in: W + scaling * B @ A under the base model's
    names (``x.base_layer.weight`` -> ``x.weight``), LoRA tensors dropped. Works on any gathered state dict, so
    the sharded (FSDP2) path and the plain one export the same way."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            name = key[: -len(".base_layer.weight")]
            a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
            delta = (b.float() @ a.float()) * scalings[name]
            value = (value.float() + delta).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return out


# -- round boundaries: fold the adapter into the base, start a fresh one -----------------------------------------
# These work on plain tensors and on FSDP2 shards (DTensor, dim-0 sharded: W (out, in), B (out, r) and A (r, in)
# each hold rows [lo, hi) of their first dimension on a rank). Call them on every rank.


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA tensors (A and B of every layer), e.g. to clear their optimizer state after reset_lora_."""
    return [p for _, layer in lora_layers(model) for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
            if ADAPTER in layer.lora_A]


def _row_sharded_alike(weight: torch.Tensor, other: torch.Tensor) -> bool:
    """True when both are plain tensors, or DTensors on one mesh whose placements shard dim 0 only (FSDP2,
    HSDP): then rows i of both local tensors are the same global rows."""
    if not isinstance(weight, DTensor) and not isinstance(other, DTensor):
        return True
    if not (isinstance(weight, DTensor) and isinstance(other, DTensor)):
        return False
    ok = all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in weight.placements)
    return ok and weight.device_mesh == other.device_mesh and tuple(weight.placements) == tuple(other.placements)


def _check_foldable(name: str, layer: LoraLayer) -> None:
    base = layer.get_base_layer()
    if not isinstance(base, torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"{name}: folding supports LoRA on nn.Linear (fan_in_fan_out False) only")
    if layer.use_dora.get(ADAPTER, False) or layer.lora_bias.get(ADAPTER, False):
        raise NotImplementedError(f"{name}: folding DoRA or LoRA-bias adapters is not supported")
    if layer.merged:
        raise ValueError(f"{name}: the adapter is merged with peft's merge(); unmerge it first (disabling it would "
                         "un-merge it again and hide the fold)")


@torch.no_grad()
def fold_lora_(model: torch.nn.Module) -> int:
    """W += scaling * B @ A in place for every LoRA layer; returns the number of layers folded.

    The base weights keep their Parameter objects (an optimizer holding them stays valid). The delta is computed
    in float32 and added once, so W's dtype rounds it once. Sharded (FSDP2): W_local += s * B_local @ A_full:
    B and W share their row split, only the small A (r x in) is all-gathered. The adapter is NOT reset: after
    the fold, adapter-on output = base + 2 x delta until reset_lora_ runs; always call them together (fold,
    then reset). Not peft's merge(): that marks the adapter merged, and disabling it would un-merge.
    """
    reshard_all(model)
    folded = 0
    for name, layer in lora_layers(model):
        if ADAPTER not in layer.lora_A:
            continue
        _check_foldable(name, layer)
        weight = layer.get_base_layer().weight
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if not _row_sharded_alike(weight, b):
            raise NotImplementedError(f"{name}: base weight and lora_B are not row-sharded alike "
                                      f"({_placements(weight)} vs {_placements(b)}); only FSDP/HSDP layouts fold")
        a_full = full_tensor(a)
        w_local, b_local = local_tensor(weight), local_tensor(b)
        delta = (b_local.float() @ a_full.float().to(b_local.device)) * float(layer.scaling[ADAPTER])
        w_local.copy_((w_local.float() + delta).to(w_local.dtype))
        folded += 1
    return folded


@torch.no_grad()
def reset_lora_(model: torch.nn.Module, generator: torch.Generator) -> int:
    """A = kaiming_uniform(a=sqrt(5)) (peft's init_lora_weights=True), B = 0, in place; returns the layer count.

    A is drawn in full on the CPU from ``generator`` (layer by layer, in module order), then each rank keeps its
    rows: the draw is the same for any world size, and every rank must pass a generator in the same state (e.g.
    ``torch.Generator().manual_seed(seed + round)``). With B = 0 the adapter adds nothing, so adapter-on output
    == adapter-disabled output right after a reset.
    """
    reshard_all(model)
    count = 0
    for name, layer in lora_layers(model):
        if ADAPTER not in layer.lora_A:
            continue
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        full_a = torch.empty(tuple(a.shape), dtype=torch.float32, device="cpu")
        torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=generator)
        copy_full_(a, full_a)
        local_tensor(b).zero_()
        count += 1
    return count


def clear_optimizer_state_(optimizer: torch.optim.Optimizer, params) -> int:
    """Forget the optimizer state (e.g. Adam's moments and step count) of ``params``; returns how many had state.
    The next step re-initialises it as for a new parameter, which is what a re-initialised LoRA needs."""
    cleared = 0
    for param in params:
        if optimizer.state.pop(param, None) is not None:
            cleared += 1
    return cleared


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run the model as its base (every LoRA layer bypassed). After fold_lora_ + reset_lora_, the base is the
    round-start model: the DPO reference, with no second copy of the weights.

    peft's enable_adapters also flips requires_grad of the LoRA tensors; the flags are put back at once (before
    any forward) so that FSDP2, which copies them when it first all-gathers, never sees them changed.
    """
    layers = [layer for _, layer in lora_layers(model)]
    flags = [(p, p.requires_grad) for p in lora_parameters(model)]
    for layer in layers:
        layer.enable_adapters(False)
    for param, flag in flags:
        param.requires_grad_(flag)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in flags:
            param.requires_grad_(flag)


def _placements(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.placements)) if isinstance(tensor, DTensor) else "plain tensor"

