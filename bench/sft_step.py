"""SFT training steps of the AV LLM through Lightning, as the recipes run them: tokens/s and peak memory.

    python bench/sft_step.py --device cuda --model 7b --seq-len 8192 --json    # a 7B-shaped model on one GPU
    python bench/sft_step.py                                                    # CPU, tiny base: the smoke run

SFTModule at stage ``sft`` (LoRA r 128 / alpha 256 on the LLM's q/k/v + aligner + visual merger, the recipes'
SFT set) in a real Lightning Trainer with the real recipes' scale-out: ModelParallelStrategy (FSDP2: fully_shard
over decoder layers, vision blocks, Whisper layers and the aligner, src.models.sharding), precision bf16-mixed
(FSDP2 computes in bf16 and reduces in fp32), activation checkpointing, gradient clipping at 1.0, AdamW; on one
GPU the mesh has one rank, which runs the same code as eight. ``--strategy single`` runs without FSDP2.

The batch: ``--batch`` synthetic clips (bench/dpo_step.py's: random frames at 2 fps, random 16 kHz audio) whose
media, chat template and prompt text fill exactly ``--prompt-len`` tokens, each with a caption of exactly
``--response-len`` labelled tokens; the same batch every step (data loading is not timed: bench/data_throughput.py
measures it). The base is random (bench/dpo_step.py's ``--model`` sizes: ``7b`` = Qwen2.5-VL-7B's LLM, vision
tower and Whisper-large-v3's encoder; its weights' values do not change the timing), written once to a directory
(``--base-cache`` keeps it for later runs).

tokens/s = non-padding tokens of the batch / median step time of the timed steps (each step timed from the start
of its batch to its end, optimizer step included, the device synchronised at both ends). peak memory: CUDA,
torch.cuda.max_memory_allocated over the timed steps (``peak_allocated_mb``, weights and optimizer state included;
``peak_mem_mb`` = that minus what was allocated before them); CPU, the process's peak resident set
(``peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

from bench.dpo_step import (LORA_ALPHA, LORA_R, LORA_TARGETS, MODELS, PeakMemory, Settings, base_dir,  # noqa: E402
                            machine, media_tokens, preference_samples, sync)

SFT_LR = 2e-5  # the 7B SFT recipe's


def sft_batch(processor, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """``settings.pairs`` SFT samples (a clip + prompt of prompt_len tokens, the gt caption of response_len
    labelled tokens), collated, and their token counts."""
    pairs = preference_samples(processor, settings)
    samples = [{**{k: v for k, v in p.items() if k not in ("chosen", "rejected", "gt", "clip_seconds")}, **p["gt"]}
               for p in pairs]
    batch = processor.collate(samples)
    ids = batch["input_ids"]
    info = {"rows": int(ids.shape[0]), "row_tokens": int(ids.shape[1]), "tokens": int(batch["attention_mask"].sum()),
            "response_tokens": int((batch["labels"] != -100).sum()),
            "media_tokens": sum(media_tokens(p, processor) for p in pairs), "clip_seconds": pairs[0]["clip_seconds"]}
    return batch, info


class StepTimer(pl.Callback):
    """Wall time of each training batch (forward, backward, clipping, optimizer step), the device synchronised at
    both ends; peak memory over the batches from ``warmup`` on."""

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup = device, warmup
        self.memory = PeakMemory(device)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.memory.start()
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(self.device)
        self.times.append(time.perf_counter() - self.start)
        self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))


def run(settings: Settings, strategy: str, base: Path) -> dict[str, Any]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from src.lit.sft import SFTModule
    from src.models.lora import LoraSettings
    from src.models.processor import AVProcessor

    processor = AVProcessor.from_pretrained(base)
    batch, info = sft_batch(processor, settings)
    torch.manual_seed(settings.seed)
    module = SFTModule(str(base), stage="sft", lr=SFT_LR, activation_checkpointing=settings.checkpointing,
                       lora=LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=0.05, targets=list(LORA_TARGETS)))
    steps = settings.warmup + settings.steps
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None, shuffle=False)
    timer = StepTimer(settings.device, settings.warmup)
    fsdp = strategy == "fsdp2"
    trainer = pl.Trainer(
        accelerator="cuda" if settings.device == "cuda" else "cpu", devices=1, max_steps=steps,
        precision="bf16-mixed" if settings.device == "cuda" else "32-true",
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if fsdp else "auto",
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:  # the one-rank process group ModelParallelStrategy started (a caller may start another)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    timed = timer.times[settings.warmup:]
    median = statistics.median(timed)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"tokens_per_s": round(info["tokens"] / median, 1), "step_s_median": round(median, 3),
            "step_s": [round(t, 3) for t in timer.times], "losses": [round(x, 5) for x in timer.losses],
            **timer.memory.stop(), **info, "trainable_params": trainable,
            "fsdp2": fsdp, "precision": str(trainer.precision)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=1024, help="tokens before the caption (media + text)")
    parser.add_argument("--response-len", type=int, default=512, help="caption tokens, end token included")
    parser.add_argument("--batch", type=int, default=1, help="clips per step (the 7B recipes' micro-batch is 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--strategy", choices=["fsdp2", "single"], default="fsdp2")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing (the 7B recipes' setting)")
    parser.add_argument("--frame-side", type=int, default=None, help="frame side in px (multiple of 28)")
    parser.add_argument("--base-cache", help="directory holding (or to receive) the random base; default: a "
                                             "temporary one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.model == "7b" and args.device != "cuda":
        parser.error("--model 7b is for a GPU (--device cuda)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    settings = Settings(prompt_len=args.prompt_len, response_len=args.response_len, pairs=args.batch,
                        steps=args.steps, warmup=args.warmup, device=args.device, model=args.model,
                        trainable="lora,aligner,merger", checkpointing=args.checkpointing, frame_side=args.frame_side,
                        seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="sft-step-") as tmp:
        start = time.perf_counter()
        base = base_dir(settings, Path(args.base_cache) if args.base_cache else Path(tmp) / "base")
        prepare_s = time.perf_counter() - start
        result = run(settings, args.strategy, base)
    report = {"sft": result, "machine": machine(settings),
              "settings": {**asdict(settings), "strategy": args.strategy, "prepare_s": round(prepare_s, 1),
                           "lr": SFT_LR, "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)}}}
    if args.json:
        print(json.dumps(report))
        return
    r = report["sft"]
    print(f"SFT step, model {args.model}, {args.device} {r['precision']}, {'FSDP2' if r['fsdp2'] else 'single'}, "
          f"checkpointing {args.checkpointing}: {r['rows']} x {r['row_tokens']} tokens ({r['media_tokens']} media, "
          f"{r['response_tokens']} caption)")
    print(f"tokens/s {r['tokens_per_s']:,.0f}   step {r['step_s_median']:.3f} s   peak memory {r['peak_mem_mb']:,.0f} MB"
          f" above the {r.get('baseline_mb', r.get('baseline_rss_mb', 0)):,.0f} MB before the timed steps")


if __name__ == "__main__":
    main()
