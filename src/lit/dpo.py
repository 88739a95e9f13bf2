"""DPOModule: (g)DPO on preference pairs, the training step of one MrDPO round.

One step, for a batch of b pairs (src.models.processor.AVProcessor.collate_preference):

- Policy: ONE forward over the stacked sequences [chosen x b | rejected x b | gt x b] (gt only when
  ``gt_weight`` > 0), with the audio/visual encoders run once per sample and their features placed in every
  block (AVLLM ``media_repeats``). log pi(y|x) = SUM of response-token log-probs (response + end token);
  the ground-truth term is each pair's MEAN token cross-entropy over its gt caption.
- Reference: the pair rows' ``ref_chosen_logp`` / ``ref_rejected_logp`` when present (the rollout records them
  under the round-start model: no reference forward at all). For rows without them, one no-grad pass of the
  round-start model (src.models.reference.reference_mode: adapter bypassed, eval mode, the round-start values of
  trainable non-LoRA parameters swapped in); under FSDP2 that pass has collectives, so every rank runs it as soon
  as one rank needs it. When no non-LoRA parameter trains, the media path is the same for
  reference and policy, so that pass also hands its input embeddings to the policy forward: the encoders still
  run once (the price: the reference LLM pass also covers the gt block). Otherwise the reference runs the
  encoders with its own aligner/merger values, and the policy runs them again.
- Packed (``packed=True``, the default; src.models.packing): per pair ONE segment [prompt | chosen | rejected |
  gt] in which each response sees only the prompt and its own past and restarts its positions after the prompt,
  so the long AV prompt is computed once per pair instead of once per response; the LM head runs only on the
  response tokens (AVLLM ``logp_index``), never on (rows x seq x vocab) logits. Segments are packed in pair order
  into rows of at most ``pack_tokens`` tokens (None: one row per pair, the right choice with SDPA, whose dense
  mask computes the blocks between pairs too; a budget pays with flex_attention or very uneven pairs). The
  reference pass is packed the same way: over the policy's rows (gt included) when it shares its embeddings,
  else over [prompt | chosen | rejected]. That is ``prefix_sharing="mask"`` (sdpa and eager get one additive
  float mask shared by every layer; flex_attention a BlockMask: the CUDA choice with ``pack_tokens``).
  ``prefix_sharing="cache"`` shares the prefix through the KV cache instead, with no L x L mask:
  a prompt pass over the b prompts (use_cache; it also scores token 0 of every response from the last prompt
  token), then a response pass with one row per pair, [chosen | rejected | gt], on the prompt's keys and values
  (a PrefixCache: kept in the graph, so gradients reach the prompt pass, and replayable by activation
  checkpointing, which drops ordinary caches), with a (3R x (P + 3R)) mask in which each response sees
  the prompt and its own past, and each response's own positions (src.models.packing.PrefixBatch). SDPA then runs
  causal prompts and short response queries only, and no copy of the prompt's keys is made per response. The reference
  runs both passes over chosen and rejected; its prompt pass's embeddings feed the policy's when shared.
  ``prefix_sharing="split"`` (the default) is the mask form's rows under SDPA in two calls per layer
  (src.models.split_attention): the rows' shared prompt prefix causal, the flash kernel, and only the queries
  after it under a mask: the cache form's attention work in one pass (half its kernel launches), no copy of the
  prompt's keys, no L x L mask. On an H100 (7B shapes) it gave 1.03x the cache form's pairs/s at 4k with 2 pairs
  (same run) and 1.20-1.26x at 1 pair or 1k (against earlier runs). On a 2-core CPU at 4k the cache form is about
  10% faster (the split form's larger matrices and elementwise tensors fall out of the CPU's caches; at the
  embedded default's ~110-token prompts the two are even): choose "cache" there (bench/RESULTS.md).
  ``packed=False`` is the plain stacked path above, kept as the oracle: all give the same per-pair log-probs, gt
  CE and loss (tests/test_packing.py).
- Loss: mean over pairs of gdpo_loss = preference loss (``loss_type`` sigmoid | ipo) + gt_weight * gt CE.
  gt_weight is the paper's lambda (0.1); 0 gives plain DPO and skips the gt sequences. With gt_weight > 0 every
  pair must carry a ``gt`` caption (an error otherwise, never a silent drop of the term).

Round state (set by the MultiRoundDPO callback through ``start_round``, saved in checkpoints): ``round`` (logged
as mrdpo/round), the reference snapshot, and where the LR schedule last restarted. The schedule is linear
warm-up + cosine over ``schedule_steps`` optimizer steps (None: the whole run), restarted by start_round.

Logs (TRL's names): rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}, loss/{dpo,gt_ce},
train/loss, mrdpo/round, train/lr, train/grad_norm; validation the same under val/.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from src.lit.sft import (OptimSettings, TrainingHooks, adamw, build_trainable_model, clip_gradients, compile_layers,
                         log_grad_norm_and_lr, shard_under_model_parallel, warmup_cosine)
from src.losses.dpo import BETA, GT_WEIGHT, PREFERENCE_LOSSES, gdpo_loss, preference_stats
from src.losses.logprobs import response_ce, sequence_logps
from src.models.lora import LoraSettings, clear_optimizer_state_, fold_lora_, lora_parameters, reset_lora_
from src.models.media_cache import MEDIA_OUTPUTS, media_cache_for
from src.models.packing import (PackedPairs, PrefixBatch, PrefixCache, cache_through_checkpointing, pack_preference,
                                 prefix_batch)
from src.models.reference import ReferenceSnapshot, reference_mode
from src.models.split_attention import NAME as SPLIT_SDPA

LossType = Literal["sigmoid", "ipo"]
PrefixSharing = Literal["cache", "mask", "split"]
DPO_TRAINABLE = ("lora", "aligner", "merger")  # the paper's DPO stage: a fresh LoRA + aligner + visual merger
MEDIA_INPUTS = ("pixel_values_videos", "video_grid_thw", "input_features", "audio_chunks", "audio_windows",
                *MEDIA_OUTPUTS)
CHECKPOINT_KEY = "dpo"


def response_rows(batch: dict[str, Any], rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` stacked sequences, without the columns that are padding in all of them."""
    attention = batch["attention_mask"][:rows]
    keep = attention.any(0)
    return {"input_ids": batch["input_ids"][:rows, keep], "attention_mask": attention[:, keep],
            "labels": batch["labels"][:rows, keep], "position_ids": batch["position_ids"][:, :rows][:, :, keep]}


