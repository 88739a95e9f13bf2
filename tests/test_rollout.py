"""The MrDPO rollout on a tiny model and SynthAV: pair choice by hand, reference log-probs equal to the DPO side's
teacher-forced, adapter-disabled forward, resume after a crash == an uninterrupted run, bad rows, shards, the CLI.

The tiny base is random, so its samples are byte soup that never ends. ``steered`` nudges it (along the mean
direction of its final hidden states) towards a dozen SynthAV word tokens and the end token: its samples are then
caption-like word salad that usually ends and usually re-encodes to the sampled ids, which exercises both ways a
reference log-prob is obtained (recorded while sampling, or recomputed by a forward).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from src.data.manifest import read_manifest, row_to_dict
from src.judge.metric import EventCounts
from src.judge.synth import SynthJudge
from src.losses.logprobs import sequence_logps
from src.models.build import build_tiny, load_base
from src.models.lora import LoraSettings, adapters_disabled, attach_lora, fold_lora_, lora_layers, reset_lora_
from src.rollout import (
    Candidate,
    RolloutSettings,
    choose_pair,
    merge_shards,
    progress_path,
    read_progress,
    response_ids,
    rollout,
    shard_path,
)
from src.rollout import __main__ as cli
from src.rollout.pairs import TIE, TOO_FEW, UNDER_MARGIN
from tests import media_fixtures as fx

SETTINGS = RolloutSettings(k=4, temperature=1.0, top_p=0.9, max_new_tokens=16, batch_size=8, seed=3)
STEER_TEXT = (" The red square appears.", " A high tone plays.", " The green circle moves left.")
# Summed float32 log-probs over <= 17 tokens: a cached, left-padded generation vs a right-padded full forward
# differ by ~1e-6 per token here; 1e-4 on the sum leaves room and still catches any missing or extra token
# (each costs several nats).
LOGP_ATOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tokenizer_texts=300)


@pytest.fixture(scope="module")
def rows(synthav):
    return read_manifest(synthav / "train.jsonl", "sft")


@torch.no_grad()
def steered(base, rows, word_boost: float = 6.0, end_boost: float = 7.0):
    """A fresh tiny model whose tied embedding rows of STEER_TEXT's tokens and of the end token are pushed along
    u = mean final hidden state / |mean|^2, which adds ``boost`` (times cos) to those tokens' logits."""
    model, processor = load_base(base)
    model.eval()
    row = rows[0]
    sample = processor.encode(processor.load_clip(row.video, row.audio), row.prompt, row.caption)
    hidden = model(**processor.collate([sample])).hidden_states[0]
    u = hidden.mean(0) / hidden.mean(0).norm() ** 2
    ids = sorted({i for text in STEER_TEXT for i in processor.tokenizer.encode(text, add_special_tokens=False)})
    weight = model.get_input_embeddings().weight
    weight[ids] += word_boost * u
    weight[processor.eos_token_id] += end_boost * u
    return model, processor


@torch.no_grad()
def round_boundary(model) -> None:
    """What the MultiRoundDPO callback does at a boundary: a trained LoRA (here random B) folded into the base in
    place and re-initialised (B = 0), with the project's primitives."""
    gen = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    fold_lora_(model)
    reset_lora_(model, gen)


@torch.no_grad()
def dpo_side_logps(model, processor, row, responses: list[str]) -> torch.Tensor:
    """What the DPO module computes for a pair row: encode (clip, prompt, response), right-pad, sequence_logps."""
    clip = processor.load_clip(row.video, row.audio, use_audio=row.use_audio)
    batch = processor.collate([processor.encode(clip, row.prompt, text) for text in responses])
    return sequence_logps(model(**batch).logits, batch["labels"])


def counts(errors: int, n_gt: int = 4) -> EventCounts:
    return EventCounts(n_gt=n_gt, correct=n_gt - min(errors, n_gt), missed=min(errors, n_gt), incorrect=0,
                       hallucination=max(errors - n_gt, 0), n_sentences=1, repeated_sentences=0)


def cand(index: int, errors: int, caption: str | None = None, usable: bool = True) -> Candidate:
    return Candidate(index=index, caption=caption or f"caption {index}.", token_ids=[], logp=0.0, finished=True,
                     counts=counts(errors), usable=usable)


