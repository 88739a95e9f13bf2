"""SFTModule: supervised fine-tuning of the AV LLM in three stages.

- ``align``: the aligner learns to speak for Whisper (audio-only data); everything else frozen, no LoRA.
- ``sft``: LoRA on the LLM's q/k/v + aligner + visual merger, on audio-visual captions.
- ``rebirth``: the same trainable set, on captions another checkpoint wrote (a manifest from the caption CLI or
  the rollout), to keep a base's general skills after MrDPO.

``trainable`` overrides a stage's set; it names parts from TRAINABLE_PARTS ("llm" = the whole decoder, used by the
embedded default whose tiny base starts from random weights). Loss: per-example mean cross-entropy over response
tokens, averaged over the batch (src.losses.logprobs.mean_response_ce), read through the response-only LM head:
no (b, s, v) logits exist in a step (the model's ``return_logits=False``). AdamW, linear warm-up then cosine decay
over the run's optimizer steps. Logs train/loss, train/lr, train/tokens_per_s, train/grad_norm, val/loss.
``cache_video_tokens`` / ``cache_audio_states``: with a frozen vision path / Whisper encoder, each clip's video
tokens / Whisper states are computed once and reused, and a clip whose every part is stored is no longer decoded or
featurised (src.models.media_cache); with the merger trainable the video part keeps the frozen tower's output and
the merger runs on it. ``media_cache_gb`` bounds what the cache keeps; the share of the steps' encoder outputs it
gave is logged per epoch (``TrainingHooks``); under FSDP2 each rank keeps its own (``shard_under_model_parallel``).
``attn_implementation``: the decoder's attention kernel ("sdpa", "eager", ...; None keeps SDPA, which the base
loads with). ``compile_decoder``: torch.compile each decoder layer (``compile_layers``: one graph for all, dynamic
lengths; the tiny recipe's step 1.6x on a 2-core CPU after a ~30-55 s first compile).
``optim.fused``: torch's fused AdamW, clipped under bf16-mixed where Lightning's plugin refuses (``clip_gradients``).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from src.models.build import load_base
from src.models.lora import LoraSettings, attach_lora
from src.models.media_cache import MEDIA_OUTPUTS, FrozenMediaCache, media_cache_for
from src.models.sharding import forget_forward_order

Stage = Literal["align", "sft", "rebirth"]
TRAINABLE_PARTS = ("lora", "aligner", "merger", "llm", "vision", "whisper")
STAGE_TRAINABLE: dict[str, tuple[str, ...]] = {
    "align": ("aligner",),
    "sft": ("lora", "aligner", "merger"),
    "rebirth": ("lora", "aligner", "merger"),
}
MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values_videos", "video_grid_thw",
                "input_features", "audio_chunks", "audio_windows", *MEDIA_OUTPUTS)


@dataclass
class OptimSettings:
    """AdamW and the schedule: linear warm-up over warmup_ratio of the steps, cosine down to min_lr_ratio x lr."""

    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    # torch's fused AdamW (one kernel pass per tensor instead of a dozen ops): the tiny LLM's 136 tensors 9.4 -> 3.0
    # ms per step on a 2-core CPU. Clipping with it under bf16-mixed: clip_gradients below.
    fused: bool = False


def warmup_cosine(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` of ``total``: (step+1)/warmup during warm-up, then cosine."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_trainable(model, parts: tuple[str, ...]) -> None:
    """Freeze everything, then unfreeze the named parts ("lora": the LoRA tensors attach_lora injected)."""
    unknown = set(parts) - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {TRAINABLE_PARTS}")
    model.requires_grad_(False)
    modules = {"aligner": [model.aligner], "merger": [model.visual.merger], "llm": [model.llm, model.lm_head],
               "vision": [model.visual], "whisper": [model.whisper]}
    for part in parts:
        for module in modules.get(part, []):
            module.requires_grad_(True)
    if "lora" in parts:
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(True)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def build_trainable_model(base: str, trainable: tuple[str, ...], lora: LoraSettings,
                          activation_checkpointing: bool = False):
    """Load the base (train mode), attach LoRA when "lora" is among ``trainable``, set the trainable parts."""
    model, processor = load_base(base)
    model.train()  # from_pretrained returns eval mode; LoRA dropout and any dropout must be live
    if "lora" in trainable:  # first: peft freezes every non-LoRA parameter when it injects
        attach_lora(model, lora)
    set_trainable(model, trainable)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also hooks every sub-model's input embeddings (the LLM's tokens, the vision tower's patch
        # embedding, Whisper's first conv) so that their outputs require grad: reentrant checkpointing needs that
        # to reach adapters. Non-reentrant checkpointing does not, and with the hooks the frozen vision tower and
        # Whisper encoder ran their backward (and recompute) on every step for no gradient.
        model.disable_input_require_grads()
    return model, processor


def compile_layers(layers) -> None:
    """Regional compilation: torch.compile each module's forward, with dynamic shapes (a new length does not
    recompile). Modules of one class share the compiled code: their parameters are the graph's inputs. A layer
    that reads its own index (a KV cache's ``update(..., layer_idx)``) is compiled once per index; without a
    cache, one graph serves every decoder layer. Inductor builds its kernels with a C++ compiler: without one
    the layers stay eager, with a warning (the same function, slower)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # inductor raises its own InvalidCxxCompiler; an import problem means the same here
        warnings.warn(f"torch.compile needs a C++ compiler and found none ({type(err).__name__}): the decoder "
                      "layers run eagerly (the same function, slower); install g++ or set compile_decoder false")
        return
    for layer in layers:
        layer.compile(dynamic=True)


def shard_under_model_parallel(module: pl.LightningModule, model, media_cache: FrozenMediaCache | None = None
                               ) -> None:
    """Under ModelParallelStrategy (``module.device_mesh`` set), shard ``model`` with FSDP2 (bf16 compute when the
    trainer's precision is bf16); otherwise nothing. The encoders of parts ``media_cache`` holds get no FSDP2
    units of their own (their parameters go with the root's, which every rank gathers in every forward): one rank
    may find a clip's outputs in its cache while another computes them, and per-layer units there would leave the
    computing rank in all-gathers the other never joins; ``sharding.forget_forward_order`` before each training
    forward (``TrainingHooks``) keeps the backward's prefetches equal across ranks."""
    if getattr(module, "device_mesh", None) is None:
        return
    from src.models.sharding import shard_model

    bf16 = str(module.trainer.precision).startswith("bf16")
    cached = [part for part in ("video", "audio") if media_cache is not None and media_cache.caches(part)]
    shard_model(model, module.device_mesh, param_dtype=torch.bfloat16 if bf16 else None, whole=cached)


class TrainingHooks:
    """Hooks SFTModule and DPOModule share (mixed in before pl.LightningModule; the module has ``model`` and
    ``media_cache``):
    - at fit start the DataModule's processor serves clips the media cache holds (in this process: DataLoader
      workers' copies of the processor only key their rows);
    - before each training step, under FSDP2, FSDP2's record of earlier forwards is dropped
      (``sharding.forget_forward_order``: the rollout's and evaluation's forwards run rank-dependent counts);
    - media_cache/{video,audio}_hit_rate: the share of the training steps' encoder outputs the cache gave in the
      epoch (an MrDPO round; the rollout's and evaluation's own lookups left out), the mean over ranks, and
      media_cache/gb stored, logged at each epoch's end."""

    def on_fit_start(self) -> None:
        if self.media_cache is not None:
            self.media_cache.serve(getattr(self.trainer.datamodule, "processor", None))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "device_mesh", None) is not None:
            forget_forward_order(self.model)
        if self.media_cache is not None:
            self._media_at_step = self.media_cache.counts()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        start = getattr(self, "_media_at_step", None)
        if self.media_cache is None or start is None:
            return
        totals = getattr(self, "_media_in_steps", {})
        for part, now in self.media_cache.counts().items():
            totals[part] = tuple(t + n - s for t, n, s in zip(totals.get(part, (0, 0)), now, start[part]))
        self._media_in_steps, self._media_at_step = totals, None

    def on_train_epoch_end(self) -> None:
        if self.media_cache is None:
            return
        for part, (hits, misses) in getattr(self, "_media_in_steps", {}).items():
            self.log(f"media_cache/{part}_hit_rate", hits / max(hits + misses, 1), sync_dist=True)
        self.log("media_cache/gb", self.media_cache.bytes / 2**30, sync_dist=True)
        self._media_in_steps = {}


