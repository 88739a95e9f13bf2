"""MrDPO as one Lightning run (src/callbacks/mrdpo.py + recipes/mrdpo.yaml) on a tiny base and SynthAV.

The tiny base is random; like tests/test_rollout.py it is ``steered`` towards SynthAV words and the end token so
its samples are caption-like word salad that the synth judge ranks apart (a random base's samples all tie, and a
round without pairs is an error).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from src import fit
from src.callbacks.mrdpo import (ROW_KEYS, MultiRoundDPO, eer_change, round_seed, round_subset, rounds_table,
                                 write_json_atomic)
from src.data.datamodule import PreferenceDataModule
from src.data.manifest import read_manifest
from src.lit.sft import warmup_cosine
from src.models.build import build_tiny, load_base, save_base
from src.models.lora import ADAPTER, lora_layers, lora_parameters
from src.models.reference import reference_mode
from tests.test_rollout import dpo_side_logps, steered

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mrdpo.yaml"
LR = 1e-4
# Summed float32 log-probs over <= 17 response tokens, one forward against another (tests/test_rollout.py)
LOGP_ATOL = 1e-4


@pytest.fixture(scope="module")
def steered_base(tmp_path_factory, synthav):
    base = build_tiny(tmp_path_factory.mktemp("tiny"), tokenizer_texts=300)
    model, processor = steered(base, read_manifest(synthav / "train.jsonl", "sft"))
    return save_base(model, processor, tmp_path_factory.mktemp("steered"))


def mrdpo_recipe(folder: Path, synthav: Path, *, rounds: int = 2, steps: int = 2, callback: str | None = None,
                 extra_callbacks: tuple[str, ...] = (), evaluate: bool = True, local_pairs: bool = False) -> Path:
    """recipes/mrdpo.yaml sized for a test: 6 of the 8 SynthAV clips per rollout, 16-token samples and eval
    captions (of the 2 test clips; no evaluation unless ``evaluate``), a checkpoint every step, a CSV logger;
    written in ``folder``."""
    recipe = yaml.safe_load(RECIPE.read_text())
    callbacks = recipe["trainer"]["callbacks"]
    for entry in callbacks:
        if entry["class_path"].endswith(".MultiRoundDPO"):
            entry["class_path"] = callback or entry["class_path"]
            entry["init_args"].update(
                rounds=rounds, steps_per_round=steps, rollout_videos=6, videos=str(synthav / "train.jsonl"),
                eval_data=str(synthav / "test.jsonl") if evaluate else None, eval_max_new_tokens=16,
                rollout={"k": 4, "max_new_tokens": 16, "batch_size": 4, "seed": 3}, local_pairs=local_pairs)
        if entry["class_path"].endswith("ModelCheckpoint") and "every_n_train_steps" in entry["init_args"]:
            entry["init_args"]["every_n_train_steps"] = 1
    callbacks[1:1] = [{"class_path": name} for name in extra_callbacks]  # after MultiRoundDPO, before the rest
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "logs", "name": "run"}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def overrides(base: Path) -> list[str]:
    trainer = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
               "log_every_n_steps": 1, "enable_progress_bar": False}
    return ([f"--model.init_args.base={base}", f"--data.init_args.base={base}", "--data.init_args.num_workers=0",
             "--data.init_args.batch_size=2", "--data.init_args.shuffle_buffer=0", "--model.init_args.lora.r=4",
             "--model.init_args.lora.alpha=8", "--model.init_args.lora.dropout=0.0", f"--model.init_args.lr={LR}"]
            + [f"--trainer.{k}={v}" for k, v in trainer.items()])


def pair_logps(model, processor, pairs) -> torch.Tensor:
    """(n, 2) summed log-probs of each pair's chosen and rejected caption (the DPO side's computation), eval mode."""
    was = model.training
    model.eval()
    try:
        return torch.stack([dpo_side_logps(model, processor, row, [row.chosen, row.rejected]) for row in pairs])
    finally:
        model.train(was)


def lora_tensors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """(base weight, A, B, scaling) of every LoRA layer, copied."""
    return {name: (layer.get_base_layer().weight.detach().clone(), layer.lora_A[ADAPTER].weight.detach().clone(),
                   layer.lora_B[ADAPTER].weight.detach().clone(), float(layer.scaling[ADAPTER]))
            for name, layer in lora_layers(model)}


class RoundProbe(pl.Callback):
    """Records what the round boundary must do: the model at the end of round 0 and right after round 1 starts
    (train_dataloader, hence start_round and the rollout, run before on_train_epoch_start), and round 1's pairs
    scored by the reference and the policy at the end of round 1."""

    def __init__(self):
        self.seen: dict = {}

    def on_train_epoch_end(self, trainer, pl_module):
        model, optimizer = pl_module.model, trainer.optimizers[0]
        if trainer.current_epoch == 0:
            self.seen["end0"] = lora_tensors(model)
            self.seen["lora_state_end0"] = sum(p in optimizer.state for p in lora_parameters(model))
        elif trainer.current_epoch == 1:
            callback = next(c for c in trainer.callbacks if isinstance(c, MultiRoundDPO))
            pairs = read_manifest(callback.pairs_path(1), "preference")
            with reference_mode(model, pl_module.reference_snapshot):
                self.seen["reference_end1"] = pair_logps(model, pl_module.processor, pairs)
            self.seen["policy_end1"] = pair_logps(model, pl_module.processor, pairs)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        model, optimizer = pl_module.model, trainer.optimizers[0]
        self.seen["start1"] = lora_tensors(model)
        self.seen["lora_state_start1"] = sum(p in optimizer.state for p in lora_parameters(model))
        self.seen["lr_start1"] = optimizer.param_groups[0]["lr"]
        self.seen["round_start1"] = pl_module.round
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
        self.seen["trainable_start1"] = trainable
        self.seen["snapshot_start1"] = dict(pl_module.reference_snapshot.values)
        self.seen["model_start1"] = copy.deepcopy(model).eval()


def expected_lora_a(shapes: list[torch.Size], seed: int, round_index: int) -> list[torch.Tensor]:
    """reset_lora_'s draws: kaiming_uniform(a=sqrt 5) layer by layer from the round's generator."""
    generator = torch.Generator().manual_seed(round_seed(seed, round_index, "lora"))
    out = []
    for shape in shapes:
        a = torch.empty(tuple(shape))
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        out.append(a)
    return out


def test_two_rounds_through_the_trainer(steered_base, synthav, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mrdpo" / "rounds" / "r0").mkdir(parents=True)  # an earlier run's leftovers
    (tmp_path / "runs" / "mrdpo" / "rounds" / "r0" / "pairs.jsonl").write_text("left over\n")
    recipe = mrdpo_recipe(tmp_path, synthav, extra_callbacks=("tests.test_mrdpo.RoundProbe",))
    cli = fit.main(["--recipe", str(recipe), *overrides(steered_base)])
    # by name: the CLI imported this file as tests.test_mrdpo, which may be another module object than pytest's
    seen = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RoundProbe").seen
    run = tmp_path / "runs" / "mrdpo"

    # the boundary: LoRA folded into the base, A redrawn from the round's seed, B = 0, LoRA optimizer state gone
    end0, start1 = seen["end0"], seen["start1"]
    assert end0.keys() == start1.keys() and len(end0) == 2 * 3  # 2 layers x q/k/v
    assert any(b.abs().max() > 0 for _, _, b, _ in end0.values())  # round 0 trained the adapter
    for name, (w0, a0, b0, scaling) in end0.items():
        w1, _, b1, _ = start1[name]
        assert torch.allclose(w1, w0 + scaling * b0 @ a0, atol=1e-6, rtol=0), name
        assert not b1.any(), name
    names = [name for name, _ in lora_layers(cli.model.model)]
    for name, a in zip(names, expected_lora_a([start1[n][1].shape for n in names], seed=0, round_index=1)):
        assert torch.equal(start1[name][1], a), name
    assert seen["lora_state_end0"] == 2 * len(end0) and seen["lora_state_start1"] == 0
    # the LR cycle restarts: the first warm-up LR of a 2-step cycle (warm-up 10% -> at least 1 step), at the
    # recipe's round_lr_decay^1 of the peak
    decay = yaml.safe_load(RECIPE.read_text())["model"]["init_args"].get("round_lr_decay", 1.0)
    assert seen["lr_start1"] == pytest.approx(LR * decay * warmup_cosine(0, 2, 0.1, 0.0))
    assert seen["round_start1"] == 1
    # the reference snapshot is the round-1 start (aligner and merger, which moved in round 0)
    assert seen["snapshot_start1"].keys() == seen["trainable_start1"].keys()
    assert all(torch.equal(seen["snapshot_start1"][n], v) for n, v in seen["trainable_start1"].items())
    start = load_base(steered_base)[0].state_dict()
    assert any(not torch.equal(v, start[n]) for n, v in seen["snapshot_start1"].items() if n.startswith("aligner."))

    # round 1's pairs: reference log-probs == the round-1-start model (a copy taken then) == reference_mode at the
    # end of round 1; the policy has moved away from them
    pairs = read_manifest(run / "rounds" / "r1" / "pairs.jsonl", "preference")
    assert pairs and {p.round for p in pairs} == {1}
    recorded = torch.tensor([[p.ref_chosen_logp, p.ref_rejected_logp] for p in pairs])
    at_start = pair_logps(seen["model_start1"], cli.model.processor, pairs)
    assert torch.allclose(recorded, at_start, atol=LOGP_ATOL, rtol=0)
    assert torch.allclose(seen["reference_end1"], at_start, atol=LOGP_ATOL, rtol=0)
    assert (seen["policy_end1"] - at_start).abs().max() > 1e-2

    # files: one pairs file per round, the table with round 0 = the start model, the earlier run set aside
    r0 = read_manifest(run / "rounds" / "r0" / "pairs.jsonl", "preference")
    assert {p.round for p in r0} == {0}
    table = json.loads((run / "rounds.json").read_text())
    assert [row["round"] for row in table] == [0, 1, 2]
    assert all(set(ROW_KEYS) <= set(row) for row in table)
    assert [row["pairs"] for row in table] == [0, len(r0), len(pairs)]
    assert json.loads((tmp_path / "checkpoints" / "mrdpo" / "rounds.json").read_text()) == table
    from src.evaluate import evaluate

    model, processor = load_base(steered_base)
    alone = evaluate(model, processor, str(synthav / "test.jsonl"), max_new_tokens=16)
    assert table[0]["eer"] == pytest.approx(alone["eer"]) and table[0]["miss"] == pytest.approx(alone["miss"])
    final = load_base(tmp_path / "checkpoints" / "mrdpo" / "final")[0]
    assert not any(".lora_" in name for name in final.state_dict())
    assert evaluate(final, processor, str(synthav / "test.jsonl"), max_new_tokens=16)["eer"] == pytest.approx(
        table[2]["eer"])
    aside = list(run.glob("previous-*/rounds/r0/pairs.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == "left over\n"
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/**/metrics.csv")))))
    assert [float(r["mrdpo/round"]) for r in rows if r.get("mrdpo/round")] == [0.0, 0.0, 1.0, 1.0]
    assert len([r for r in rows if r.get("caption/eer")]) == 3


def test_loop_settings_that_contradict_the_rounds_are_refused(steered_base, synthav, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = mrdpo_recipe(tmp_path, synthav)
    with pytest.raises(ValueError, match=r"trainer.max_steps=5 .*limit_train_batches=3"):
        fit.main(["--recipe", str(recipe), *overrides(steered_base), "--trainer.max_steps=5",
                  "--trainer.limit_train_batches=3"])
    assert not (tmp_path / "runs" / "mrdpo" / "rounds").exists()
    local = mrdpo_recipe(tmp_path, synthav, local_pairs=True)  # pairs ordered for the ranks: read in file order
    with pytest.raises(ValueError, match=r"data.shuffle_buffer=7 .*local_pairs"):
        fit.main(["--recipe", str(local), *overrides(steered_base), "--data.init_args.shuffle_buffer=7"])
    assert not (tmp_path / "runs" / "mrdpo" / "rounds").exists()


def test_without_eval_data_the_table_has_pairs_and_minutes_only(steered_base, synthav, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = mrdpo_recipe(tmp_path, synthav, rounds=1, steps=1, evaluate=False)
    fit.main(["--recipe", str(recipe), *overrides(steered_base)])
    table = json.loads((tmp_path / "runs" / "mrdpo" / "rounds.json").read_text())
    pairs = len(read_manifest(tmp_path / "runs" / "mrdpo" / "rounds" / "r0" / "pairs.jsonl", "preference"))
    assert [(row["round"], row["eer"], row["pairs"]) for row in table] == [(0, None, 0), (1, None, pairs)]
    assert not (tmp_path / "runs" / "mrdpo" / "eval").exists()


# -- a real kill, twice, then the uninterrupted result -------------------------------------------------------

def start_fit(root: Path, args: list[str], pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MRDPO_PAUSE_MARKER=str(root / "paused"))
    env.pop("MRDPO_PAUSE", None)
    if pause:
        env["MRDPO_PAUSE"] = pause
    return subprocess.Popen([sys.executable, "-m", "src.fit", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_to_end(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_when_paused(proc: subprocess.Popen, marker: Path, timeout: float = 300) -> str:
    """Wait until the run pauses (it writes ``marker``), then SIGKILL it; returns its output."""
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError("the run ended before its pause point:\n" + proc.stdout.read()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError("the run did not reach its pause point in time")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()
    return out


@pytest.mark.slow
def test_killed_mid_rollout_and_mid_round_then_resumed_equals_the_uninterrupted_run(steered_base, synthav, tmp_path):
    """Rounds of 3 steps. Run B is SIGKILLed twice in round 2 (index 1): while judging its rollout's third video
    (two are finished), and after step 5 (round 2's second step, whose checkpoint is never written). Each time
    it resumes with --resume last. Its exported weights equal the uninterrupted run A's (atol 1e-6: the same
    float32 operations in the same order; they agree bit for bit here), its pairs equal A's, and the resumed
    rollout sampled and judged only the 4 unfinished videos; nothing was redone after the second kill."""
    roots = {name: tmp_path / name for name in ("a", "b")}
    args = {}
    for name, root in roots.items():
        root.mkdir()
        recipe = mrdpo_recipe(root, synthav, steps=3, callback="tests.mrdpo_kill.PausableMultiRoundDPO",
                              extra_callbacks=("tests.mrdpo_kill.PauseAtStep",))
        args[name] = ["--recipe", str(recipe), *overrides(steered_base)]
    run_to_end(start_fit(roots["a"], args["a"]))

    b, marker = roots["b"], roots["b"] / "paused"
    progress = b / "runs" / "mrdpo" / "rounds" / "r1" / "pairs.jsonl.progress"
    kill_when_paused(start_fit(b, args["b"], pause="rollout:1:3"), marker)
    finished_before_kill = [json.loads(line)["id"] for line in progress.read_text().splitlines()]
    assert len(finished_before_kill) == 2  # one video per judge call (batch_size 4 = K)
    resumed = args["b"] + ["--resume=last"]
    second = kill_when_paused(start_fit(b, resumed, pause="step:5"), marker)
    assert "| round |" not in second  # round 1's evaluation came from the round-end checkpoint, not a redo
    last = torch.load(b / "checkpoints" / "mrdpo" / "ckpts" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4  # killed mid-round 2, after its first step's checkpoint
    third = run_to_end(start_fit(b, resumed))
    assert " rollout: " not in third  # resumed mid-round 2 with its rollout finished: no rollout call at all

    a_run, b_run = roots["a"] / "runs" / "mrdpo", b / "runs" / "mrdpo"
    calls = json.loads((b_run / "rounds" / "r1" / "rollout.json").read_text())
    assert len(calls) == 1  # the killed call wrote nothing; the resumed call is the only one recorded
    assert (calls[0]["ranks"][0]["skipped"], calls[0]["ranks"][0]["videos"], calls[0]["ranks"][0]["samples"]) == (
        2, 4, 16)
    ids = [json.loads(line)["id"] for line in progress.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6 and ids[:2] == finished_before_kill
    for r in (0, 1):
        pa = read_manifest(a_run / "rounds" / f"r{r}" / "pairs.jsonl", "preference")
        pb = read_manifest(b_run / "rounds" / f"r{r}" / "pairs.jsonl", "preference")
        assert [(p.id, p.chosen, p.rejected) for p in pa] == [(p.id, p.chosen, p.rejected) for p in pb]
        assert all(abs(x.ref_chosen_logp - y.ref_chosen_logp) < 1e-6 for x, y in zip(pa, pb))
    ta, tb = (json.loads((run / "rounds.json").read_text()) for run in (a_run, b_run))
    assert [{k: row[k] for k in ROW_KEYS if k != "minutes"} for row in ta] == [
        {k: row[k] for k in ROW_KEYS if k != "minutes"} for row in tb]
    wa = load_base(roots["a"] / "checkpoints" / "mrdpo" / "final")[0].state_dict()
    wb = load_base(b / "checkpoints" / "mrdpo" / "final")[0].state_dict()
    bad = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0)}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:10]
    start = load_base(steered_base)[0].state_dict()
    assert any(not torch.equal(wa[k], start[k]) for k in wa if "q_proj" in k)


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_runs_the_rounds_like_one_process(steered_base, synthav, tmp_path):
    """2 ranks under FSDP2 (gloo): start_round on shards, each rank's rollout shard with whole weights, the merge,
    the evaluation split over the ranks and judged on rank 0, the export; no collective left waiting. The rollout
    and the start model's evaluation equal one process's (pairs by id: the per-sample seeds do not depend on the
    rank). Training differs from one process only in the order of the merged pairs, so the later rows are not
    compared."""
    runs = {}
    for name, extra in (("single", []), ("fsdp2", [
            "--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
            "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
            "--data.init_args.batch_size=1"])):
        root = tmp_path / name
        root.mkdir()
        runs[name] = root
        recipe = mrdpo_recipe(root, synthav, local_pairs=name == "fsdp2")
        run_to_end(start_fit(root, ["--recipe", str(recipe), *overrides(steered_base), *extra]))
    tables = {name: json.loads((root / "runs" / "mrdpo" / "rounds.json").read_text()) for name, root in runs.items()}
    assert [row["round"] for row in tables["fsdp2"]] == [0, 1, 2]
    assert {k: tables["fsdp2"][0][k] for k in ROW_KEYS if k != "minutes"} == {
        k: tables["single"][0][k] for k in ROW_KEYS if k != "minutes"}
    pairs = {name: {p.id: p for p in read_manifest(root / "runs" / "mrdpo" / "rounds" / "r0" / "pairs.jsonl",
                                                   "preference")} for name, root in runs.items()}
    assert pairs["fsdp2"].keys() == pairs["single"].keys()
    for key, p in pairs["fsdp2"].items():
        q = pairs["single"][key]
        assert (p.chosen, p.rejected) == (q.chosen, q.rejected)
        assert abs(p.ref_chosen_logp - q.ref_chosen_logp) < LOGP_ATOL and abs(
            p.ref_rejected_logp - q.ref_rejected_logp) < LOGP_ATOL
    assert read_manifest(runs["fsdp2"] / "runs" / "mrdpo" / "rounds" / "r1" / "pairs.jsonl", "preference")
    # local_pairs: position p of the merged file, read in file order, trains on rank p % 2: it holds that rank's
    # own pairs while both ranks have some left
    r0 = runs["fsdp2"] / "runs" / "mrdpo" / "rounds" / "r0"
    merged = [p.id for p in read_manifest(r0 / "pairs.jsonl", "preference")]
    made = [{p.id for p in read_manifest(r0 / f"pairs.rank{r}of2.jsonl", "preference")} for r in (0, 1)]
    assert sorted(merged) == sorted(made[0] | made[1])
    assert all(pid in made[p % 2] for p, pid in enumerate(merged[:2 * min(map(len, made))]))
    # the media cache ran under FSDP2 (the encoders of its parts whole, the rollouts' forwards forgotten before
    # each step): every round some of the steps' encoder outputs came from it; in one process all of them (each
    # pair's clip was stored by the round's rollout)
    rates = {name: [row for path in (root / "logs").rglob("metrics.csv") for row in csv.DictReader(path.open())
                    if row.get("media_cache/audio_hit_rate")] for name, root in runs.items()}
    assert [int(row["epoch"]) for row in rates["fsdp2"]] == [0, 1]
    parts = ("video", "audio")
    assert all(float(row[f"media_cache/{part}_hit_rate"]) > 0 for row in rates["fsdp2"] for part in parts)
    assert all(float(row[f"media_cache/{part}_hit_rate"]) == 1 for row in rates["single"] for part in parts)
    final = load_base(runs["fsdp2"] / "checkpoints" / "mrdpo" / "final")[0].state_dict()
    start = load_base(steered_base)[0].state_dict()
    assert not any(".lora_" in k for k in final) and any(not torch.equal(final[k], start[k]) for k in final
                                                          if "q_proj" in k)


# -- pieces ------------------------------------------------------------------------------------------------

def test_round_subsets_are_fixed_per_round_and_in_manifest_order():
    rows = list(range(100))
    first = round_subset(rows, 10, seed=0, round_index=0)
    assert first == round_subset(rows, 10, seed=0, round_index=0) == sorted(first) and len(set(first)) == 10
    assert first != round_subset(rows, 10, seed=0, round_index=1)
    assert first != round_subset(rows, 10, seed=1, round_index=0)
    assert round_subset(rows, None, 0, 3) == rows and round_subset(rows, 500, 0, 3) == rows
    assert round_seed(0, 1, "lora") != round_seed(0, 1, "videos")


def test_rounds_table_by_hand(tmp_path):
    """EER 1.0 -> 0.7: -30% relative; rates in percent, null rates as '-'."""
    rows = [{"round": 0, "miss": 0.5, "incorrect": 0.25, "hallucination": 0.25, "eer": 1.0, "repetition": None,
             "pairs": 0, "minutes": 0.0, "eval": "base/eval.json", "reused": True},
            {"round": 1, "miss": 0.4, "incorrect": 0.1, "hallucination": 0.2, "eer": 0.7, "repetition": 0.05,
             "pairs": 120, "minutes": 3.25}]
    lines = rounds_table(rows).splitlines()
    assert lines[2] == "| 0 (start, reused base/eval.json) | 50.0% | 25.0% | 25.0% | 100.0% | - | 0 | 0.0 |"
    assert lines[3] == "| 1 | 40.0% | 10.0% | 20.0% | 70.0% | 5.0% | 120 | 3.2 |"
    assert lines[-1] == "EER 100.0% -> 70.0% after round 1 (-30.0% relative)"
    change = {"relative_low": -0.45, "relative_high": -0.125}
    assert rounds_table(rows, change).splitlines()[-1] == ("EER 100.0% -> 70.0% after round 1 (-30.0% relative; 95% "
                                                           "interval over the evaluation's clips -45.0% to -12.5%, "
                                                           "paired bootstrap)")
    assert eer_change(rows) is None  # no per-clip samples beside the eval.json files
    for row, errors in zip(rows, ([2, 2, 3], [1, 2, 1])):  # two evaluations of the same three clips
        row["eval"] = str(tmp_path / f"round{row['round']}" / "eval.json")
        Path(row["eval"]).parent.mkdir()
        Path(row["eval"]).with_name("samples.jsonl").write_text("".join(json.dumps(
            {"id": f"c{i}", "counts": {"n_gt": 3, "correct": 3 - e, "missed": e, "incorrect": 0, "hallucination": 0,
                                       "n_sentences": 3, "repeated_sentences": 0}}) + "\n" for i, e in enumerate(errors)))
    change = eer_change(rows)
    assert change["eer_base"] == pytest.approx(7 / 9) and change["delta"] == pytest.approx(-3 / 9)
    assert change["relative_low"] <= change["relative"] <= change["relative_high"]
    write_json_atomic(tmp_path / "rounds.json", rows)
    assert json.loads((tmp_path / "rounds.json").read_text()) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round0", "round1", "rounds.json"]  # no temp file


class _Module:
    def __init__(self, base):
        self.base = str(base)


def test_the_start_model_eval_is_reused_only_when_it_judged_the_same_set(synthav, tmp_path):
    result = {"miss": 0.5, "incorrect": 0.1, "hallucination": 0.3, "eer": 0.9, "repetition": 0.0, "n_clips": 2,
              "judge": "synth"}
    (tmp_path / "eval.json").write_text(json.dumps(result))
    test = synthav / "test.jsonl"
    callback = MultiRoundDPO(videos=str(synthav / "train.jsonl"), eval_data=str(test))
    callback._module = _Module(tmp_path)
    greedy = MultiRoundDPO(videos="v", eval_data=str(test), eval_num_beams=1)
    greedy._module = _Module(tmp_path)
    (tmp_path / "judge.json").write_text(json.dumps({"data": str(test), "decoding": callback.eval_decoding}))
    assert callback._base_eval(2) == {**{k: result[k] for k in ("miss", "incorrect", "hallucination", "eer",
                                                                   "repetition")},
                                      "eval": str(tmp_path / "eval.json"), "reused": True}
    assert callback._base_eval(3) is None  # another number of clips
    assert greedy._base_eval(2) is None  # captioned by beam search, the greedy callback would not
    (tmp_path / "judge.json").write_text(json.dumps({"data": str(synthav / "val.jsonl"),
                                                     "decoding": callback.eval_decoding}))
    assert callback._base_eval(2) is None  # another manifest
    (tmp_path / "judge.json").write_text(json.dumps({"data": str(test)}))  # no decoding record: greedy
    assert callback._base_eval(2) is None and greedy._base_eval(2) is not None
    (tmp_path / "judge.json").unlink()  # no record at all: greedy, as before judge.json existed
    assert callback._base_eval(2) is None and greedy._base_eval(2) is not None
    (tmp_path / "eval.json").write_text(json.dumps({**result, "judge": "llm:gpt-4.1"}))
    assert greedy._base_eval(2) is None  # another judge
    assert MultiRoundDPO(videos="v", eval_data=str(test), reuse_base_eval=False)._base_eval(2) is None


def test_a_new_train_source_starts_a_new_stream_and_a_cursor_only_resumes_its_own(steered_base, synthav, tmp_path):
    from tests.test_dpo_module import write_pairs

    first = write_pairs(synthav, tmp_path / "r0.jsonl", n=4)
    second = write_pairs(synthav, tmp_path / "r1.jsonl", n=3)
    current = {"path": str(first)}
    data = PreferenceDataModule(base=str(steered_base), batch_size=1, num_workers=0, shuffle_buffer=0)
    data.train_source = lambda: current["path"]
    ids = []
    for batch, _ in zip(data.train_dataloader(), range(2)):  # what on_before_batch_transfer records in training
        data.datasets["train"].cursor.update(batch["stream"])
        ids.append(batch["id"][0])
    state = data.state_dict()
    assert state["train_sources"] == [[str(first), 1.0]]
    current["path"] = str(second)  # the next round: a fresh stream over the new file, from its start
    batch = next(iter(data.train_dataloader()))
    assert batch["id"][0] == ids[0] == "train-000000" and data.sources["train"][0].path == str(second)
    resumed = PreferenceDataModule(base=str(steered_base), batch_size=1, num_workers=0, shuffle_buffer=0)
    resumed.load_state_dict(state)
    resumed.train_source = lambda: str(first)
    assert next(iter(resumed.train_dataloader()))["id"][0] == "train-000002"  # after the 2 consumed samples
    wrong = PreferenceDataModule(base=str(steered_base), batch_size=1, num_workers=0, shuffle_buffer=0)
    wrong.load_state_dict(state)
    wrong.train_source = lambda: str(second)
    with pytest.raises(ValueError, match="cursor belongs to the training data"):
        wrong.train_dataloader()


# -- recipes -------------------------------------------------------------------------------------------------

def callback_args(recipe: dict) -> dict:
    return next(c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("MultiRoundDPO"))["init_args"]


def single_round(main: dict) -> tuple[dict, dict]:
    """One round with MrDPO's whole budget: all its steps, and as many rollout videos as its rounds sample."""
    args = callback_args(main)
    return {"rounds": 1, "steps_per_round": args["rounds"] * args["steps_per_round"],
            "rollout_videos": args["rounds"] * args["rollout_videos"]}, {}