def pair_dicts(path) -> dict[str, dict]:
    return {row.id: row_to_dict(row) for row in read_manifest(path, "preference", check_media=False)}


# ------------------------------------------------------------------------------------------------ pair choice

def test_choose_pair_by_hand():
    """errors 3, 1, 4, 1 over 4 events: chosen = first lowest (index 1, EER 0.25), rejected = index 2 (EER 1.0),
    margin 0.75; kept at min_margin 0.75, dropped at 0.8."""
    four = [cand(0, 3), cand(1, 1), cand(2, 4), cand(3, 1)]
    choice = choose_pair(four)
    assert (choice.chosen.index, choice.rejected.index, choice.dropped) == (1, 2, None)
    assert choice.margin == pytest.approx(0.75)
    assert choose_pair(four, min_margin=0.75).dropped is None
    assert choose_pair(four, min_margin=0.8).dropped == UNDER_MARGIN
    assert choose_pair([cand(0, 2), cand(1, 2), cand(2, 2)]).dropped == TIE
    # the best caption is empty (unusable): the next best is chosen
    assert choose_pair([cand(0, 0, usable=False), cand(1, 2), cand(2, 3)]).chosen.index == 1
    assert choose_pair([cand(0, 1), cand(1, 3, usable=False)]).dropped == TOO_FEW
    # the same text judged differently (a noisy judge) is no preference
    assert choose_pair([cand(0, 1, " A tone."), cand(1, 3, "A tone. ")]).dropped == TIE


def test_response_ids_are_what_encode_labels(base, rows):
    _, processor = load_base(base)
    clip = processor.load_clip(rows[0].video, rows[0].audio)
    sample = processor.encode(clip, None, "The red square appears.")
    assert response_ids(processor, "The red square appears.") == sample["input_ids"][sample["response_start"]:].tolist()
    assert response_ids(processor, "a <|im_end|> b") is None


# ------------------------------------------------------------------------------------------------ log-probs

def test_recorded_logps_equal_a_teacher_forced_forward(base, rows, tmp_path):
    """Every sample that ended and re-encodes to its sampled ids: the log-prob generate() recorded == the DPO side's
    forward over (prompt + caption + end token), summed over the response."""
    model, processor = steered(base, rows)
    rollout(model, processor, rows[:4], SynthJudge(), tmp_path / "pairs.jsonl", SETTINGS, progress=False)
    checked = 0
    for record, row in zip(read_progress(tmp_path / "pairs.jsonl"), rows[:4]):
        assert record["id"] == row.id
        for sample in record["samples"]:
            ids = response_ids(processor, sample["caption"])
            if sample["finished"] and sample["usable"] and len(ids) == sample["tokens"]:
                fresh = dpo_side_logps(model, processor, row, [sample["caption"]])[0]
                assert abs(float(fresh) - sample["logp"]) < LOGP_ATOL, (sample, float(fresh))
                checked += 1
    assert checked >= 8


def test_beam_candidates_are_the_k_best_hypotheses_with_their_model_logps(base, rows, tmp_path):
    """candidates "beam": a video's K candidates are the K best hypotheses of a K-beam search (best first), each
    recorded log-prob is the DPO side's teacher-forced sum, and the pairs are chosen among them as for samples."""
    from src.models.generate import beam_search

    model, processor = steered(base, rows)
    settings = dataclasses.replace(SETTINGS, candidates="beam")
    stats = rollout(model, processor, rows[:4], SynthJudge(), tmp_path / "pairs.jsonl", settings, progress=False)
    assert stats.samples == 4 * settings.k and stats.pairs + stats.dropped == 4
    records = read_progress(tmp_path / "pairs.jsonl")
    batch = processor.collate([processor.encode(processor.load_clip(r.video, r.audio, use_audio=r.use_audio),
                                                r.prompt) for r in rows[:4]], padding_side="left")
    with torch.no_grad():
        out = beam_search(model, batch, settings.generation(), eos_token_id=processor.eos_token_id,
                          pad_token_id=processor.pad_token_id, num_return_sequences=settings.k)
    checked = 0
    for v, (record, row) in enumerate(zip(records, rows[:4])):
        assert record["id"] == row.id and len(record["samples"]) == settings.k
        for j, sample in enumerate(record["samples"]):
            i = v * settings.k + j
            ids = out.tokens[i, :out.lengths[i]].tolist()
            assert sample["caption"] == processor.tokenizer.decode(ids[:-1] if out.finished[i] else ids,
                                                                   skip_special_tokens=True)
            assert sample["logp"] == pytest.approx(float(out.logps[i]), abs=1e-5)
            if sample["finished"] and sample["usable"] and len(response_ids(processor, sample["caption"])) == \
                    sample["tokens"]:
                fresh = dpo_side_logps(model, processor, row, [sample["caption"]])[0]
                assert abs(float(fresh) - sample["logp"]) < LOGP_ATOL
                checked += 1
        scores = [s["logp"] / s["tokens"] for s in record["samples"]]
        assert scores == sorted(scores, reverse=True)  # best first (length penalty 1.0: mean log-prob)
    assert checked >= 4
    with pytest.raises(ValueError, match="candidates must be 'sample' or 'beam'"):
        dataclasses.replace(SETTINGS, candidates="greedy")


