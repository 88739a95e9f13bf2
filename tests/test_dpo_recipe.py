"""recipes/dpo.yaml through `python -m src.fit` on the tiny base: it trains, logs TRL's metric names, exports a
merged model that loads; and (slow) FSDP2 on 2 CPU processes matches one process, reference pass included."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from src import fit
from src.models.build import load_base
from tests.test_dpo_module import write_pairs
from tests.test_fit import fit_subprocess

ROOT = Path(__file__).resolve().parents[1]
DPO_RECIPE = ROOT / "recipes" / "dpo.yaml"
METRICS = ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "loss/dpo", "loss/gt_ce", "mrdpo/round", "train/lr")


class RoundAtStep(pl.Callback):
    """A round boundary after optimizer step ``step`` (what the MultiRoundDPO callback does to the module)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.start_round(1, torch.Generator().manual_seed(11))


def recipe_copy(folder: Path, *, round_at: int | None = None, stop_after: int | None = None) -> Path:
    """dpo.yaml with a CSV logger and a checkpoint every step (optionally a round boundary and a stop), written
    in ``folder``."""
    recipe = yaml.safe_load(DPO_RECIPE.read_text())
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "logs", "name": "run"}}
    for callback in recipe["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 1
    if round_at is not None:
        recipe["trainer"]["callbacks"].append({"class_path": "tests.test_dpo_recipe.RoundAtStep",
                                               "init_args": {"step": round_at}})
    if stop_after is not None:
        recipe["trainer"]["callbacks"].append({"class_path": "tests.test_fit.StopAfter",
                                               "init_args": {"step": stop_after}})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def overrides(base, pairs, **trainer) -> list[str]:
    settings = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "max_steps": 2,
                "log_every_n_steps": 1, "enable_progress_bar": False, **trainer}
    return ([f"--model.init_args.base={base}", f"--data.init_args.train={pairs}", f"--data.init_args.base={base}",
             "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--data.init_args.shuffle_buffer=0",
             "--model.init_args.lora.r=4", "--model.init_args.lora.alpha=8", "--model.init_args.lora.dropout=0.0",
             "--model.init_args.lr=1e-3"]
            + [f"--trainer.{k}={v}" for k, v in settings.items()])


def test_dpo_recipe_trains_logs_and_exports(tiny_base, synthav, tmp_path, monkeypatch):
    pairs = write_pairs(synthav, tmp_path / "pairs.jsonl", ref={"train-000000": (-40.0, -60.0)})
    monkeypatch.chdir(tmp_path)
    fit.main(["--recipe", str(recipe_copy(tmp_path)), *overrides(tiny_base, pairs)])
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/**/metrics.csv")))))
    logged = {k for r in rows for k, v in r.items() if v}
    assert set(METRICS) <= logged, set(METRICS) - logged
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model, _ = load_base(tmp_path / "checkpoints" / "dpo" / "final")  # merged: no LoRA tensors left
    assert not any(".lora_" in name for name in model.state_dict())
    start, _ = load_base(tiny_base)
    moved = [n for n, p in model.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert any("q_proj" in n for n in moved) and any(n.startswith("aligner.") for n in moved)
    assert not any(n.startswith("whisper.") or ".visual.blocks." in n for n in moved)


def test_resume_after_a_round_boundary_repeats_the_uninterrupted_run(tiny_base, synthav, tmp_path, monkeypatch):
    """Round 1 starts after step 1 (fold, fresh LoRA, snapshot, LR restart); stopping after step 3 and resuming
    gives the 5-step run's weights: the checkpoint carries the round, the LR cycle start (step 5's LR is
    warmup_cosine(3, 4) = 0.25 x lr, not the 0 of a cycle started at step 0) and the reference snapshot (the pairs
    have no reference log-probs, so the reference pass uses the snapshot after the resume)."""
    pairs = write_pairs(synthav, tmp_path / "pairs.jsonl", n=8)
    args = overrides(tiny_base, pairs, max_steps=5) + ["--model.init_args.schedule_steps=4"]

    def run(root: Path, *extra: str, stop_after: int | None = None) -> None:
        root.mkdir(exist_ok=True)
        monkeypatch.chdir(root)
        fit.main(["--recipe", str(recipe_copy(root, round_at=1, stop_after=stop_after)), *args, *extra])

    run(tmp_path / "full")
    run(tmp_path / "part", stop_after=3)
    run(tmp_path / "part", f"--resume={tmp_path / 'part' / 'checkpoints' / 'dpo' / 'ckpts' / 'last.ckpt'}")
    a = load_base(tmp_path / "full" / "checkpoints" / "dpo" / "final")[0].state_dict()
    b = load_base(tmp_path / "part" / "checkpoints" / "dpo" / "final")[0].state_dict()
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=1e-6)}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:10]
    rounds = [float(r["mrdpo/round"]) for r in csv.DictReader(open(next((tmp_path / "full").glob(
        "logs/**/metrics.csv")))) if r.get("mrdpo/round")]
    assert rounds == [0.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_process(tiny_base, synthav, tmp_path):
    """2 ranks x 1 pair under FSDP2 (gloo) == 1 process x 2 pairs, with the reference log-probs of half the pairs
    from a no-grad pass (snapshot of aligner/merger swapped into the shards) and half from the rows."""
    pairs = write_pairs(synthav, tmp_path / "pairs.jsonl", ref={"train-000001": (-40.0, -60.0),
                                                                "train-000003": (-35.0, -55.0)})
    common = overrides(tiny_base, pairs)
    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    for root in (single, sharded):
        root.mkdir()
        recipe_copy(root)
    fit_subprocess(single, single / "recipe.yaml", common)
    fit_subprocess(sharded, sharded / "recipe.yaml", common + [
        "--data.init_args.batch_size=1", "--trainer.devices=2",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"])
    a = load_base(single / "checkpoints" / "dpo" / "final")[0].state_dict()
    b = load_base(sharded / "checkpoints" / "dpo" / "final")[0].state_dict()
    assert a.keys() == b.keys()
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=5e-5, rtol=1e-4)}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:10]
    start = load_base(tiny_base)[0].state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if k.startswith("aligner."))