ABLATIONS = {  # recipe -> (its callback changes, its model changes), given mrdpo.yaml
    "mrdpo_single_round.yaml": single_round,
    "mrdpo_no_gt.yaml": lambda main: ({}, {"gt_weight": 0.0}),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_recipes_differ_from_mrdpo_only_where_they_say(name):
    """Each ablation is recipes/mrdpo.yaml with its own change and its own output paths; this keeps them in step
    when the main recipe's numbers are tuned."""
    main = yaml.safe_load(RECIPE.read_text())
    ablation = yaml.safe_load((ROOT / "recipes" / name).read_text())
    stem = name.removesuffix(".yaml")
    callback_changes, model_changes = ABLATIONS[name](main)
    expected = copy.deepcopy(main)
    callback_args(expected).update(callback_changes, run_dir=f"runs/{stem}",
                                   rounds_path=f"checkpoints/{stem}/rounds.json")
    expected["model"]["init_args"].update(model_changes)
    expected["trainer"]["default_root_dir"] = f"runs/{stem}"
    expected["trainer"]["logger"]["init_args"]["name"] = stem
    for entry in expected["trainer"]["callbacks"]:
        if "dirpath" in entry.get("init_args", {}):
            entry["init_args"]["dirpath"] = entry["init_args"]["dirpath"].replace("checkpoints/mrdpo/",
                                                                                  f"checkpoints/{stem}/")
    assert ablation == expected
