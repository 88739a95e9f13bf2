"""One MrDPO rollout: K sampled captions per training video, judged, turned into preference pairs with their
reference log-probs, appended to a JSONL file as they are made.

Reference log-probs. Each pair member's ``ref_*_logp`` is the SUM of log pi(y_t | x, y_<t) over the response
tokens the DPO side trains on: ``processor.encode(clip, row.prompt, caption)`` labels the caption's tokens and
the end token, and ``src.losses.logprobs.sequence_logps`` sums them. ``generate()`` records that number for free
(T = 1, no top-p) when the sampled ids ARE those tokens: the sample emitted its end token and re-encoding its
decoded text gives the same ids back. Otherwise (cut at max_new_tokens, so no end token was sampled, or a
non-canonical tokenisation) the member's log-prob is recomputed by a teacher-forced forward of exactly what the
DPO side will see; ``stats.recomputed`` counts these. The model given is both the sampler and the reference, so
call this at a round start, when the LoRA is folded into the base and re-initialised (adapter on == off).
Precision is the caller's: under Lightning, wrap the call in ``trainer.precision_plugin.forward_context()`` so
the reference log-probs are taken in the precision the DPO forward uses.

Determinism. Sample k of row ``id`` draws from its own generator seeded by (seed, id, k); the rank's shard
(rows[rank::world_size]) is cut into fixed groups of ``batch_size // k`` rows, and a group is generated whole
even on resume (only its unfinished rows are written), so every batch a resumed run computes has the composition
the uninterrupted run had: same samples, same pairs, same log-probs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import torch
from tqdm import tqdm

from src.caption import batches
from src.data.errors import BadSampleError
from src.data.manifest import PreferenceRow, append_rows
from src.judge.metric import EventCounts
from src.losses.logprobs import response_positions, scatter_response_logps
from src.models.generate import GenerationSettings, beam_search, generate
from src.rollout.files import append_progress, prepare
from src.rollout.pairs import TIE, TOO_FEW, UNDER_MARGIN, Candidate, PairChoice, choose_pair, response_ids, sample_seed
from src.rollout.unshard import unsharded

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    """Anything that counts a caption's errors against ground-truth event sentences (SynthJudge, an LLM judge)."""

    def score(self, caption: str, events: Sequence[str]) -> EventCounts: ...


def score_all(judge: Scorer, items: Sequence[tuple[str, Sequence[str]]]) -> list[EventCounts]:
    """EventCounts per (caption, events), in order: one ``score_batch`` call when the judge has one (src.judge's
    judges do; LLM judges answer such a batch concurrently), else ``score`` per item."""
    if hasattr(judge, "score_batch"):
        return list(judge.score_batch(items))
    return [judge.score(caption, events) for caption, events in items]


