"""DPOModule on the tiny base: preference samples and batches, one stacked policy pass equal to separate
sequences, encoders once, the reference (from rows, or the round-start model with its snapshot), gDPO's gt term,
and a round boundary under a Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from src.data.manifest import read_manifest
from src.lit.dpo import DPOModule
from src.losses.logprobs import IGNORE_INDEX, response_ce, sequence_logps
from src.models.build import load_base
from src.models.lora import ADAPTER, LoraSettings, lora_layers, lora_parameters

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
REJECTED = "A green circle moves left. A burst of noise plays."


def write_pairs(synthav: Path, out: Path, *, n: int = 4, ref: dict[str, tuple[float, float]] | None = None,
                gt: bool = True) -> Path:
    """Pairs over the first n SynthAV training clips: chosen = a shortened caption, rejected = another scene's
    text, gt = the full caption; optional reference log-probs per id."""
    rows = []
    for line in (synthav / "train.jsonl").read_text().splitlines()[:n]:
        src = json.loads(line)
        row = {"id": src["id"], "video": str(synthav / src["video"]), "chosen": src["caption"].split(". ")[0] + ".",
               "rejected": REJECTED}
        if gt:
            row["gt"] = src["caption"]
        if ref and src["id"] in ref:
            row["ref_chosen_logp"], row["ref_rejected_logp"] = ref[src["id"]]
        rows.append(row)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def module_for(base, trainable=("lora",), **kwargs) -> DPOModule:
    module = DPOModule(base=str(base), trainable=list(trainable), lora=LoraSettings(**LORA), **kwargs)
    module.configure_model()
    return module


def preference_batch(module: DPOModule, manifest: Path) -> tuple[dict, list]:
    rows = read_manifest(manifest, "preference")
    return module.processor.collate([module.processor(row) for row in rows]), rows


def perturb(module: DPOModule, seed: int = 0) -> None:
    """Pretend training happened: random LoRA B, and the trainable non-LoRA parameters moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(module.model):
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        for name, p in module.model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def separate_logps(model, processor, rows, field: str) -> torch.Tensor:
    """Oracle: each response alone, its own forward (media encoded again for it)."""
    out = []
    with torch.no_grad():
        for row in rows:
            clip = processor.load_clip(row.video, row.audio, use_audio=row.use_audio)
            batch = processor.collate([processor.encode(clip, row.prompt, getattr(row, field))])
            out.append(sequence_logps(model(**batch).logits, batch["labels"])[0])
    return torch.stack(out)


# -- data --------------------------------------------------------------------------------------------------

def test_preference_sample_and_batch_layout(tiny_base, synthav, tmp_path):
    module = module_for(tiny_base)
    manifest = write_pairs(synthav, tmp_path / "pairs.jsonl", n=3, ref={"train-000001": (-3.5, -7.25)})
    rows = read_manifest(manifest, "preference")
    processor = module.processor
    sample = processor(rows[0])
    starts = {name: sample[name]["response_start"] for name in ("chosen", "rejected", "gt")}
    assert len(set(starts.values())) == 1  # one prompt, one media span, for every response
    prompt = sample["chosen"]["input_ids"][:starts["chosen"]]
    for name, text in (("chosen", rows[0].chosen), ("rejected", rows[0].rejected), ("gt", rows[0].gt)):
        seq = sample[name]
        assert torch.equal(seq["input_ids"][:starts[name]], prompt)
        assert processor.tokenizer.decode(seq["input_ids"][seq["labels"] != IGNORE_INDEX]) == text + "<|im_end|>"
    batch = processor.collate([processor(row) for row in rows])
    b = len(rows)
    assert batch["responses"] == ["chosen", "rejected", "gt"]
    assert batch["input_ids"].shape[0] == 3 * b and batch["position_ids"].shape[:2] == (3, 3 * b)
    assert batch["video_grid_thw"].shape[0] == b and len(batch["audio_windows"]) == b  # media once per sample
    for j, name in enumerate(batch["responses"]):
        for i, row in enumerate(rows):
            labels = batch["labels"][j * b + i]
            text = processor.tokenizer.decode(batch["input_ids"][j * b + i][labels != IGNORE_INDEX])
            assert text == getattr(row, name) + "<|im_end|>"
    assert batch["has_gt"].tolist() == [True] * b
    ref = batch["ref_chosen_logps"].tolist(), batch["ref_rejected_logps"].tolist()
    assert math.isnan(ref[0][0]) and ref[0][1] == -3.5 and ref[1][1] == -7.25 and math.isnan(ref[1][2])


