"""LoRA on the LLM only (peft), and the merged view of a model for export.

Targets are matched by a regex over the language model's module paths, so the vision tower and Whisper, which
have q/k/v projections of their own, stay untouched. LoRA layers are injected in place
(peft.inject_adapter_in_model): the module tree keeps its names, so the rest of the code never sees a wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

ADAPTER = "default"


@dataclass
class LoraSettings:
    """The paper's defaults: r 128, alpha 256, dropout 0.05 on q/k/v of the LLM."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")


def llm_target_regex(targets: tuple[str, ...]) -> str:
    return r".*language_model\.layers\.\d+\.self_attn\.(" + "|".join(targets) + r")$"


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
