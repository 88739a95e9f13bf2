"""recipes/dpo.yaml through `python -m src.fit` on the tiny base: it trains, logs TRL's metric names, exports a
merged model that loads; and (slow) FSDP2 on 2 CPU processes matches one process, reference pass included."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src import fit
from src.models.build import build_tiny, load_base
from tests.test_dpo_module import write_pairs

ROOT = Path(__file__).resolve().parents[1]
DPO_RECIPE = ROOT / "recipes" / "dpo.yaml"
METRICS = ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "loss/dpo", "loss/gt_ce", "mrdpo/round", "train/lr")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-base"), tokenizer_texts=300)


def recipe_copy(folder: Path) -> Path:
    """dpo.yaml with a CSV logger, written in ``folder``."""
    recipe = yaml.safe_load(DPO_RECIPE.read_text())
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "logs", "name": "run"}}
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


def fit_subprocess(root: Path, recipe: Path, args: list[str], timeout: int = 300) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "src.fit", "--recipe", str(recipe), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


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