def test_the_encoders_run_once_per_video_not_once_per_sample(base, rows, tmp_path, monkeypatch):
    """A generate call holds the K samples of batch_size // K videos: in its prompt pass the vision tower and
    Whisper see each video once (its samples share its media key), where without the keys they saw K copies; the
    samples are the same."""
    from src.models import generate as generation

    model, processor = steered(base, rows)
    seen, inside = {"video": [], "audio": []}, []

    def tower(module, args, kwargs, out):  # a forward hook that returns something replaces the output
        if inside:
            seen["video"].append(len(kwargs["grid_thw"]))

    def whisper(module, args, out):
        if inside:
            seen["audio"].append(args[0].shape[0])

    model.visual.register_forward_hook(tower, with_kwargs=True)
    model.whisper.register_forward_hook(whisper)
    keyed = generation.prompt_pass

    def prompt_pass(model, batch, keys=True):
        inside.append(1)
        try:
            return keyed(model, batch if keys else {k: v for k, v in batch.items()
                                                    if k not in generation.MEDIA_OUTPUTS})
        finally:
            inside.clear()

    monkeypatch.setattr(generation, "prompt_pass", prompt_pass)
    rollout(model, processor, rows[:4], SynthJudge(), tmp_path / "once.jsonl", SETTINGS, progress=False)
    once = {part: list(calls) for part, calls in seen.items()}
    seen["video"].clear(), seen["audio"].clear()
    monkeypatch.setattr(generation, "prompt_pass", lambda model, batch: prompt_pass(model, batch, keys=False))
    rollout(model, processor, rows[:4], SynthJudge(), tmp_path / "every.jsonl", SETTINGS, progress=False)
    assert once["video"] == [SETTINGS.batch_size // SETTINGS.k] * 2 and seen["video"] == [SETTINGS.batch_size] * 2
    assert once["audio"] and seen["audio"] == [SETTINGS.k * n for n in once["audio"]]
    assert pair_dicts(tmp_path / "once.jsonl") == pair_dicts(tmp_path / "every.jsonl")


def test_reference_logps_equal_the_adapter_disabled_forward(base, rows, tmp_path):
    """LoRA attached and folded at a round boundary: the ref log-probs written into each pair == a fresh forward
    of the adapter-disabled model on the same sequences (both the recorded and the recomputed ones)."""
    model, processor = steered(base, rows)
    attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.05))
    before = dpo_side_logps(model, processor, rows[0], [rows[0].caption])
    round_boundary(model)
    with adapters_disabled(model):  # the fold changed the base (else this test could not tell on from off)
        assert abs(float(dpo_side_logps(model, processor, rows[0], [rows[0].caption]) - before)) > 1e-3
    model.train()
    out = tmp_path / "pairs.jsonl"
    stats = rollout(model, processor, rows, SynthJudge(), out, SETTINGS, round_index=2, progress=False)
    assert model.training  # the caller's mode is restored

    pairs = read_manifest(out, "preference")
    assert stats.pairs == len(pairs) >= 4 and stats.videos == len(rows) and stats.samples == len(rows) * SETTINGS.k
    assert stats.pairs + stats.dropped == stats.videos and stats.bad == 0
    assert 0 < stats.recomputed < 2 * stats.pairs  # both ways of getting a reference log-prob were used
    model.eval()
    by_id = {row.id: row for row in rows}
    for pair in pairs:
        row = by_id[pair.id]
        with adapters_disabled(model):
            fresh = dpo_side_logps(model, processor, row, [pair.chosen, pair.rejected])
        assert torch.allclose(fresh, torch.tensor([pair.ref_chosen_logp, pair.ref_rejected_logp]), atol=LOGP_ATOL,
                              rtol=0), (pair.id, fresh)
        assert (pair.gt, pair.events, pair.round, pair.prompt) == (row.caption, row.events, 2, row.prompt)
        assert pair.extra["chosen_eer"] < pair.extra["rejected_eer"]
    records = read_progress(out)
    eers = [s["eer"] for r in records for s in r["samples"]]
    assert stats.mean_eer == pytest.approx(sum(eers) / len(eers))
    assert sorted(r["id"] for r in records) == sorted(by_id)