def test_a_pair_without_gt_gets_a_prompt_only_gt_row(tiny_base, synthav, tmp_path):
    module = module_for(tiny_base)
    with_gt = read_manifest(write_pairs(synthav, tmp_path / "a.jsonl", n=1), "preference")
    without = read_manifest(write_pairs(synthav, tmp_path / "b.jsonl", n=2, gt=False), "preference")[1:]
    batch = module.processor.collate([module.processor(r) for r in with_gt + without])
    assert batch["has_gt"].tolist() == [True, False]
    assert bool((batch["labels"][5] == IGNORE_INDEX).all()) and bool((batch["labels"][4] != IGNORE_INDEX).any())
    none = module.processor.collate([module.processor(r) for r in without])
    assert none["responses"] == ["chosen", "rejected"] and none["input_ids"].shape[0] == 2


# -- the step ----------------------------------------------------------------------------------------------

class Counter:
    """Forward calls of a module."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def counters(model) -> dict[str, Counter]:
    return {"vision": Counter(model.visual), "whisper": Counter(model.whisper), "llm": Counter(model.llm)}


MODES = {"cache": {"packed": True, "prefix_sharing": "cache"}, "mask": {"packed": True, "prefix_sharing": "mask"},
         "split": {"packed": True, "prefix_sharing": "split"}, "plain": {"packed": False}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case, trainable, encoders, llm", [
    ("reference from rows", ("lora", "aligner", "merger"), 1, 1),
    ("reference pass, LoRA only: shared embeddings", ("lora",), 1, 2),
    ("reference pass with aligner/merger snapshot", ("lora", "aligner", "merger"), 2, 2),
])
def test_encoders_run_once_per_sample(tiny_base, synthav, tmp_path, case, trainable, encoders, llm, mode):
    """Encoder calls per step; decoder calls per pass: 1, or 2 in the cache form (prompts, then responses)."""
    module = module_for(tiny_base, trainable, **MODES[mode])
    llm *= 2 if mode == "cache" else 1
    ref = {f"train-00000{i}": (-10.0, -12.0) for i in range(4)} if case == "reference from rows" else None
    batch, _ = preference_batch(module, write_pairs(synthav, tmp_path / "p.jsonl", ref=ref))
    count = counters(module.model)
    module.preference_forward(batch)
    assert {k: c.calls for k, c in count.items()} == {"vision": encoders, "whisper": encoders, "llm": llm}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("trainable", [("lora",), ("lora", "aligner", "merger")])
def test_stacked_pass_equals_separate_sequences_and_reference_is_the_start_model(tiny_base, synthav, tmp_path,
                                                                               trainable, mode):
    """After 'training' (LoRA B and aligner/merger moved): policy log-probs of the one stacked (or packed) pass ==
    each response's own forward; reference log-probs == the untouched base's; the parameters are left as they were."""
    module = module_for(tiny_base, trainable, **MODES[mode])
    perturb(module)
    batch, rows = preference_batch(module, write_pairs(synthav, tmp_path / "p.jsonl"))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module.model.eval()  # the oracle runs in eval mode: no dropout anywhere
    out = module.preference_forward(batch)
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    for field in ("chosen", "rejected"):
        policy = separate_logps(module.model, module.processor, rows, field)
        assert torch.allclose(out[f"policy_{field}"], policy, atol=1e-4, rtol=1e-5), field
        base, processor = load_base(tiny_base)
        reference = separate_logps(base.eval(), processor, rows, field)
        assert torch.allclose(out[f"ref_{field}"], reference, atol=1e-4, rtol=1e-5), field
        assert (out[f"policy_{field}"] - reference).abs().max() > 0.1  # the perturbation mattered
    gt = []
    with torch.no_grad():
        for row in rows:
            clip = module.processor.load_clip(row.video, row.audio, use_audio=row.use_audio)
            one = module.processor.collate([module.processor.encode(clip, row.prompt, row.gt)])
            gt.append(response_ce(module.model(**one).logits, one["labels"])[0][0])
    assert torch.allclose(out["gt_ce"], torch.stack(gt), atol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_reference_from_rows_is_used_as_given(tiny_base, synthav, tmp_path, loss_type):
    """Given ref log-probs, the loss is the hand formula on them: -log sigmoid(beta h) (or IPO's
    (h - 1/(2 beta))^2) + 0.1 * CE."""
    module = module_for(tiny_base, loss_type=loss_type)
    ref = {f"train-00000{i}": (-20.0 - i, -30.0 + i) for i in range(4)}
    batch, _ = preference_batch(module, write_pairs(synthav, tmp_path / "p.jsonl", ref=ref))
    out = module.preference_forward(batch)
    assert out["ref_chosen"].tolist() == [-20.0, -21.0, -22.0, -23.0]
    assert out["ref_rejected"].tolist() == [-30.0, -29.0, -28.0, -27.0]
    loss, stats = module.loss_and_stats(out)
    h = (out["policy_chosen"] - out["ref_chosen"]) - (out["policy_rejected"] - out["ref_rejected"])
    preference = torch.log1p(torch.exp(-0.1 * h)) if loss_type == "sigmoid" else (h - 5.0) ** 2
    expected = (preference + 0.1 * out["gt_ce"]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx((0.1 * h).mean().item(), rel=1e-6)


def test_fresh_adapter_gives_log_2_zero_rewards_and_exactly_the_gt_term(tiny_base, synthav, tmp_path):
    """At a round start the policy IS the reference (B = 0): loss/dpo = log 2, rewards 0, and the total loss is
    log 2 + gt_weight * mean gt CE."""
    module = module_for(tiny_base, gt_weight=0.25)
    batch, _ = preference_batch(module, write_pairs(synthav, tmp_path / "p.jsonl"))
    loss, stats = module.loss_and_stats(module.preference_forward(batch))
    assert stats["loss/dpo"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert abs(stats["rewards/margins"].item()) < 1e-6 and stats["rewards/accuracies"].item() == 0.0
    assert loss.item() == pytest.approx(math.log(2) + 0.25 * stats["loss/gt_ce"].item(), abs=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_gt_weight_needs_gt_and_zero_skips_the_gt_rows(tiny_base, synthav, tmp_path, mode):
    module = module_for(tiny_base, **MODES[mode])
    batch, _ = preference_batch(module, write_pairs(synthav, tmp_path / "p.jsonl", gt=False))
    with pytest.raises(ValueError, match="needs a ground-truth caption"):
        module.preference_forward(batch)
    plain = module_for(tiny_base, gt_weight=0.0, **MODES[mode])
    batch, _ = preference_batch(plain, write_pairs(synthav, tmp_path / "q.jsonl", gt=True))
    shapes = []
    plain.model.llm.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["inputs_embeds"].shape[:2]),
                                              with_kwargs=True)
    out = plain.preference_forward(batch)
    assert not out["gt_ce"].any()
    # reference + policy over chosen and rejected only: 2 x 4 stacked sequences, or 4 packed rows (one per pair)
    labelled = (batch["labels"] != IGNORE_INDEX).sum(1).view(3, 4)
    prompt = batch["attention_mask"][:4].sum(1) - labelled[0]
    # as long as the longest [prompt | chosen | rejected], or in the cache form 4 prompts then 4 rows of
    # [chosen | rejected], each in a slot as long as the longest response
    rows = {"plain": [(8, int(batch["attention_mask"][:8].sum(1).max()))],
            "mask": [(4, int((prompt + labelled[0] + labelled[1]).max()))],
            "split": [(4, int((prompt + labelled[0] + labelled[1]).max()))],
            "cache": [(4, int(prompt.max())), (4, 2 * int(labelled[:2].max()))]}[mode]
    assert [tuple(s) for s in shapes] == rows * 2
    loss, stats = plain.loss_and_stats(out)
    assert "loss/gt_ce" not in stats and loss.item() == pytest.approx(stats["loss/dpo"].item())


def test_settings_are_checked(tiny_base):
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(base=str(tiny_base), loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        DPOModule(base=str(tiny_base), beta=0.0)
    with pytest.raises(ValueError, match="prefix_sharing"):
        DPOModule(base=str(tiny_base), prefix_sharing="kv")
    with pytest.raises(ValueError, match="round_lr_decay"):
        DPOModule(base=str(tiny_base), round_lr_decay=0.0)


# -- a round boundary under a Trainer ---------------------------------------------------------------------

class RoundAt(pl.Callback):
    """Calls start_round(1) after optimizer step ``step`` and records what a boundary must preserve or change."""

    def __init__(self, step: int, batch: dict):
        self.step, self.batch, self.seen = step, batch, {}

    def logits(self, module) -> torch.Tensor:
        was = module.model.training
        module.model.eval()
        with torch.no_grad():
            out = module.model(**{k: v for k, v in self.batch.items() if k != "labels"}).logits
        module.model.train(was)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        optimizer = trainer.optimizers[0]
        self.seen["logits_before"] = self.logits(pl_module)
        self.seen["lora_state_before"] = sum(p in optimizer.state for p in lora_parameters(pl_module.model))
        self.seen["lr_before"] = optimizer.param_groups[0]["lr"]
        aligner = dict(pl_module.model.aligner.named_parameters())
        pl_module.start_round(1, torch.Generator().manual_seed(5))
        self.seen["logits_after"] = self.logits(pl_module)
        self.seen["lora_state_after"] = sum(p in optimizer.state for p in lora_parameters(pl_module.model))
        self.seen["lr_after"] = optimizer.param_groups[0]["lr"]
        self.seen["b_zero"] = all(not layer.lora_B[ADAPTER].weight.any() for _, layer in lora_layers(pl_module.model))
        snap = pl_module.reference_snapshot.values
        self.seen["snapshot_is_now"] = all(torch.equal(snap["aligner." + n], p) for n, p in aligner.items())


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_start_round_keeps_the_function_resets_lora_state_and_restarts_the_schedule(tiny_base, synthav, tmp_path,
                                                                                    decay):
    module = DPOModule(base=str(tiny_base), trainable=["lora", "aligner", "merger"], lora=LoraSettings(**LORA),
                       lr=1e-2, schedule_steps=4, optim={"warmup_ratio": 0.5}, round_lr_decay=decay)
    module.configure_model()
    manifest = write_pairs(synthav, tmp_path / "p.jsonl", n=4)
    rows = read_manifest(manifest, "preference")
    probe = module.processor.collate([module.processor.encode(
        module.processor.load_clip(rows[0].video), rows[0].prompt, rows[0].chosen)])
    from src.data.datamodule import PreferenceDataModule

    data = PreferenceDataModule(train=str(manifest), base=str(tiny_base), batch_size=2, num_workers=0,
                                shuffle_buffer=0)
    callback = RoundAt(3, probe)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[callback])
    trainer.fit(module, datamodule=data)
    seen = callback.seen
    assert torch.allclose(seen["logits_before"], seen["logits_after"], atol=2e-5, rtol=0)
    assert seen["lora_state_before"] == 2 * 3 * 2 and seen["lora_state_after"] == 0
    # schedule of 4 steps, warm-up 2: lr 1/2, 2/2, cos..., restarted at step 3 -> the first warm-up lr again, times
    # round_lr_decay in round 1
    assert seen["lr_before"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 1 / 2)))
    assert seen["lr_after"] == pytest.approx(1e-2 * 0.5 * decay)
    assert seen["b_zero"] and seen["snapshot_is_now"]
    assert module.round == 1 and module.schedule_start == 3
    assert trainer.callback_metrics["mrdpo/round"].item() == 1.0
    # the round state travels in checkpoints
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh = module_for(tiny_base, ("lora", "aligner", "merger"))
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.round == 1 and fresh.schedule_start == 3
    assert fresh.reference_snapshot.values.keys() == module.reference_snapshot.values.keys()
    assert all(torch.equal(v, module.reference_snapshot.values[k]) for k, v in fresh.reference_snapshot.values.items())


@pytest.mark.parametrize("trainable, stage", [(("lora", "aligner"), "tokens"),
                                               (("lora", "aligner", "merger"), "tower")])
def test_media_cache_filled_by_a_first_pass_serves_the_steps(tiny_base, synthav, tmp_path, trainable, stage):
    """cache_video_tokens / cache_audio_states: a first no-grad pass over the pairs' clips (as the MrDPO rollout's
    prompt pass is) stores the frozen encoders' outputs under the rows' media keys; the training steps after it
    then run neither the vision tower nor Whisper, their batches carry no pixels or log-mel, and their losses and
    trained weights equal those of a module without the cache."""
    manifest = write_pairs(synthav, tmp_path / "p.jsonl")
    results = []
    for cached in (False, True):
        torch.manual_seed(0)
        module = module_for(tiny_base, trainable, cache_video_tokens=cached, cache_audio_states=cached, lr=1e-3)
        if cached:
            module.media_cache.serve(module.processor)
        with torch.no_grad():  # the rollout's pass
            module.preference_forward(preference_batch(module, manifest)[0])
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        count = counters(module.model)
        losses = []
        for _ in range(2):
            batch, _ = preference_batch(module, manifest)
            loss, _ = module.loss_and_stats(module.preference_forward(batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        weights = torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])
        results.append((losses, weights, {k: c.calls for k, c in count.items()}, batch, module))
    (plain, w_plain, calls_plain, _, _), (cached, w_cached, calls_cached, batch, module) = results
    assert plain == pytest.approx(cached, abs=1e-6)
    torch.testing.assert_close(w_plain, w_cached, atol=1e-6, rtol=0)
    assert calls_plain["vision"] == calls_plain["whisper"] == 2 * 2  # policy + reference pass per step
    assert calls_cached["vision"] == calls_cached["whisper"] == 0
    assert "pixel_values_videos" not in batch and "input_features" not in batch and len(set(batch["video_keys"])) == 4
    cache = module.media_cache
    assert cache.video_stage(module.model) == stage and cache.misses == {"video": 4, "audio": 4}
