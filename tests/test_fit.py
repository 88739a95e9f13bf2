"""`python -m src.fit` on the tiny base: recipes instantiate, overrides reach nested settings with their types,
accumulation is exact, a resumed run repeats the uninterrupted one, and the export loads."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import lightning.pytorch as pl
import torch
import yaml

from src import fit
from src.lit.dpo import DPOModule
from src.lit.sft import SFTModule, clip_gradients, log_grad_norm_and_lr, warmup_cosine
from src.models.lora import LoraSettings
from src.models.build import load_base
from src.data.manifest import read_manifest
from src.models.processor import AVProcessor

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("recipes/**/*.yaml"))
SFT_RECIPE = ROOT / "recipes" / "sft.yaml"


def tiny_overrides(base, synthav, **trainer) -> list[str]:
    settings = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "max_steps": 2,
                "log_every_n_steps": 1, "enable_progress_bar": False, **trainer}
    return ([f"--model.init_args.base={base}", f"--data.init_args.train={synthav}/train.jsonl",
             f"--data.init_args.base={base}", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2"]
            + [f"--trainer.{k}={v}" for k, v in settings.items()])


def instantiate(recipe, overrides) -> fit.FitCLI:
    return fit.build_cli(["--recipe", str(recipe), *overrides])


def test_there_are_recipes_and_each_opens_with_its_command():
    assert len(RECIPES) >= 3
    for recipe in RECIPES:
        command = f"# python -m src.fit --recipe {recipe.relative_to(ROOT)}"
        assert recipe.read_text().splitlines()[0].startswith(command), recipe


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_instantiates_with_tiny_overrides(recipe, tiny_base, synthav, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = instantiate(recipe, tiny_overrides(tiny_base, synthav))
    assert isinstance(cli.model, (SFTModule, DPOModule)) and cli.trainer.max_steps == 2


def test_nested_overrides_arrive_typed(tiny_base, synthav, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = instantiate(SFT_RECIPE, tiny_overrides(tiny_base, synthav) + [
        "--model.init_args.lr=1e-5", "--model.init_args.lora.r=8", "--model.init_args.optim.warmup_ratio=0.25",
        "--data.init_args.batch_size=4"])
    assert cli.model.lr == 1e-5 and isinstance(cli.model.lr, float)
    assert cli.model.lora.r == 8 and isinstance(cli.model.lora.r, int)
    assert cli.model.optim.warmup_ratio == 0.25 and cli.datamodule.batch_size == 4


class StopAfter(pl.Callback):
    """Ends training after optimizer step ``step``, as a crash there would (the schedule is still the full run's)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def sft_recipe_copy(folder: Path, stop_after: int | None = None) -> Path:
    """sft.yaml with a checkpoint every step and a CSV logger (and a StopAfter), written in ``folder``."""
    recipe = yaml.safe_load(SFT_RECIPE.read_text())
    if stop_after is not None:
        recipe["trainer"]["callbacks"].append({"class_path": "tests.test_fit.StopAfter",
                                               "init_args": {"step": stop_after}})
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "logs", "name": "run"}}
    for callback in recipe["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 1
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_fit(base, synthav, root: Path, monkeypatch, *extra: str, stop_after: int | None = None) -> list[float]:
    """Fit in ``root`` (relative outputs land there); returns train/loss per logged step."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root)
    # the recipe compiles the decoder layers (a minute of inductor on a cold cache): eager here, where these tests
    # check resume, accumulation and export; the compiled step has its own test below
    overrides = tiny_overrides(base, synthav) + ["--data.init_args.shuffle_buffer=16",
                                                 "--model.init_args.compile_decoder=false", *extra]
    fit.main(["--recipe", str(sft_recipe_copy(root, stop_after)), *overrides])
    newest = max(root.glob("logs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = list(csv.DictReader(open(newest)))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    model, _ = load_base(root / "checkpoints" / "sft" / "final")
    return model.state_dict()


@pytest.mark.slow
def test_micro_batch_4_equals_micro_batch_1_times_accumulation_4(tiny_base, synthav, tmp_path, monkeypatch):
    run_fit(tiny_base, synthav, tmp_path / "b4", monkeypatch, "--data.init_args.batch_size=4",
            "--trainer.max_steps=3")
    run_fit(tiny_base, synthav, tmp_path / "b1", monkeypatch, "--data.init_args.batch_size=1",
            "--trainer.max_steps=3", "--trainer.accumulate_grad_batches=4")
    a, b = final_weights(tmp_path / "b4"), final_weights(tmp_path / "b1")
    # atol 5e-5: k_proj.bias has an exactly-zero true gradient (softmax ignores a shift shared by all keys), so
    # Adam turns float noise (~1e-10) into updates of up to ~1e-5; every other tensor agrees to 1e-5
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=5e-5, rtol=1e-4)}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:10]


def test_warmup_cosine_schedule_by_hand():
    """10 steps, warm-up 20% = 2 steps: 1/2, 2/2, then cosine from 1 to 0 over the remaining 8 steps."""
    values = [warmup_cosine(s, 10, 0.2, 0.0) for s in range(10)]
    assert values[:3] == [0.5, 1.0, 1.0]
    assert values[6] == pytest.approx(0.5) and values[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(
        7 / 8 * torch.pi)).item()))


def test_resume_after_step_2_repeats_the_uninterrupted_run(tiny_base, synthav, tmp_path, monkeypatch):
    full = run_fit(tiny_base, synthav, tmp_path / "full", monkeypatch, "--trainer.max_steps=4")
    head = run_fit(tiny_base, synthav, tmp_path / "part", monkeypatch, "--trainer.max_steps=4", stop_after=2)
    ckpt = tmp_path / "part" / "checkpoints" / "sft" / "ckpts" / "last.ckpt"
    tail = run_fit(tiny_base, synthav, tmp_path / "part", monkeypatch, "--trainer.max_steps=4", f"--resume={ckpt}")
    assert len(full) == 4 and head == full[:2]
    assert tail[-2:] == pytest.approx(full[2:], abs=1e-6)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_export_loads_and_captions(tiny_base, synthav, tmp_path, monkeypatch):
    from src.evaluate import evaluate

    run_fit(tiny_base, synthav, tmp_path, monkeypatch, "--trainer.max_steps=1")
    model, processor = load_base(tmp_path / "checkpoints" / "sft" / "final")
    result = evaluate(model, processor, str(synthav / "test.jsonl"), max_new_tokens=4, out=tmp_path / "eval")
    assert result["n_clips"] == 2 and result["eer"] >= 0
    assert set(result) == {"miss", "incorrect", "hallucination", "eer", "repetition", "n_clips", "judge"}


def fit_subprocess(root: Path, recipe: Path, overrides: list[str], timeout: int = 300) -> None:
    """Run `python -m src.fit` as its own process (multi-process strategies re-launch their script: never inside
    pytest), in ``root``."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "src.fit", "--recipe", str(recipe), *overrides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_process(tiny_base, synthav, tmp_path):
    """2 ranks x micro-batch 1 under FSDP2 (gloo) == 1 process x micro-batch 2: the same two samples per step
    (rank r takes the stream's positions r, r+2, ...), the same per-example mean loss, the same update."""
    common = tiny_overrides(tiny_base, synthav) + ["--data.init_args.shuffle_buffer=0", "--trainer.max_steps=2"]
    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    for root in (single, sharded):
        root.mkdir()
        sft_recipe_copy(root)
    fit_subprocess(single, single / "recipe.yaml", common + ["--data.init_args.batch_size=2"])
    fit_subprocess(sharded, sharded / "recipe.yaml", common + [
        "--data.init_args.batch_size=1", "--trainer.devices=2",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"])
    a, b = final_weights(single), final_weights(sharded)
    assert a.keys() == b.keys()
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=5e-5, rtol=1e-4)}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:10]