@dataclass
class RolloutSettings:
    """k samples per video (METHOD: official K 2, ours 4), drawn with temperature and top_p (official 1.0, 0.9).
    batch_size: sequences per generate call (batch_size // k videos, at least one). forward_batch_size: sequences
    per teacher-forced forward when a reference log-prob must be recomputed (bounds its activations).
    min_margin: smallest EER difference (chosen vs rejected) kept; ties are always dropped.
    candidates: "sample" (the paper's: k captions sampled with temperature and top_p) or "beam" (the k best
    hypotheses of one beam search with k beams, length penalty 1.0: pairs among the captions a beam-search
    evaluation chooses from; temperature, top_p and seed are then unused)."""

    k: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 128
    batch_size: int = 16
    forward_batch_size: int = 4
    min_margin: float = 0.0
    seed: int = 0
    candidates: Literal["sample", "beam"] = "sample"

    def __post_init__(self):
        if self.candidates not in ("sample", "beam"):
            raise ValueError(f"candidates must be 'sample' or 'beam', got {self.candidates!r}")
        if self.k < 2:
            raise ValueError(f"k must be at least 2 to make a pair, got {self.k}")
        if self.batch_size < 1 or self.forward_batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size, forward_batch_size and max_new_tokens must be positive")

    @property
    def rows_per_group(self) -> int:
        return max(1, self.batch_size // self.k)

    def generation(self) -> GenerationSettings:
        if self.candidates == "beam":
            return GenerationSettings(max_new_tokens=self.max_new_tokens, num_beams=self.k)
        return GenerationSettings(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                                  top_p=self.top_p)


@dataclass
class RolloutStats:
    """This call's work (videos already finished in the output are ``skipped``, not counted again).
    dropped = ties + under_margin + too_few_usable; mean_eer: mean over judged samples of each one's EER (None
    without samples)."""

    videos: int = 0
    samples: int = 0
    pairs: int = 0
    dropped: int = 0
    ties: int = 0
    under_margin: int = 0
    too_few_usable: int = 0
    bad: int = 0
    skipped: int = 0
    recomputed: int = 0
    mean_eer: float | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def count_drop(self, reason: str) -> None:
        field_name = {TIE: "ties", UNDER_MARGIN: "under_margin", TOO_FEW: "too_few_usable"}[reason]
        setattr(self, field_name, getattr(self, field_name) + 1)
        self.dropped += 1

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


@dataclass
class _Video:
    """A group member: its row, and once decoded its clip and prompt sample, else the reason it is bad."""

    row: object
    clip: object = None
    sample: dict | None = None
    error: str | None = None
    candidates: list[Candidate] = field(default_factory=list)


@torch.no_grad()
def rollout(model, processor, rows: Sequence, judge: Scorer, out: str | os.PathLike,
            settings: RolloutSettings | None = None, *, round_index: int | None = None, rank: int = 0,
            world_size: int = 1, progress: bool | None = None) -> RolloutStats:
    """Sample, judge and pair this rank's shard of ``rows`` (SFT rows with events), appending pairs to ``out``.

    ``out`` is this rank's own file (see ``files.shard_path``); its ``.progress`` log lists every finished video,
    and videos already in either file are skipped. ``round_index`` is written into each pair. Call on every rank:
    with an FSDP2-sharded model the weights are gathered for the rollout (a collective). ``progress``: a tqdm bar
    on stderr with samples/s (default: rank 0 only).
    """
    settings = settings or RolloutSettings()
    start = time.perf_counter()
    stats = RolloutStats()
    done = prepare(out)
    shard = list(rows)[rank::world_size]
    groups = list(batches(shard, settings.rows_per_group))
    pending = sum(1 for row in shard if row.id not in done)
    stats.skipped = len(shard) - pending
    eers: list[float] = []
    show = rank == 0 if progress is None else progress
    bar = tqdm(total=pending * settings.k, unit="sample", desc=f"rollout rank {rank}", file=sys.stderr,
               disable=not show, mininterval=1.0)
    was_training = model.training
    model.eval()
    try:
        with unsharded(model), bar:
            device = next(model.parameters()).device
            for group in groups:
                if all(row.id in done for row in group):
                    continue
                videos = _decode(processor, group)
                _sample(model, processor, videos, settings, device)
                fresh = [v for v in videos if v.row.id not in done]
                _write(model, processor, fresh, judge, out, settings, round_index, device, stats, eers)
                bar.update(settings.k * len(fresh))
    finally:
        model.train(was_training)
    stats.mean_eer = sum(eers) / len(eers) if eers else None
    stats.seconds = time.perf_counter() - start
    return stats


def _decode(processor, group: Sequence) -> list[_Video]:
    """Decode and encode each row's clip as a prompt; a row without events or with unreadable media is bad."""
    videos = []
    for row in group:
        video = _Video(row)
        if not row.events:
            video.error = f"{row.source}: no ground-truth events: the judge has nothing to score against"
        else:
            try:
                video.clip = processor.load_clip(row.video, row.audio, use_audio=row.use_audio)
                video.sample = processor.encode(video.clip, row.prompt)
                # the K samples of this video share its key: the encoders run on it once per generate call
                video.sample["media_key"] = processor.media_key(row)
            except BadSampleError as err:
                video.error = f"{row.source}: {err}"
        videos.append(video)
    return videos


def _sample(model, processor, videos: list[_Video], settings: RolloutSettings, device) -> None:
    """K candidates of every readable video, ``batch_size`` sequences per generate call: K samples, each with its
    own generator, or the K best hypotheses of a K-beam search of the video."""
    beam = settings.candidates == "beam"
    jobs = [(video, k) for video in videos if video.error is None for k in range(1 if beam else settings.k)]
    for chunk in batches(jobs, settings.rows_per_group if beam else settings.batch_size):
        batch = processor.collate([video.sample for video, _ in chunk], padding_side="left")
        batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        if beam:
            out = beam_search(model, batch, settings.generation(), eos_token_id=processor.eos_token_id,
                              pad_token_id=processor.pad_token_id, num_return_sequences=settings.k)
            chunk = [(video, k) for video, _ in chunk for k in range(settings.k)]
        else:
            generators = [torch.Generator(device=device).manual_seed(sample_seed(settings.seed, video.row.id, k))
                          for video, k in chunk]
            out = generate(model, batch, settings.generation(), eos_token_id=processor.eos_token_id,
                           pad_token_id=processor.pad_token_id, generator=generators)
        for i, (video, k) in enumerate(chunk):
            ids = out.tokens[i, :out.lengths[i]].tolist()
            finished = bool(out.finished[i])
            text_ids = ids[:-1] if finished else ids
            caption = processor.tokenizer.decode(text_ids, skip_special_tokens=True)
            video.candidates.append(Candidate(index=k, caption=caption, token_ids=ids, logp=float(out.logps[i]),
                                              finished=finished))


def _write(model, processor, videos: list[_Video], judge: Scorer, out: str | os.PathLike, settings: RolloutSettings,
           round_index: int | None, device, stats: RolloutStats, eers: list[float]) -> None:
    """Judge, pair, fix up reference log-probs, then append the pairs and the progress records (in that order)."""
    for video in videos:
        if video.error is not None:
            logger.warning("rollout: skipped %s", video.error)
            stats.errors.append(video.error)
            stats.bad += 1
    readable = [video for video in videos if video.error is None]
    judged = [(video, cand) for video in readable for cand in video.candidates]
    verdicts = score_all(judge, [(cand.caption, list(video.row.events)) for video, cand in judged])
    for (_, cand), counts in zip(judged, verdicts, strict=True):
        cand.counts = counts
        cand.usable = bool(cand.caption.strip()) and response_ids(processor, cand.caption) is not None
        eers.append(cand.eer)
    choices: list[tuple[_Video, PairChoice]] = []
    for video in readable:
        stats.videos += 1
        stats.samples += len(video.candidates)
        choices.append((video, choose_pair(video.candidates, settings.min_margin)))
    stats.recomputed += _reference_logps(model, processor, choices, settings, device)

    pairs, records = [], []
    for video, choice in choices:
        if choice.dropped:
            stats.count_drop(choice.dropped)
        else:
            stats.pairs += 1
            pairs.append(_pair_row(video.row, choice, round_index))
        records.append(_progress_record(video, choice))
    records += [{"id": v.row.id, "status": "bad", "reason": v.error} for v in videos if v.error is not None]
    if pairs:
        append_rows(out, pairs)
    append_progress(out, records)


def _reference_logps(model, processor, choices: list[tuple[_Video, PairChoice]], settings: RolloutSettings,
                     device) -> int:
    """Set each pair member's ``ref_logp``: its sampled log-prob where the sampled ids are the ids the DPO side
    will score, else a teacher-forced one (see the module docstring); return how many were recomputed."""
    todo = []
    for video, choice in choices:
        for cand in (choice.chosen, choice.rejected):
            if cand is None:
                continue
            if cand.finished and cand.token_ids == response_ids(processor, cand.caption):
                cand.ref_logp = cand.logp
            else:
                todo.append((video, cand))
    for chunk in batches(todo, settings.forward_batch_size):
        logps = teacher_forced_logps(model, processor, [(video.clip, video.row.prompt, cand.caption)
                                                        for video, cand in chunk], device)
        for (_, cand), logp in zip(chunk, logps.tolist()):
            cand.ref_logp = logp
    return len(todo)


def teacher_forced_logps(model, processor, items: Sequence[tuple], device) -> torch.Tensor:
    """(n,) summed response log-probs of (clip, prompt, caption) items in one right-padded forward: the DPO
    side's computation (``processor.encode`` + ``collate`` + ``sequence_logps``), read through the response-only
    LM head (no (b, s, v) logits)."""
    batch = processor.collate([processor.encode(clip, prompt, caption) for clip, prompt, caption in items])
    batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    labels = batch.pop("labels")
    index, targets = response_positions(labels)
    logps = model(**batch, logp_index=index, logp_targets=targets, return_logits=False).token_logps
    return scatter_response_logps(logps, index, labels)[0].sum(-1).float().cpu()


def _pair_row(row, choice: PairChoice, round_index: int | None) -> PreferenceRow:
    return PreferenceRow(id=row.id, video=row.video, audio=row.audio, use_audio=row.use_audio, prompt=row.prompt,
                         chosen=choice.chosen.caption, rejected=choice.rejected.caption, gt=row.caption,
                         ref_chosen_logp=choice.chosen.ref_logp, ref_rejected_logp=choice.rejected.ref_logp,
                         round=round_index, events=row.events,
                         extra={"chosen_eer": choice.chosen.eer, "rejected_eer": choice.rejected.eer})


def _progress_record(video: _Video, choice: PairChoice) -> dict:
    return {"id": video.row.id, "status": choice.dropped or "pair",
            "samples": [{"caption": c.caption, "eer": c.eer, "logp": c.logp, "ref_logp": c.ref_logp,
                         "tokens": len(c.token_ids), "finished": c.finished, "usable": c.usable}
                        for c in video.candidates]}