# ------------------------------------------------------------------------------------------------ resume

class CrashingJudge:
    """Stands for a killed process: raises after ``budget`` captions. Only the protocol's ``score`` (no batch
    method), so every caption is one call."""

    def __init__(self, budget: int):
        self.budget = budget
        self.synth = SynthJudge()

    def score(self, caption, events):
        if self.budget == 0:
            raise KeyboardInterrupt
        self.budget -= 1
        return self.synth.score(caption, events)


def test_interrupted_then_resumed_equals_uninterrupted(base, rows, tmp_path):
    model, processor = steered(base, rows)
    whole = tmp_path / "whole.jsonl"
    rollout(model, processor, rows, SynthJudge(), whole, SETTINGS, progress=False)
    expected = pair_dicts(whole)

    resumed = tmp_path / "resumed.jsonl"
    per_group = SETTINGS.rows_per_group * SETTINGS.k
    with pytest.raises(KeyboardInterrupt):  # dies while judging the third group of two videos
        rollout(model, processor, rows, CrashingJudge(2 * per_group + 3), resumed, SETTINGS, progress=False)
    finished = {r["id"] for r in read_progress(resumed)}
    assert finished == {row.id for row in rows[:4]}
    # ... and, as if it had died while appending the third group's pairs: one whole row and half of the next
    third = [expected[row.id] for row in rows[4:6] if row.id in expected]
    assert third
    with open(resumed, "a", encoding="utf-8") as f:
        for obj in third[:1]:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.write(json.dumps(expected[rows[7].id] if rows[7].id in expected else third[0])[:40])

    judge = CrashingJudge(10**6)
    stats = rollout(model, processor, rows, judge, resumed, SETTINGS, progress=False)
    assert pair_dicts(resumed) == expected  # same pairs, same captions, bit-identical log-probs
    assert stats.skipped == 4 + len(third[:1])
    assert 10**6 - judge.budget == (len(rows) - stats.skipped) * SETTINGS.k  # finished videos are not redone
    again = rollout(model, processor, rows, SynthJudge(), resumed, SETTINGS, progress=False)
    assert (again.skipped, again.samples, again.pairs) == (len(rows), 0, 0)


def test_seed_changes_the_samples(base, rows, tmp_path):
    model, processor = steered(base, rows)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rollout(model, processor, rows[:2], SynthJudge(), a, SETTINGS, progress=False)
    rollout(model, processor, rows[:2], SynthJudge(), b, dataclasses.replace(SETTINGS, seed=4), progress=False)
    captions = [[s["caption"] for r in read_progress(path) for s in r["samples"]] for path in (a, b)]
    assert captions[0] != captions[1]


# ------------------------------------------------------------------------------------------------ bad rows, shards

