"""From K judged samples of one video to one (chosen, rejected) pair, or the reason there is none.

Samples are compared by their error count (missed + incorrect + hallucination) over the same ground-truth events,
so EER = errors / n_gt and comparisons between samples of one video are exact integer comparisons. Chosen = the
lowest error count, rejected = the highest; among equals the earliest sample index wins (deterministic).
A pair is kept when its EER margin is > 0 and >= ``min_margin``; otherwise it is dropped as a tie or as under
the margin. A sample that cannot be a pair member (empty caption, or text the chat encoder refuses because it
spells a special token) is left out before choosing; fewer than two usable samples give no pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from src.judge.metric import EventCounts
from src.models.tokenizer import chat_response_ids

TIE, UNDER_MARGIN, TOO_FEW = "tie", "under_margin", "too_few_usable"


@dataclass
class Candidate:
    """One sampled caption: ``token_ids`` as sampled (the end token included when ``finished``), ``logp`` their
    summed log-prob under the sampling model at T = 1, ``counts`` the judge's verdict (None: not judged),
    ``ref_logp`` the reference log-prob of the caption as the DPO side encodes it (set for pair members)."""

    index: int
    caption: str
    token_ids: list[int]
    logp: float
    finished: bool
    counts: EventCounts | None = None
    usable: bool = True
    ref_logp: float | None = None

    @property
    def errors(self) -> int:
        return self.counts.missed + self.counts.incorrect + self.counts.hallucination

    @property
    def eer(self) -> float:
        return self.errors / self.counts.n_gt


@dataclass
class PairChoice:
    """The pair of one video, or ``dropped`` (TIE, UNDER_MARGIN or TOO_FEW) with no members."""

    chosen: Candidate | None
    rejected: Candidate | None
    dropped: str | None = None

    @property
    def margin(self) -> float:
        return self.rejected.eer - self.chosen.eer


def choose_pair(candidates: Sequence[Candidate], min_margin: float = 0.0) -> PairChoice:
    """Lowest-error vs highest-error usable candidate; see the module docstring for ties and margins."""
    usable = [c for c in candidates if c.usable]
    if len(usable) < 2:
        return PairChoice(None, None, TOO_FEW)
    chosen = min(usable, key=lambda c: (c.errors, c.index))
    rejected = max(usable, key=lambda c: (c.errors, -c.index))
    # identical text (whitespace aside) carries no preference even if a non-deterministic judge split it
    if chosen.errors == rejected.errors or chosen.caption.strip() == rejected.caption.strip():
        return PairChoice(None, None, TIE)
    choice = PairChoice(chosen, rejected)
    if choice.margin < min_margin:
        return PairChoice(None, None, UNDER_MARGIN)
    return choice


def response_ids(processor, caption: str) -> list[int] | None:
    """The token ids the DPO side trains on for ``caption`` as a response (its end token included), exactly as
    ``processor.encode(clip, prompt, caption)`` labels them; None when the chat encoder refuses the text.

    The response is encoded on its own, after "assistant\\n" (``chat_response_ids``): the prompt does not matter.
    """
    try:
        return chat_response_ids(processor.tokenizer, caption)
    except ValueError:  # the text spells a special token: the DPO collate would refuse it too
        return None


def sample_seed(seed: int, row_id: str, sample: int) -> int:
    """A 63-bit seed for sample ``sample`` of row ``row_id``: stable across processes and Python versions
    (hash() is salted per process), so a resumed rollout draws what an uninterrupted one drew."""
    digest = hashlib.sha256(f"{seed}\0{row_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
