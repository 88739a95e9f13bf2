"""MultiRoundDPO: multi-round DPO (METHOD.md "MrDPO") as ONE Lightning run of a DPOModule.

One round = one training epoch of ``steps_per_round`` optimizer steps. The callback owns the loop limits: at
``setup`` it sets ``max_epochs = rounds``, ``limit_train_batches = steps_per_round x accumulate_grad_batches``,
``reload_dataloaders_every_n_epochs = 1`` and the module's ``schedule_steps = steps_per_round`` (one warm-up +
cosine LR cycle per round), and refuses a recipe that sets any of them to something else. It installs its
:meth:`round_pairs` as the PreferenceDataModule's ``train_source``, which ``train_dataloader()`` calls at every
epoch start, so each round trains on the pairs its own rollout wrote.

A round r, hook by hook (every hook runs on every rank; collectives happen in start_round, the rollout and the
evaluation, so no rank may skip them):

1. ``train_dataloader()`` -> :meth:`round_pairs` (epoch r about to start; after a resume also for the restored
   epoch, because Lightning restores the checkpoint before it asks for data):
   a. a missing evaluation row is made first: row 0 (the start model = the SFT export with a fresh LoRA, B = 0;
      its ``eval.json`` is reused when it judged the same manifest with the same judge), or row r when a kill
      fell between round r-1's last checkpoint and its evaluation;
   b. rounds after the first: ``DPOModule.start_round(r, generator)``: fold the LoRA into the base in place,
      re-initialise it (A from a generator seeded by (seed, r), the same on every rank; B = 0), forget the LoRA
      optimizer state, snapshot the trainable non-LoRA parameters (aligner, merger), restart the LR cycle.
      ``started_round`` (saved in checkpoints) makes this happen once per round, resumes included;
   c. the rollout (src.rollout) on ``rollout_videos`` training videos, a subset drawn per round by (seed, r):
      K samples per video from the round-start model (run under ``reference_mode``: adapter bypassed, snapshot
      swapped in, which right after start_round is the current model, and stays the round-start model should a
      resumed run ever reach it mid-round), judged, best/worst pairs with their reference log-probs, appended to
      ``<run_dir>/rounds/r{r}/pairs.jsonl`` (per-rank files merged by rank 0). A killed rollout resumes from its
      progress file; a finished one (recorded in the state) is not called again. Zero pairs is an error.
2. Training steps: DPOModule's gDPO on those pairs (the reference log-probs come from the rows).
3. ``on_train_epoch_end``: evaluate the policy (LoRA on) on ``eval_data`` with the judge (every rank captions
   its share of the clips with whole weights, rank 0 judges), record row r+1 {round, miss, incorrect,
   hallucination, eer, repetition, pairs, minutes}, write ``<run_dir>/rounds.json`` and ``rounds_path``
   atomically, print the table (rank 0) and log caption/{miss,incorrect,hallucination,eer,repetition} and
   mrdpo/pairs. A ModelCheckpoint that saves on epoch end (the recipes have one) then holds the row, so a
   resume from it does not evaluate again.

``minutes`` of row k >= 1: wall minutes of round k-1's rollout, training and evaluation, counted by the processes
whose work survived (time after a checkpoint that a kill threw away is not counted); row 0: the start model's
evaluation (0 when reused). State in checkpoints: started_round, finished rollouts and their pair counts, the
table, the timings and the settings a resume must keep (steps_per_round, rollout_videos, seed).

Files under ``run_dir`` (default: the trainer's default_root_dir; it must be the same directory on a resume):
``rounds/r{r}/pairs.jsonl`` (+ ``.progress``, rank shards), ``rounds/r{r}/rollout.json`` (stats of every
rollout call), ``eval/round{k}/`` (src.evaluate's files for row k), ``rounds.json``. A fresh (not resumed) run
that finds these from an earlier run moves them into ``run_dir/previous-<time>/`` rather than reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from src.evaluate import EVAL_LENGTH_PENALTY, EVAL_MAX_NEW_TOKENS, EVAL_NUM_BEAMS, decoding_settings
from src.judge.factory import JudgeConfig
from src.rollout import RolloutSettings, merge_shards, rollout, shard_path

RATES = ("miss", "incorrect", "hallucination", "eer", "repetition")
ROW_KEYS = ("round", *RATES, "pairs", "minutes")
RUN_FILES = ("rounds", "eval", "rounds.json")
RESUME_SETTINGS = ("steps_per_round", "rollout_videos", "seed")


def round_seed(seed: int, round_index: int, purpose: str) -> int:
    """A 63-bit seed for one purpose of one round, stable across processes and Python versions."""
    digest = hashlib.sha256(f"mrdpo\0{seed}\0{round_index}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def round_subset(rows: list, count: int | None, seed: int, round_index: int) -> list:
    """``count`` rows drawn without replacement for round ``round_index``, in manifest order (None or more than
    there are: all rows). The same on every rank and on every resume."""
    if count is None or count >= len(rows):
        return list(rows)
    picked = random.Random(round_seed(seed, round_index, "videos")).sample(range(len(rows)), count)
    return [rows[i] for i in sorted(picked)]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Temp file in the same folder, fsync, rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_number(value: float | None) -> float | None:
    """NaN (a rate without a denominator, e.g. repetition when no caption has a sentence) -> None (JSON null)."""
    return None if value is None or math.isnan(value) else float(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rounds_table(rows: list[dict], change: dict | None = None) -> str:
    """The per-round caption-error table (markdown): round, the rates, pairs, minutes; ``change``: the paired
    bootstrap of the last row against the first (``eer_change``), whose relative interval the closing line gives."""
    lines = ["| round | miss | incorrect | hallucination | EER | repetition | pairs | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = str(row["round"])
        if row["round"] == 0:
            label += " (start" + (f", reused {row['eval']}" if row.get("reused") else "") + ")"
        cells = [label, *(_percent(row.get(k)) for k in RATES), str(row["pairs"]), f"{row['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first, last = rows[0].get("eer"), rows[-1].get("eer")
    if len(rows) > 1 and first and last is not None:
        interval = "" if change is None else (f"; 95% interval over the evaluation's clips {change['relative_low']:+.1%} "
                                              f"to {change['relative_high']:+.1%}, paired bootstrap")
        lines.append(f"\nEER {_percent(first)} -> {_percent(last)} after round {rows[-1]['round']} "
                     f"({(last - first) / first:+.1%} relative{interval})")
    return "\n".join(lines)


def eer_change(rows: list[dict]) -> dict | None:
    """``metric.paired_eer_bootstrap`` of the last row's evaluation against the first's, from the per-clip samples
    beside their eval.json; None when either has none or they judged different clips."""
    from src.judge.report import load_clip_counts, paired_change

    if len(rows) < 2 or not rows[0].get("eval") or not rows[-1].get("eval"):
        return None
    try:
        first, last = (load_clip_counts(Path(row["eval"]).parent) for row in (rows[0], rows[-1]))
    except ValueError:
        return None
    return paired_change(first, last)


class MultiRoundDPO(pl.Callback):
    """Args:
        videos: SFT manifest of the training videos, with ground-truth ``events`` (what the judge scores against).
        eval_data: manifest evaluated before training and after every round (None: no evaluation; the table
            then has pairs and minutes only).
        rounds: number of rounds (epochs). steps_per_round: optimizer steps per round (one LR cycle each).
        rollout_videos: videos sampled per round, drawn per round from ``videos`` (None: all of them).
        rollout: K, temperature, top_p, max_new_tokens, batching, min_margin and the sampling seed (combined
            with the round index) of the rollout.
        judge: the judge of rollouts and evaluations (``JudgeConfig``; synth by default). LLM judges cache their
            answers in ``run_dir``.
        run_dir: where pairs, evaluations and rounds.json go (default: trainer.default_root_dir).
        rounds_path: a second copy of rounds.json (e.g. checkpoints/mrdpo/rounds.json).
        seed: draws each round's videos and its fresh LoRA A.
        eval_batch_size, eval_max_new_tokens, eval_num_beams, eval_length_penalty: how the evaluation is captioned
            (src.evaluate's defaults, so that the start model's eval.json written by ``make sft`` / ``make eval`` is
            comparable and reused).
        reuse_base_eval: take row 0 from ``<base>/eval.json`` when it judged ``eval_data`` (same clip count, same
            judge label, and judge.json names the same manifest and decoding; one without a decoding record is
            taken as greedy).
        local_pairs: each rank trains on the pairs its own rollout made (as far as the ranks' counts allow): the
            merged pairs file is ordered for the stream's rank sharding (``merge_shards``'s ``interleave``), each
            rank's pairs shuffled there with the round's seed, and the data must be read in file order
            (``data.shuffle_buffer: 0``, no ``group_by_length``). With the DPO module's media cache under several
            ranks, a rank then meets the clips whose encoder outputs its rollout just stored; otherwise about
            1/ranks of them in the first round.
    """

    def __init__(self, videos: str, eval_data: str | None = None, *, rounds: int = 3, steps_per_round: int = 1000,
                 rollout_videos: int | None = None, rollout: RolloutSettings = RolloutSettings(),
                 judge: JudgeConfig = JudgeConfig(), run_dir: str | None = None, rounds_path: str | None = None,
                 seed: int = 0, eval_batch_size: int = 32, eval_max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                 eval_num_beams: int = EVAL_NUM_BEAMS, eval_length_penalty: float = EVAL_LENGTH_PENALTY,
                 reuse_base_eval: bool = True, local_pairs: bool = False):
        if rounds < 1 or steps_per_round < 1:
            raise ValueError(f"need rounds >= 1 and steps_per_round >= 1, got {rounds} and {steps_per_round}")
        if rollout_videos is not None and rollout_videos < 1:
            raise ValueError(f"rollout_videos must be >= 1 or None (all), got {rollout_videos}")
        self.videos, self.eval_data = videos, eval_data
        self.rounds, self.steps_per_round, self.rollout_videos = rounds, steps_per_round, rollout_videos
        self.rollout = rollout if isinstance(rollout, RolloutSettings) else RolloutSettings(**rollout)
        self.judge = judge if isinstance(judge, JudgeConfig) else JudgeConfig(**judge)
        self.run_dir_setting, self.rounds_path, self.seed = run_dir, rounds_path, seed
        self.eval_batch_size = eval_batch_size
        self.eval_decoding = decoding_settings(eval_max_new_tokens, eval_num_beams, eval_length_penalty)
        self.reuse_base_eval = reuse_base_eval
        self.local_pairs = local_pairs
        # state (saved in checkpoints)
        self.started_round = -1  # the last round whose start (start_round, or round 0's fresh LoRA) happened
        self.rollout_pairs: dict[int, int] = {}  # finished rollouts: round -> pairs
        self.rows: list[dict] = []
        self.timings: dict[str, dict[int, float]] = {"rollout_s": {}, "train_s": {}, "eval_s": {}}
        # this process only
        self._trainer: pl.Trainer | None = None
        self._module = None
        self._restored = False
        self._run_dir_checked = False
        self._train_clock: tuple[int, float] | None = None  # (round, perf_counter at its training start)
        self._video_rows: list | None = None

    # -- overridable pieces ----------------------------------------------------------------------------------
    def build_judge(self, cache: str | os.PathLike | None, *, purpose: str, index: int):
        """The judge of round ``index``'s rollout (``purpose`` "rollout") or of table row ``index`` ("eval");
        ``cache``: where an LLM judge keeps its answers."""
        return self.judge.build(cache=cache)

    def rollout_rows(self, round_index: int) -> list:
        """The training videos of round ``round_index``'s rollout."""
        if self._video_rows is None:
            from src.data.manifest import read_manifest

            self._video_rows = read_manifest(self.videos, "sft")
        return round_subset(self._video_rows, self.rollout_videos, self.seed, round_index)

    def pairs_path(self, round_index: int) -> Path:
        return self.run_dir / "rounds" / f"r{round_index}" / "pairs.jsonl"

    @property
    def run_dir(self) -> Path:
        if self.run_dir_setting is not None:
            return Path(self.run_dir_setting)
        return Path(self._trainer.default_root_dir)

    # -- set-up ----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from src.lit.dpo import DPOModule

        if not isinstance(pl_module, DPOModule):
            raise TypeError(f"MultiRoundDPO trains a DPOModule, got {type(pl_module).__name__}")
        data = trainer.datamodule
        if data is None or not hasattr(data, "train_source"):
            raise TypeError("MultiRoundDPO needs a PreferenceDataModule (its train_source hook gives each round's "
                            f"pairs), got {type(data).__name__}")
        batches = self.steps_per_round * trainer.accumulate_grad_batches
        total = self.rounds * self.steps_per_round
        conflicts = []
        if trainer.max_steps not in (-1, total):
            conflicts.append(f"trainer.max_steps={trainer.max_steps} (leave it -1; {self.rounds} x "
                             f"{self.steps_per_round} = {total} steps)")
        if trainer.limit_train_batches not in (1.0, batches):
            conflicts.append(f"trainer.limit_train_batches={trainer.limit_train_batches} (a round is "
                             f"{batches} batches)")
        if trainer.reload_dataloaders_every_n_epochs not in (0, 1):
            conflicts.append(f"trainer.reload_dataloaders_every_n_epochs={trainer.reload_dataloaders_every_n_epochs}")
        if trainer.fit_loop.max_epochs not in (self.rounds, 1000, -1, None):  # 1000 / -1: Lightning's defaults
            conflicts.append(f"trainer.max_epochs={trainer.fit_loop.max_epochs} (one epoch per round: "
                             f"{self.rounds})")
        if pl_module.schedule_steps not in (None, self.steps_per_round):
            conflicts.append(f"model.schedule_steps={pl_module.schedule_steps} (one LR cycle per round: "
                             f"{self.steps_per_round})")
        if self.local_pairs and (getattr(data, "shuffle_buffer", 0) or getattr(data, "group_by_length", 0) > 1):
            conflicts.append(f"data.shuffle_buffer={data.shuffle_buffer} / data.group_by_length="
                             f"{data.group_by_length} (local_pairs reads the pairs in file order: set 0 / 0)")
        if conflicts:
            raise ValueError("MultiRoundDPO sets the loop from rounds and steps_per_round; the recipe sets "
                             + "; ".join(conflicts))
        trainer.fit_loop.max_epochs = self.rounds
        trainer.limit_train_batches = batches
        trainer.reload_dataloaders_every_n_epochs = 1
        pl_module.schedule_steps = self.steps_per_round
        data.train_source = self.round_pairs
        self._trainer, self._module = trainer, pl_module

    # -- a round's start: train_dataloader() ----------------------------------------------------------------
    def round_pairs(self) -> str:
        """The pairs file of the round about to train (the datamodule's ``train_source``); see the module
        docstring, step 1. Runs on every rank."""
        trainer, module = self._trainer, self._module
        r = trainer.current_epoch
        if r >= self.rounds:
            raise RuntimeError(f"epoch {r} asked for data, but the run has {self.rounds} rounds")
        self._stop_train_clock()
        if not self._run_dir_checked:
            self._set_aside_an_earlier_run()
        if r > 0 and self.started_round < 0:
            raise RuntimeError(f"resumed at round {r} without MultiRoundDPO state: the checkpoint was not written by "
                               "this callback (a DPO or SFT run's checkpoint cannot continue as MrDPO)")
        if not self._has_row(r):
            self._record(r, self._evaluate(r))
        if self.started_round < r:
            if r > 0:
                if self.started_round != r - 1:
                    raise RuntimeError(f"round {r} follows round {r - 1}, but the state says round "
                                       f"{self.started_round} started last")
                module.start_round(r, torch.Generator().manual_seed(round_seed(self.seed, r, "lora")))
            self.started_round = r
        if r not in self.rollout_pairs:
            self.rollout_pairs[r] = self._rollout(r)
        elif not self.pairs_path(r).is_file():
            raise FileNotFoundError(f"{self.pairs_path(r)}: round {r}'s pairs are gone; the run cannot resume "
                                    "without them (run_dir must be the directory of the interrupted run)")
        self._train_clock = (r, time.perf_counter())
        return os.fspath(self.pairs_path(r))

    def _set_aside_an_earlier_run(self) -> None:
        """A fresh run must not train on an earlier run's rollouts: move them away (rank 0), never reuse them."""
        self._run_dir_checked = True
        if self._restored:
            return
        trainer = self._trainer
        if trainer.is_global_zero:
            found = [name for name in RUN_FILES if (self.run_dir / name).exists()]
            if found:
                aside = self.run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
                aside.mkdir(parents=True)
                for name in found:
                    shutil.move(os.fspath(self.run_dir / name), os.fspath(aside / name))
                print(f"MrDPO: {self.run_dir} held an earlier run's {', '.join(found)}; moved to {aside} (resume a "
                      "run with --resume)", file=sys.stderr, flush=True)
        trainer.strategy.barrier("mrdpo-run-dir")

    def _rollout(self, r: int) -> int:
        """Round r's rollout on every rank, the merge on rank 0; returns the pair count (the same on every rank)."""
        from src.models.reference import reference_mode

        trainer, module = self._trainer, self._module
        rank, world = trainer.global_rank, trainer.world_size
        out = self.pairs_path(r)
        settings = dataclasses.replace(self.rollout, seed=round_seed(self.rollout.seed, r, "samples"))
        cache = self.run_dir / shard_path("judge_cache.sqlite", rank, world)
        start = time.perf_counter()
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with self.build_judge(cache, purpose="rollout", index=r) as judge, trainer.precision_plugin.forward_context(), \
                reference_mode(module.model, module.reference_snapshot):
            stats = rollout(module.model, module.processor, self.rollout_rows(r), judge, shard_path(out, rank, world),
                            settings, round_index=r, rank=rank, world_size=world, progress=show)
        every = _gather(stats.as_dict(), trainer)
        trainer.strategy.barrier("mrdpo-rollout")
        pairs = None
        if trainer.is_global_zero:
            local = self.local_pairs and world > 1  # one process: its pairs are all local already
            pairs = merge_shards(out, world, **({"interleave": trainer.datamodule.num_workers,
                                                 "seed": round_seed(self.seed, r, "pairs")} if local else {}))
            log = out.parent / "rollout.json"
            calls = json.loads(log.read_text()) if log.is_file() else []
            write_json_atomic(log, calls + [{"ranks": every, "pairs": pairs}])
            total = {k: sum(s[k] for s in every) for k in ("videos", "samples", "pairs", "dropped", "skipped", "bad")}
            print(f"MrDPO round {r} rollout: {total['videos']} videos sampled ({total['skipped']} already done), "
                  f"{total['samples']} samples, {pairs} pairs in {out} ({total['dropped']} videos dropped, "
                  f"{total['bad']} unreadable)", flush=True)
        pairs = trainer.strategy.broadcast(pairs, src=0)
        self._add_time("rollout_s", r, time.perf_counter() - start)
        if not pairs:
            raise RuntimeError(f"round {r}: the rollout made no pairs from {len(self.rollout_rows(r))} videos (every "
                               f"video's samples tied or were unusable; see {out}.progress): raise rollout_videos or "
                               "rollout.k, or lower rollout.min_margin")
        return pairs

    # -- a round's end -------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        r = trainer.current_epoch
        self._stop_train_clock()
        if not self._has_row(r + 1):
            self._record(r + 1, self._evaluate(r + 1))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            print(f"MrDPO finished {len(self.rows) - 1} of {self.rounds} rounds; table in {self.run_dir / 'rounds.json'}"
                  + (f" and {self.rounds_path}" if self.rounds_path else ""), flush=True)

    def _evaluate(self, k: int) -> dict | None:
        """Row k's rates: the policy now (LoRA on) captions eval_data (``eval_decoding``), the judge scores it. Row 0
        reuses the base's eval.json when it fits. Every rank captions rows[rank::world] with whole weights; rank 0
        judges and writes ``eval/round{k}``; the result is broadcast. None without ``eval_data``."""
        if self.eval_data is None:
            return None
        from src.data.manifest import read_manifest
        from src.evaluate import generate_captions, judge_captions, write_outputs
        from src.rollout.unshard import unsharded

        trainer, module = self._trainer, self._module
        start = time.perf_counter()
        rows = read_manifest(self.eval_data, "sft")
        if k == 0:
            reused = self._base_eval(len(rows)) if trainer.is_global_zero else None
            reused = trainer.strategy.broadcast(reused, src=0)
            if reused is not None:
                self._add_time("eval_s", 0, 0.0)
                return reused
        model = module.model
        was_training = model.training
        try:
            with trainer.precision_plugin.forward_context(), unsharded(model):
                mine = generate_captions(model, module.processor, rows[trainer.global_rank::trainer.world_size],
                                         self.eval_data, batch_size=self.eval_batch_size, **self.eval_decoding)
        finally:
            model.train(was_training)
        captions = {key: value for part in _gather(mine, trainer) for key, value in part.items()}
        result = None
        if trainer.is_global_zero:
            out = self.run_dir / "eval" / f"round{k}"
            out.mkdir(parents=True, exist_ok=True)
            with self.build_judge(out / "judge_cache.sqlite", purpose="eval", index=k) as judge:
                evaluation = judge_captions(rows, captions, judge)
            write_outputs(out, evaluation, source=f"MrDPO round {k}", data=os.fspath(self.eval_data), preds=captions,
                          decoding=self.eval_decoding)
            result = {**evaluation.result, "eval": os.fspath(out / "eval.json")}
        result = trainer.strategy.broadcast(result, src=0)
        self._add_time("eval_s", k, time.perf_counter() - start)
        return result

    def _base_eval(self, n_clips: int) -> dict | None:
        """<base>/eval.json when it judged ``eval_data`` with this judge (rank 0 only)."""
        if not self.reuse_base_eval:
            return None
        path = Path(self._module.base) / "eval.json"
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        with self.build_judge(None, purpose="eval", index=0) as judge:
            label = judge.label
        if result.get("n_clips") != n_clips or result.get("judge") != label:
            return None
        info = path.with_name("judge.json")
        recorded = json.loads(info.read_text()) if info.is_file() else {}
        data = recorded.get("data")
        if data is not None and os.path.realpath(data) != os.path.realpath(self.eval_data):
            return None
        decoding = recorded.get("decoding")
        if decoding is None:  # written before judge.json recorded the decoding, which was greedy then
            same_decoding = self.eval_decoding["num_beams"] == 1
        else:
            same_decoding = decoding == self.eval_decoding
        if not same_decoding:
            return None
        return {**{key: result[key] for key in RATES}, "eval": os.fspath(path), "reused": True}

    def _record(self, k: int, result: dict | None) -> None:
        """Append row k (k - 1 = the round it closes), write rounds.json files and the table (rank 0), log."""
        if k != len(self.rows):
            raise RuntimeError(f"MrDPO table: row {k} would follow {len(self.rows)} rows")
        trainer = self._trainer
        if k == 0:
            pairs, seconds = 0, self.timings["eval_s"].get(0, 0.0)
        else:
            pairs = self.rollout_pairs[k - 1]
            seconds = sum(self.timings[name].get(k - 1, 0.0) for name in ("rollout_s", "train_s"))
            seconds += self.timings["eval_s"].get(k, 0.0)
        row = {"round": k, **{key: _json_number((result or {}).get(key)) for key in RATES}, "pairs": pairs,
               "minutes": round(seconds / 60, 2)}
        if result is not None:
            row["eval"] = result["eval"]
            if result.get("reused"):
                row["reused"] = True
        self.rows.append(row)
        if trainer.is_global_zero:
            for path in [self.run_dir / "rounds.json"] + ([Path(self.rounds_path)] if self.rounds_path else []):
                write_json_atomic(path, self.rows)
            print("\n" + rounds_table(self.rows, eer_change(self.rows)) + "\n", flush=True)
        metrics = {f"caption/{key}": row[key] for key in RATES if row[key] is not None}
        metrics["mrdpo/pairs"] = float(pairs)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _has_row(self, k: int) -> bool:
        return len(self.rows) > k

    # -- time ----------------------------------------------------------------------------------------------
    def _add_time(self, name: str, r: int, seconds: float) -> None:
        self.timings[name][r] = self.timings[name].get(r, 0.0) + seconds

    def _stop_train_clock(self) -> None:
        if self._train_clock is not None:
            r, start = self._train_clock
            self._add_time("train_s", r, time.perf_counter() - start)
            self._train_clock = None

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        timings = {name: dict(values) for name, values in self.timings.items()}
        if self._train_clock is not None:  # the training time up to this checkpoint survives a kill after it
            r, start = self._train_clock
            timings["train_s"][r] = timings["train_s"].get(r, 0.0) + time.perf_counter() - start
        return {"started_round": self.started_round, "rollout_pairs": dict(self.rollout_pairs),
                "rows": [dict(row) for row in self.rows], "timings": timings,
                "settings": {name: getattr(self, name) for name in RESUME_SETTINGS}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = {name: (value, getattr(self, name)) for name, value in state_dict["settings"].items()
                   if getattr(self, name) != value}
        if changed:
            raise ValueError("MrDPO cannot resume with other " + ", ".join(
                f"{name} (checkpoint {old}, now {new})" for name, (old, new) in changed.items()))
        self.started_round = int(state_dict["started_round"])
        self.rollout_pairs = {int(r): int(n) for r, n in state_dict["rollout_pairs"].items()}
        self.rows = [dict(row) for row in state_dict["rows"]]
        self.timings = {name: {int(r): float(s) for r, s in values.items()}
                        for name, values in state_dict["timings"].items()}
        self._restored = True
        if self._train_clock is not None:  # restored after this process already started a clock: restart it
            self._train_clock = (self._train_clock[0], time.perf_counter())


def _gather(obj: Any, trainer: pl.Trainer) -> list:
    """``obj`` of every rank, in rank order (a collective when distributed)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