def test_bad_rows_are_reported_counted_and_not_retried(base, rows, tmp_path):
    model, processor = steered(base, rows)
    broken = fx.write_random_bytes(tmp_path / "broken.mp4")
    bad = [dataclasses.replace(rows[0], id="broken", video=str(broken), source="train.jsonl:41"),
           dataclasses.replace(rows[1], id="no-events", events=None, source="train.jsonl:42")]
    out = tmp_path / "pairs.jsonl"
    stats = rollout(model, processor, [*bad, *rows[2:4]], SynthJudge(), out, SETTINGS, progress=False)
    assert stats.bad == 2 and stats.videos == 2 and stats.samples == 2 * SETTINGS.k
    assert stats.errors[0].startswith(f"train.jsonl:41: {broken}: ") and "cannot open" in stats.errors[0]
    assert stats.errors[1].startswith("train.jsonl:42: no ground-truth events")
    statuses = {r["id"]: r["status"] for r in read_progress(out)}
    assert statuses["broken"] == statuses["no-events"] == "bad"
    again = rollout(model, processor, [*bad, *rows[2:4]], SynthJudge(), out, SETTINGS, progress=False)
    assert (again.skipped, again.bad, again.samples) == (4, 0, 0)


def test_ranks_take_disjoint_shards_and_merge(base, rows, tmp_path):
    model, processor = steered(base, rows)
    out = tmp_path / "pairs.jsonl"
    seen, pairs = [], 0
    for rank in range(2):
        path = shard_path(out, rank, 2)
        stats = rollout(model, processor, rows, SynthJudge(), path, SETTINGS, rank=rank, world_size=2,
                        progress=False)
        seen.append({r["id"] for r in read_progress(path)})
        pairs += stats.pairs
    assert seen == [{row.id for row in rows[0::2]}, {row.id for row in rows[1::2]}]
    assert merge_shards(out, 2) == pairs == len(read_manifest(out, "preference"))


def test_interleaved_pairs_reach_the_rank_that_made_them_in_the_training_stream():
    """merge_shards(interleave=N): read in file order by src.data.streaming's rank x worker sharding, each rank's
    stream holds its own rollout's pairs first (all of them while every rank has some left), then leftovers."""
    from src.data.streaming import Source, StreamingDataset
    from src.rollout.files import interleave_shards

    class Ids:
        def __call__(self, row):
            return {"id": row}

    shards = [[f"a{i}" for i in range(7)], [f"b{i}" for i in range(4)]]
    for workers in (1, 2):
        merged = interleave_shards(shards, workers, seed=5)
        assert sorted(merged) == sorted(shards[0] + shards[1])
        assert merged != interleave_shards(shards, workers, seed=6)  # the seed shuffles each rank's pairs
        for rank in range(2):
            got = []
            for worker in range(workers):
                ds = StreamingDataset([Source("pairs.jsonl")], Ids(), kind="preference", rows=[merged],
                                      shuffle_buffer=0, repeat=False, rank=rank, world_size=2, num_workers=workers)
                ds._local_shard = lambda worker=worker, rank=rank: (rank * workers + worker, worker)
                got += [sample["id"] for sample in ds]
            # rank 0: 6 positions, all its own (of 7); rank 1: its 4 pairs and one of rank 0's leftovers
            assert len(set(got) & set(shards[rank])) == min(len(got), len(shards[rank])) == (6, 4)[rank]
            assert len(got) == (6, 5)[rank]
        assert interleave_shards(shards, workers) == interleave_shards(shards, workers)
    assert interleave_shards([[], []], 1) == []


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_writes_pairs_and_resumes(base, synthav, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    args = ["--ckpt", str(base), "--data", str(synthav / "train.jsonl"), "--out", str(out), "--k", "3",
            "--max-new-tokens", "6", "--batch-size", "6", "--round", "1", "--no-progress"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["videos"], first["samples"], first["skipped"]) == (8, 24, 0)
    assert first["pairs"] + first["dropped"] == 8 and first["samples_per_s"] > 0
    assert len(read_progress(out)) == 8 and progress_path(out) == f"{out}.progress"
    if first["pairs"]:
        assert {row.round for row in read_manifest(out, "preference")} == {1}
    assert cli.main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["videos"], second["skipped"]) == (0, 8)


def test_cli_refuses_a_misconfigured_judge_before_loading(synthav, tmp_path, capsys):
    args = ["--ckpt", str(tmp_path / "missing"), "--data", str(synthav / "train.jsonl"), "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit):
        cli.main([*args, "--judge", "llm"])
    assert "the llm judge needs the setting 'model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--k", "1"])
    assert "k must be at least 2" in capsys.readouterr().err