@pytest.mark.parametrize("stage", ["align", "sft"])
def test_stage_trains_exactly_its_parts(tiny_base, stage):
    """align: the aligner only. sft: LoRA on the LLM's q/k/v + aligner + visual merger; the LLM's own weights,
    the vision blocks and Whisper stay frozen."""
    module = SFTModule(base=str(tiny_base), stage=stage, lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    parts = {"aligner": any(n.startswith("aligner.") for n in trainable),
             "merger": any(".visual.merger." in n for n in trainable),
             "lora": any(".lora_" in n for n in trainable),
             "llm_base": any("language_model" in n and ".lora_" not in n for n in trainable),
             "vision_blocks": any(".visual.blocks." in n for n in trainable),
             "whisper": any(n.startswith("whisper.") for n in trainable)}
    expected = {"aligner"} if stage == "align" else {"aligner", "merger", "lora"}
    assert {k for k, v in parts.items() if v} == expected
    if stage == "sft":
        assert all(".self_attn." in n and n.split(".self_attn.")[1][:6] in ("q_proj", "k_proj", "v_proj")
                   for n in trainable if ".lora_" in n)


def test_attn_implementation_reaches_the_decoder_and_keeps_the_loss(tiny_base, synthav):
    """recipes/sft.yaml trains the tiny model with eager attention (faster than SDPA under bf16 on CPU): the
    setting reaches every decoder layer, and in fp32 the loss and its gradients equal SDPA's (padded rows)."""
    proc = AVProcessor.from_pretrained(tiny_base)  # the batch only: each module loads its own model
    rows = read_manifest(synthav / "train.jsonl")[:4]
    batch = proc.collate([proc(r) for r in rows])
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: the padding mask is exercised
    results = {}
    for impl in ("sdpa", "eager"):
        module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "aligner"], attn_implementation=impl)
        module.configure_model()
        assert {layer.self_attn.config._attn_implementation for layer in module.model.llm.layers} == {impl}
        loss = module(batch).loss
        loss.backward()
        results[impl] = loss.detach(), module.model.lm_head.weight.grad.clone()
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_compile_decoder_compiles_each_decoder_layer_and_without_a_compiler_warns_and_stays_eager(tiny_base,
                                                                                                monkeypatch):
    """recipes/sft.yaml compiles the decoder layers: each one and nothing else is wrapped (lazily: no forward
    here); with no C++ compiler for inductor the layers stay eager, with a warning, instead of failing at step 1."""
    module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "aligner"], compile_decoder=True)
    module.configure_model()
    layers = list(module.model.llm.layers)
    compiled = [m for m in module.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert layers and len(compiled) == len(layers) and all(any(m is layer for layer in layers) for m in compiled)

    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise cpp_builder.exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "aligner"], compile_decoder=True)
    with pytest.warns(UserWarning, match="needs a C\\+\\+ compiler.*InvalidCxxCompiler"):
        module.configure_model()
    assert all(layer._compiled_call_impl is None for layer in module.model.llm.layers)