def adamw(params: list[torch.nn.Parameter], lr: float, optim: OptimSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=True if optim.fused else None)


def clip_gradients(module: pl.LightningModule, optimizer, value: float | None, algorithm) -> None:
    """Lightning's gradient clipping, for ``configure_gradient_clipping``, that also clips for a fused optimizer
    under bf16-mixed. Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales gradients
    in its own step (a fused one), a guard for 16-mixed's GradScaler; bf16-mixed has no scaler, nothing is scaled,
    and the gradients are clipped as Lightning's base precision plugin clips them (torch's clip_grad_norm_ /
    clip_grad_value_ over the optimizer's parameters). Every other case takes Lightning's own path."""
    plugin = module.trainer.precision_plugin
    if (type(plugin) is MixedPrecision and plugin.scaler is None
            and getattr(optimizer, "_step_supports_amp_scaling", False)):
        Precision.clip_gradients(plugin, optimizer, value or 0.0, GradClipAlgorithmType(algorithm or "norm"))
    else:
        module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


def log_grad_norm_and_lr(module: pl.LightningModule, optimizer) -> None:
    """train/grad_norm (L2 over every gradient, before clipping) and train/lr; for on_before_optimizer_step."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:  # torch's foreach norms (as clip_grad_norm_ computes them): 6.8 -> <1 ms for the tiny LLM's 136 tensors
        module.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))
    module.log("train/lr", optimizer.param_groups[0]["lr"])


class SFTModule(TrainingHooks, pl.LightningModule):
    def __init__(self, base: str, stage: Stage = "sft", trainable: list[str] | None = None,
                 lora: LoraSettings = LoraSettings(), lr: float = 2e-5, optim: OptimSettings = OptimSettings(),
                 activation_checkpointing: bool = False, cache_video_tokens: bool = False,
                 cache_audio_states: bool = False, media_cache_gb: float | None = None,
                 attn_implementation: str | None = None, compile_decoder: bool = False):
        super().__init__()
        if stage not in STAGE_TRAINABLE:
            raise ValueError(f"stage must be one of {tuple(STAGE_TRAINABLE)}, got {stage!r}")
        self.save_hyperparameters()
        self.base, self.stage, self.lr = base, stage, lr
        self.lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
        self.optim = optim if isinstance(optim, OptimSettings) else OptimSettings(**optim)
        self.trainable = tuple(trainable) if trainable is not None else STAGE_TRAINABLE[stage]
        self.activation_checkpointing = activation_checkpointing
        self.media_cache = media_cache_for(cache_video_tokens, cache_audio_states, media_cache_gb)
        self.attn_implementation = attn_implementation
        self.compile_decoder = compile_decoder
        self.model = None
        self.processor = None
        self._step_started: float | None = None

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base and set the trainable parameters; under ModelParallelStrategy shard it with FSDP2."""
        if self.model is not None:
            return
        self.model, self.processor = build_trainable_model(self.base, self.trainable, self.lora,
                                                           self.activation_checkpointing)
        if self.attn_implementation is not None:
            self.model.llm.set_attn_implementation(self.attn_implementation)
        if self.compile_decoder:
            compile_layers(self.model.llm.layers)
        if self.media_cache is not None:
            self.media_cache.attach(self.model)
        shard_under_model_parallel(self, self.model, self.media_cache)

    def forward(self, batch: dict[str, Any]):
        return self.model(**model_inputs(batch), return_logits=False)

    # -- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        now = time.perf_counter()
        if self._step_started is not None:
            tokens = float(batch["attention_mask"].sum())
            self.log("train/tokens_per_s", tokens / max(now - self._step_started, 1e-9), prog_bar=True)
        self._step_started = now
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self(batch).loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        log_grad_norm_and_lr(self, optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.stage!r} with trainable {self.trainable} leaves nothing to train")
        optimizer = adamw(params, self.lr, self.optim)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, self.optim.warmup_ratio, self.optim.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