def model_call(sequences: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Forward arguments for the first ``rows`` sequences (labels stay out: the model would compute an SFT loss)."""
    return {"input_ids": sequences["input_ids"][:rows], "attention_mask": sequences["attention_mask"][:rows],
            "position_ids": sequences["position_ids"][:, :rows]}


def media_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's media tensors (once per sample), as AVLLM takes them."""
    return {k: batch[k] for k in MEDIA_INPUTS if k in batch}


def on_any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the ranks. A reference pass issues collectives (FSDP2 all-gathers), so every rank must
    run it as soon as one rank needs it; one all-reduce of a scalar per step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


class DPOModule(TrainingHooks, pl.LightningModule):
    """Args:
        base: the model directory to start from (the SFT export, LoRA already merged).
        beta: DPO temperature (0.1). gt_weight: lambda of gDPO, weight of the gt caption's mean CE (0.1; 0 = DPO).
        loss_type: "sigmoid" (DPO) or "ipo".
        trainable: parts from src.lit.sft.TRAINABLE_PARTS (default lora + aligner + merger).
        lora: settings of the fresh adapter. lr, optim: AdamW and the warm-up + cosine schedule.
        schedule_steps: optimizer steps of one LR cycle (a round); None = the whole run.
        round_lr_decay: round r's cycle peaks at lr x round_lr_decay^r (r from 0); 1.0 (default) restarts every
            round at ``lr``, as the paper does.
        packed: prefix-shared packed forward (src.models.packing); False = the plain stacked sequences (the oracle).
        pack_tokens: token budget of one packed row; None = one row per pair (see the module docstring).
        llm_attention: the LLM decoder's attention kernel ("sdpa", "eager" or "flex_attention"); None keeps the
            base's (sdpa). "flex_attention" takes the packed rows' BlockMask, which skips the blocks between pairs
            and responses: the CUDA choice with ``pack_tokens``. Only the decoder switches; the encoders keep theirs.
        prefix_sharing: with ``packed``, "split" (default: one packed row per pair, SDPA with the shared prompt
            causal and a mask for the rest; needs llm_attention None or "sdpa"), "cache" (prompts once with a KV
            cache, then the responses on it) or "mask" (one packed row per pair or per budget with a 4-D mask /
            BlockMask: the form for eager and flex_attention).
        compile_decoder: torch.compile each LLM decoder layer (regional compilation: one compiled graph serves
            every layer; dynamic shapes, so new lengths and prompt prefixes do not recompile). Needs prefix_sharing
            "split" or "mask", or the plain path (the cache form's KV cache would specialise a graph per layer).
            Meant for a GPU (unmeasured there yet); costs a compile at the first steps. On a 2-core CPU the tiny
            MrDPO step (fp32, LoRA, 8 pairs) went from 326 to 312 ms after a ~50 s compile: not worth it there.
        cache_video_tokens / cache_audio_states: keep the frozen vision path's tokens / Whisper's states of every
            clip met (src.models.media_cache, as SFTModule does), so a clip's encoders run once per process: the
            MrDPO rollout's prompt pass computes them for each training video with the round-start model, which
            has the same frozen encoders, and every DPO step and later round on those videos reads them. Needs
            the cached encoder frozen: Whisper, and the vision tower (with "merger" in ``trainable``, the paper's
            set, the tower's output is kept and the merger runs on it every step); memory: the outputs on CPU (a
            7B's 4k media tokens: about 40 MB per clip in bf16 when the merger trains), bounded by
            ``media_cache_gb`` (None: unbounded; past it, clips are no longer stored). Under FSDP2 each rank
            keeps the clips it meets (its rollout shard first), the cached encoders are not sharded per layer and
            the rollout's forwards are forgotten before each step (src.lit.sft.shard_under_model_parallel).
            Logs media_cache/{video,audio}_hit_rate of each round's steps (src.lit.sft.TrainingHooks).
    """

    def __init__(self, base: str, beta: float = BETA, gt_weight: float = GT_WEIGHT, loss_type: LossType = "sigmoid",
                 trainable: list[str] | None = None, lora: LoraSettings = LoraSettings(), lr: float = 5e-6,
                 optim: OptimSettings = OptimSettings(), schedule_steps: int | None = None,
                 activation_checkpointing: bool = False, packed: bool = True, pack_tokens: int | None = None,
                 llm_attention: Literal["sdpa", "eager", "flex_attention"] | None = None,
                 prefix_sharing: PrefixSharing = "split", compile_decoder: bool = False,
                 cache_video_tokens: bool = False, cache_audio_states: bool = False,
                 media_cache_gb: float | None = None, round_lr_decay: float = 1.0):
        super().__init__()
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {tuple(PREFERENCE_LOSSES)}, got {loss_type!r}")
        if beta <= 0 or gt_weight < 0:
            raise ValueError(f"need beta > 0 and gt_weight >= 0, got beta={beta}, gt_weight={gt_weight}")
        if not 0 < round_lr_decay <= 1:
            raise ValueError(f"round_lr_decay must be in (0, 1], got {round_lr_decay}")
        if schedule_steps is not None and schedule_steps < 1:
            raise ValueError(f"schedule_steps must be >= 1 or None, got {schedule_steps}")
        if pack_tokens is not None and pack_tokens < 1:
            raise ValueError(f"pack_tokens must be >= 1 or None, got {pack_tokens}")
        if llm_attention not in (None, "sdpa", "eager", "flex_attention"):
            raise ValueError(f"llm_attention must be sdpa, eager, flex_attention or None, got {llm_attention!r}")
        if prefix_sharing not in ("cache", "mask", "split"):
            raise ValueError(f"prefix_sharing must be 'cache', 'mask' or 'split', got {prefix_sharing!r}")
        if compile_decoder and packed and prefix_sharing == "cache":
            raise ValueError("compile_decoder needs prefix_sharing 'split' or 'mask' (or packed=False): the cache "
                             "form's KV cache reads each layer's index, so torch.compile would build one graph per "
                             "layer and, past its recompile limit (8), run the remaining layers eagerly")
        if packed and prefix_sharing == "split" and llm_attention not in (None, "sdpa"):
            raise ValueError(f"prefix_sharing='split' (the default) runs SDPA (llm_attention None or 'sdpa'), got "
                             f"llm_attention={llm_attention!r}: choose prefix_sharing 'mask' or 'cache' with it")
        self.save_hyperparameters()
        self.base, self.beta, self.gt_weight, self.loss_type, self.lr = base, beta, gt_weight, loss_type, lr
        self.lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
        self.optim = optim if isinstance(optim, OptimSettings) else OptimSettings(**optim)
        self.trainable = tuple(trainable) if trainable is not None else DPO_TRAINABLE
        self.schedule_steps, self.activation_checkpointing = schedule_steps, activation_checkpointing
        self.round_lr_decay = round_lr_decay
        self.packed, self.pack_tokens, self.llm_attention = packed, pack_tokens, llm_attention
        self.prefix_sharing, self.compile_decoder = prefix_sharing, compile_decoder
        self.media_cache = media_cache_for(cache_video_tokens, cache_audio_states, media_cache_gb)
        self.model = None
        self.processor = None
        self.round = 0
        self.schedule_start = 0  # scheduler step at which the current LR cycle began
        self.reference_snapshot = ReferenceSnapshot()

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base, attach a fresh LoRA, set the trainable parts, snapshot the round-start values of the
        trainable non-LoRA parameters (before sharding: a plain copy), then shard under ModelParallelStrategy."""
        if self.model is not None:
            return
        self.model, self.processor = build_trainable_model(self.base, self.trainable, self.lora,
                                                           self.activation_checkpointing)
        if self.packed and self.prefix_sharing == "split":  # SDPA that also takes a SplitMask
            self.model.llm.config._attn_implementation = SPLIT_SDPA  # read by every decoder layer per call
        elif self.llm_attention is not None:
            self.model.llm.config._attn_implementation = self.llm_attention
        self.reference_snapshot = ReferenceSnapshot.take(self.model)
        if self.media_cache is not None:
            self.media_cache.attach(self.model)
        shard_under_model_parallel(self, self.model, self.media_cache)
        if self.compile_decoder:
            compile_layers(self.model.llm.layers)

    def start_round(self, index: int, generator: torch.Generator) -> None:
        """A round boundary, as this module sees it; call on every rank (collectives under FSDP2). Folds the LoRA
        into the base in place and re-initialises it (A from ``generator``, which must be in the same state on
        every rank; B = 0), forgets the LoRA tensors' optimizer state, snapshots the trainable non-LoRA parameters
        (the next reference = the model now), sets ``round`` and restarts the LR schedule. The policy's function
        is unchanged by all of this."""
        fold_lora_(self.model)
        reset_lora_(self.model, generator)
        for optimizer in self.trainer.optimizers:
            clear_optimizer_state_(optimizer, lora_parameters(self.model))
        self.reference_snapshot = ReferenceSnapshot.take(self.model)
        self.round = index
        self.restart_schedule()

    def restart_schedule(self) -> None:
        """The next optimizer step takes the first warm-up LR of a new cycle (written into the optimizer now:
        the scheduler's own update already happened for this step)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            self.schedule_start = scheduler.last_epoch
            for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
                group["lr"] = base_lr * fn(scheduler.last_epoch)

    # -- the step's maths ----------------------------------------------------------------------------------
    def response_blocks(self, batch: dict[str, Any]) -> int:
        """2 (chosen, rejected) or 3 (+ gt, when gt_weight > 0; then every pair must have a gt caption)."""
        names = list(batch["responses"])
        if names[:2] != ["chosen", "rejected"]:
            raise ValueError(f"a preference batch stacks chosen, rejected[, gt]; got {names}")
        if self.gt_weight == 0:
            return 2
        has_gt = batch["has_gt"]
        if "gt" not in names or not bool(has_gt.all()):
            ids = [i for i, has in zip(batch.get("id", range(len(has_gt))), has_gt.tolist()) if not has]
            raise ValueError(f"gt_weight={self.gt_weight} needs a ground-truth caption ('gt') in every pair; "
                             f"pairs without one: {ids[:5]} (gt_weight 0 trains plain DPO)")
        return 3

    def preference_forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-pair (b,) tensors: policy_chosen, policy_rejected, ref_chosen, ref_rejected (summed log-probs) and
        gt_ce (mean CE over the gt caption; zeros when gt_weight is 0)."""
        blocks = self.response_blocks(batch)
        ref_chosen, ref_rejected = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        missing = ref_chosen.isnan() | ref_rejected.isnan()
        reference = on_any_rank(bool(missing.any()), ref_chosen.device)
        forward = self.plain_logps if not self.packed else (
            self.prefix_logps if self.prefix_sharing == "cache" else self.packed_logps)  # mask and split
        out = forward(batch, blocks, reference)
        if reference:
            out["ref_chosen"] = torch.where(missing, out["ref_chosen"], ref_chosen)
            out["ref_rejected"] = torch.where(missing, out["ref_rejected"], ref_rejected)
        else:
            out["ref_chosen"], out["ref_rejected"] = ref_chosen, ref_rejected
        if out["gt_ce"] is None:
            out["gt_ce"] = torch.zeros_like(ref_chosen)
        return out

    # -- the plain path: one padded sequence per response (the oracle) ------------------------------------
    def plain_logps(self, batch: dict[str, Any], blocks: int, reference: bool) -> dict[str, torch.Tensor | None]:
        """policy_chosen, policy_rejected (b,), gt_ce (b,) or None, and with ``reference`` the computed
        ref_chosen, ref_rejected (b,), from the stacked sequences (module docstring)."""
        b = batch["has_gt"].shape[0]
        sequences = response_rows(batch, blocks * b)
        out: dict[str, torch.Tensor | None] = {}
        inputs_embeds = None
        if reference:
            out["ref_chosen"], out["ref_rejected"], inputs_embeds = self.reference_logps(batch, sequences, blocks)
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else media_inputs(batch)
        logits = self.model(**model_call(sequences, blocks * b), **inputs, media_repeats=blocks).logits
        logps = sequence_logps(logits[:2 * b], sequences["labels"][:2 * b])
        out["policy_chosen"], out["policy_rejected"] = logps[:b], logps[b:]
        out["gt_ce"] = response_ce(logits[2 * b:], sequences["labels"][2 * b:])[0] if blocks == 3 else None
        return out

    def reference_logps(self, batch: dict[str, Any], sequences: dict[str, torch.Tensor], blocks: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(b,) summed reference log-probs of chosen and rejected from a no-grad pass of the round-start model,
        and the input embeddings for the policy when they are shareable (else None)."""
        b = batch["has_gt"].shape[0]
        share = not self.reference_snapshot  # nothing but LoRA trains: media path identical to the policy's
        rows = blocks * b if share else 2 * b
        with reference_mode(self.model, self.reference_snapshot):
            out = self.model(**model_call(sequences, rows), **media_inputs(batch), media_repeats=rows // b)
            logps = sequence_logps(out.logits[:2 * b], sequences["labels"][:2 * b])
        return logps[:b], logps[b:], (out.inputs_embeds if share else None)

    # -- the packed path: one prefix-shared segment per pair -------------------------------------------------
    def pack(self, batch: dict[str, Any], responses: int) -> PackedPairs:
        return pack_preference(batch, responses, self.pack_tokens, self.processor.pad_token_id)

    def packed_logps(self, batch: dict[str, Any], blocks: int, reference: bool) -> dict[str, torch.Tensor | None]:
        """``plain_logps``'s values from packed rows (src.models.packing), the LM head on response tokens only.
        The reference pass reuses the policy's rows (gt included) when it hands its embeddings over; otherwise it
        packs chosen and rejected alone."""
        policy_pack = self.pack(batch, blocks)
        out: dict[str, torch.Tensor | None] = {}
        inputs_embeds = None
        if reference:
            share = not self.reference_snapshot
            pack = policy_pack if share else self.pack(batch, 2)
            with reference_mode(self.model, self.reference_snapshot):
                result = self.packed_call(pack, media_inputs(batch), responses=2)
            out["ref_chosen"], out["ref_rejected"] = pack.response_sums(result.token_logps, responses=2)
            inputs_embeds = result.inputs_embeds if share else None
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else media_inputs(batch)
        sums = policy_pack.response_sums(self.packed_call(policy_pack, inputs).token_logps)
        out["policy_chosen"], out["policy_rejected"] = sums[0], sums[1]
        out["gt_ce"] = -sums[2] / policy_pack.response_counts()[2] if blocks == 3 else None
        return out

    def packed_call(self, pack: PackedPairs, inputs: dict[str, Any], responses: int | None = None):
        """AVLLM over the packed rows: the mask in the form the LLM's attention implementation takes, media once
        (media_repeats 1), log-probs of the first ``responses`` responses' tokens only."""
        implementation = self.model.llm.config._attn_implementation
        return self.model(**pack.model_inputs(implementation, self.model.dtype), **inputs,
                          **pack.logp_inputs(responses), return_logits=False)

    # -- the KV-cache path: prompts once, then the responses on their repeated cache ------------------------------
    def prefix_logps(self, batch: dict[str, Any], blocks: int, reference: bool) -> dict[str, torch.Tensor | None]:
        """``plain_logps``'s values from two passes (src.models.packing.PrefixBatch): the b prompts with a cache,
        then the responses on it. The reference scores chosen and rejected only; when it shares its embeddings, its
        prompt pass's inputs_embeds feed the policy's prompt pass (encoders once)."""
        prefix = prefix_batch(batch, blocks, self.processor.pad_token_id)
        out: dict[str, torch.Tensor | None] = {}
        inputs_embeds = None
        if reference:
            with reference_mode(self.model, self.reference_snapshot):
                sums, embeds = self.prefix_call(prefix, media_inputs(batch), responses=2)
            out["ref_chosen"], out["ref_rejected"] = sums
            inputs_embeds = embeds if not self.reference_snapshot else None
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else media_inputs(batch)
        sums, _ = self.prefix_call(prefix, inputs)
        out["policy_chosen"], out["policy_rejected"] = sums[0], sums[1]
        out["gt_ce"] = -sums[2] / prefix.response_counts()[2] if blocks == 3 else None
        return out

    def prefix_call(self, prefix: PrefixBatch, inputs: dict[str, Any], responses: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, b) summed log-probs of the first ``responses`` responses, and the prompt pass's input embeddings."""
        cache = PrefixCache()
        implementation = self.model.llm.config._attn_implementation
        with cache_through_checkpointing(self.model.llm.layers):
            prompt = self.model(**prefix.prompt_inputs(responses), **inputs, cache=cache, use_cache=True,
                                return_logits=False)
            reply = self.model(**prefix.response_inputs(cache.reader(), responses, implementation, self.model.dtype),
                               return_logits=False)
        return prefix.response_sums(prompt.token_logps, reply.token_logps, responses), prompt.inputs_embeds

    def loss_and_stats(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean gDPO loss over the pairs, and the pair-averaged statistics to log."""
        logps = (out["policy_chosen"], out["policy_rejected"], out["ref_chosen"], out["ref_rejected"])
        preference = PREFERENCE_LOSSES[self.loss_type]
        per_pair = gdpo_loss(*logps, out["gt_ce"], beta=self.beta, gt_weight=self.gt_weight, preference=preference)
        stats = {name: value.mean() for name, value in preference_stats(*logps, beta=self.beta).items()}
        stats["loss/dpo"] = preference(*logps, beta=self.beta).detach().mean()
        if self.gt_weight > 0:
            stats["loss/gt_ce"] = out["gt_ce"].detach().mean()
        return per_pair.mean(), stats

    # -- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, stats = self.loss_and_stats(self.preference_forward(batch))
        b = batch["has_gt"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        self.log_dict(stats, batch_size=b)
        self.log("mrdpo/round", float(self.round), batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.loss_and_stats(self.preference_forward(batch))
        b = batch["has_gt"].shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=b)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, sync_dist=True, batch_size=b)

    def on_before_optimizer_step(self, optimizer) -> None:
        log_grad_norm_and_lr(self, optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"trainable {self.trainable} leaves nothing to train")
        optimizer = adamw(params, self.lr, self.optim)
        total = self.schedule_steps or int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.round_lr_decay ** self.round * (
            warmup_cosine(step - self.schedule_start, total, self.optim.warmup_ratio, self.optim.min_lr_ratio)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Round index, LR cycle start and the reference snapshot: a mid-round resume keeps its reference."""
        checkpoint[CHECKPOINT_KEY] = {"round": self.round, "schedule_start": self.schedule_start,
                                      "reference_snapshot": self.reference_snapshot.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise KeyError(f"checkpoint has no {CHECKPOINT_KEY!r} entry: not written by DPOModule")
        self.round, self.schedule_start = int(state["round"]), int(state["schedule_start"])
        self.reference_snapshot = ReferenceSnapshot(state["reference_snapshot"])