@pytest.mark.slow
def test_compiled_decoder_gives_the_eager_loss_and_gradients_with_one_graph_for_all_layers(tiny_base, synthav):
    """The recipe's compiled decoder (eager_lowp attention, fp32 here): two batches of different padded lengths
    give the eager losses and accumulated gradients, and dynamo builds one graph that serves every layer and both
    lengths (no recompile). (CPU inductor: 30-60 s.)"""
    from torch._dynamo.utils import counters

    proc = AVProcessor.from_pretrained(tiny_base)
    rows = read_manifest(synthav / "train.jsonl")
    batches = [proc.collate([proc(r) for r in rows[:4]]), proc.collate([proc(r) for r in rows[4:7]])]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for compiled in (False, True):
        module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "aligner"],
                           attn_implementation="eager_lowp", compile_decoder=compiled)
        module.configure_model()
        losses = []
        for batch in batches:
            loss = module(batch).loss
            loss.backward()
            losses.append(loss.detach())
        results[compiled] = torch.stack(losses), {n: p.grad for n, p in module.named_parameters()
                                                  if p.grad is not None}
    (eager_losses, eager_grads), (losses, grads) = results[False], results[True]
    torch.testing.assert_close(losses, eager_losses, atol=1e-5, rtol=0)
    assert grads.keys() == eager_grads.keys() and any(".layers.0." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert len(module.model.llm.layers) > 1 and counters["stats"]["unique_graphs"] == 1


class Gradients(torch.nn.Module):
    """Two parameters with set gradients, and the values ``log`` received."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3, 4))
        self.b = torch.nn.Parameter(torch.zeros(5))
        self.a.grad = torch.arange(12.0).reshape(3, 4) / 7
        self.b.grad = -torch.arange(5.0)
        self.logged = {}

    def log(self, name, value):
        self.logged[name] = value


def test_grad_norm_logged_is_the_l2_norm_over_every_gradient():
    module = Gradients()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.25)
    log_grad_norm_and_lr(module, optimizer)
    every = torch.cat([module.a.grad.flatten(), module.b.grad])
    assert float(module.logged["train/grad_norm"]) == pytest.approx(float(every.pow(2).sum().sqrt()), rel=1e-6)
    assert module.logged["train/lr"] == 0.25


def test_fused_adamw_is_clipped_under_bf16_mixed_where_lightnings_plugin_refuses():
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (a guard for 16-mixed's scaler);
    under bf16-mixed nothing is scaled and ``clip_gradients`` clips to the norm asked, as for an unfused AdamW."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("bf16-mixed", "cpu")
    module = Gradients()
    module.trainer = SimpleNamespace(precision_plugin=plugin)
    fused = torch.optim.AdamW(module.parameters(), lr=0.25, fused=True)
    with pytest.raises(RuntimeError, match="fused"):
        plugin.clip_gradients(fused, 1.0)
    clip_gradients(module, fused, 1.0, "norm")
    total = torch.cat([module.a.grad.flatten(), module.b.grad]).pow(2).sum().sqrt()
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    clip_gradients(module, fused, 0.1, "value")
    assert module.b.grad.abs().max() == pytest.approx(0.1) and module.a.grad.abs().max() <= 0.1


def test_fused_adamw_with_clipping_trains_as_the_unfused_one_under_bf16_mixed(tiny_base, synthav, tmp_path,
                                                                             monkeypatch):
    """recipes/sft.yaml's optimizer: fused AdamW, bf16-mixed, clipping at 1.0 (tight here, 0.05, so it acts): a
    3-step run gives the weights of the unfused AdamW's run (the same gradients; the kernels round differently)."""
    runs = {}
    for fused in (False, True):
        run_fit(tiny_base, synthav, tmp_path / str(fused), monkeypatch, "--trainer.precision=bf16-mixed",
                "--trainer.max_steps=3", "--trainer.gradient_clip_val=0.05",
                f"--model.init_args.optim.fused={str(fused).lower()}")
        runs[fused] = final_weights(tmp_path / str(fused))
    base = load_base(tiny_base)[0].state_dict()
    moved = [k for k in base if not torch.equal(base[k], runs[True][k])]
    assert moved
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], atol=1e-6, rtol=1e-5, msg=key)


