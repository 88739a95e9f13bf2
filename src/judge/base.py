"""The judge interface: a caption and its ground-truth events in, event counts and the judge's event lists out.

Every judge (the exact SynthAV parser, an OpenAI-compatible endpoint, a local Hugging Face model) is a ``Judge``.
Callers that only need numbers (the MrDPO rollout ranking K samples) use ``score_batch``; callers that report
(``src.evaluate``) use ``judge_batch``, whose ``ScoreDetail`` also carries the event lists, whether the answer came
from the full prompt or the counts-only fallback, and how many judge answers it took.

``pass_index`` numbers independent judging passes (the authors judge 7 times and report the median-EER pass):
LLM judges key their cache by it, so pass 2 is a new question to the judge rather than a replay of pass 1.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

from src.judge.metric import EventCounts

# ScoreDetail.status values
OK = "ok"              # the judge's full answer (counts and event lists)
FALLBACK = "fallback"  # the counts-only fallback prompt answered; no event lists
FAILED = "failed"      # no valid answer at all; counts follow the judge's on_failure policy
STATUSES = (OK, FALLBACK, FAILED)

Item = tuple[str, Sequence[str]]  # (caption, ground-truth event sentences)


class JudgeError(RuntimeError):
    """The judge cannot give an answer for reasons outside the caption (endpoint down, key refused, bad model
    directory), or a caption failed under on_failure="raise". The run stops; cached answers are kept."""


@dataclass
class ScoreDetail:
    """Sentences behind the counts: ``correct`` and ``incorrect`` hold (gt, caption) pairs.

    ``status`` is one of STATUSES; ``attempts`` counts the judge answers read for this caption (0 for the exact
    synth judge, 1 for a first-time valid LLM answer, more after parse failures and fallbacks); ``problems`` says
    what was wrong with each answer that could not be used.
    """

    counts: EventCounts
    correct: list[tuple[str, str]] = field(default_factory=list)
    incorrect: list[tuple[str, str]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    hallucinated: list[str] = field(default_factory=list)
    status: str = OK
    attempts: int = 0
    problems: list[str] = field(default_factory=list)


class Judge(abc.ABC):
    """Scores captions against ground-truth events. Subclasses implement ``score_detail``; batch methods keep the
    order of their input."""

    name: str = "judge"

    @property
    def label(self) -> str:
        """What results.json calls this judge: the name, plus the model for LLM judges ("llm:gpt-4.1")."""
        return self.name

    @abc.abstractmethod
    def score_detail(self, caption: str, events: Sequence[str], *, pass_index: int = 0) -> ScoreDetail:
        """Judge one caption against its ground-truth events."""

    def score(self, caption: str, events: Sequence[str], *, pass_index: int = 0) -> EventCounts:
        return self.score_detail(caption, events, pass_index=pass_index).counts

    def judge_batch(self, items: Sequence[Item], *, pass_index: int = 0, progress: bool = False) -> list[ScoreDetail]:
        """One ScoreDetail per (caption, events) item, in order. Sequential here; LLM judges run in parallel."""
        return [self.score_detail(caption, events, pass_index=pass_index) for caption, events in items]

    def score_batch(self, items: Sequence[Item], *, pass_index: int = 0) -> list[EventCounts]:
        """One EventCounts per (caption, events) item, in order: what a rollout ranks its samples by."""
        return [detail.counts for detail in self.judge_batch(items, pass_index=pass_index)]

    def describe(self) -> dict:
        """The judge's identity and settings for reports (never a secret)."""
        return {"name": self.name}

    def stats(self) -> dict:
        """Counters since construction (requests sent, cache hits); empty for judges without any."""
        return {}

    def close(self) -> None:
        """Release files, connections or models the judge holds."""

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
