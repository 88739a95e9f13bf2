"""Export the trained model as one HF-format directory (LoRA merged) that AVLLM.from_pretrained and the caption
CLI load: config.json, model.safetensors, tokenizer, av_processor.json."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from src.models.lora import lora_scalings, merged_state_dict


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered to full tensors on the CPU (a collective under FSDP2: all ranks)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_model(model, processor, directory: str | os.PathLike, *, is_writer: bool = True) -> Path | None:
    """Write ``directory`` atomically (a sibling temp dir renamed into place). Call on every rank."""
    state = merged_state_dict(full_state_dict(model), lora_scalings(model))
    if not is_writer:
        return None
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict={k: v.contiguous() for k, v in state.items()})
    processor.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


class ExportHF(pl.Callback):
    """At the end of training, export the module's ``model`` and ``processor`` to ``dirpath``."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        export_model(pl_module.model, pl_module.processor, self.dirpath, is_writer=trainer.is_global_zero)
        trainer.strategy.barrier("export")