def test_activation_checkpointing_keeps_loss_and_gradients_and_leaves_frozen_encoders_out_of_backward(tiny_base,
                                                                                                      synthav):
    """The 7B recipes train with activation checkpointing: the loss and every gradient equal those without it,
    the decoder layers are recomputed in backward, and the frozen vision blocks and Whisper layers build no graph
    (transformers' input-grad hooks made them run backward for nothing)."""
    proc = AVProcessor.from_pretrained(tiny_base)
    batch = proc.collate([proc(r) for r in read_manifest(synthav / "train.jsonl")[:2]])
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A
        module = SFTModule(base=str(tiny_base), stage="sft", lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                           activation_checkpointing=checkpointing)
        module.configure_model()
        model = module.model
        torch.manual_seed(1)
        for name, param in model.named_parameters():  # LoRA B = 0 would leave A without a gradient
            if "lora_B" in name:
                param.data.normal_(std=0.1)
        graph, attention_calls = {}, []
        for name, part in (("vision", model.visual.blocks[-1]), ("whisper", model.whisper.layers[-1])):
            part.register_forward_hook(lambda m, i, o, name=name: graph.__setitem__(
                name, (o[0] if isinstance(o, tuple) else o).requires_grad))
        model.llm.layers[0].self_attn.register_forward_hook(lambda *_: attention_calls.append(1))
        loss = module(batch).loss
        loss.backward()
        assert graph == {"vision": False, "whisper": False}, graph
        assert len(attention_calls) == (2 if checkpointing else 1)
        results[checkpointing] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}
    (loss, grads), (ckpt_loss, ckpt_grads) = results[False], results[True]
    torch.testing.assert_close(ckpt_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == ckpt_grads.keys() and any("lora_A" in n for n in grads) and any("merger" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
