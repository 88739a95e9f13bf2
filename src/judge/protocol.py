"""The authors' judging protocol over any chat backend: full prompt, retries, counts-only fallback, failure policy.

For one caption and its ground-truth events (METHOD.md "Caption metric"):

1. Repetition is counted on the raw caption; the judge reads the de-looped caption (``metric.deloop``), as the
   synth judge does, so a degenerate loop costs its repetition rate but not a flood of hallucinations.
2. Ask the full prompt (counts + event lists, temperature 0). An answer that does not parse or does not hold
   together (``answers.parse_judgement``) is asked again, up to ``parse_retries`` times.
3. Still nothing: ask the counts-only fallback prompt, with the same retries.
4. Still nothing: the caption is FAILED. ``on_failure="miss"`` counts every ground-truth event as missed and
   nothing as hallucinated (the caption earns no credit, and the failure is counted and reported);
   ``on_failure="raise"`` stops the run.

Each caption is counted exactly once whatever happened on the way: retried HTTP requests and re-asked prompts
only change ``attempts``. Every answer goes through the AnswerCache keyed by pass, prompt kind and attempt, so a
re-run replays the same sequence of answers without sending a request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from src.judge.answers import AnswerError, Judgement, parse_counts, parse_judgement
from src.judge.base import FAILED, FALLBACK, OK, Item, Judge, JudgeError, ScoreDetail
from src.judge.cache import AnswerCache
from src.judge.chat import CachedChat, ChatBackend
from src.judge.metric import EventCounts, deloop, repetition_counts
from src.judge.prompts import PROMPT_VERSION, fallback_messages, judge_messages

logger = logging.getLogger(__name__)

ON_FAILURE = ("miss", "raise")


@dataclass
class ProtocolSettings:
    """parse_retries: re-asks after an unusable answer, for the full prompt and again for the fallback.
    retry_temperature: temperature of those re-asks (0, the authors' setting, re-asks the same question; a
    deterministic local model then repeats itself, so > 0 can help it). on_failure: "miss" or "raise" (see the
    module docstring). concurrency: captions judged at once (bounded; 1 = sequential)."""

    parse_retries: int = 2
    retry_temperature: float = 0.0
    on_failure: str = "miss"
    concurrency: int = 1

    def __post_init__(self):
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {self.on_failure!r}")
        if self.parse_retries < 0 or self.concurrency < 1:
            raise ValueError(f"parse_retries must be >= 0 and concurrency >= 1, got {self.parse_retries}, "
                             f"{self.concurrency}")


class PromptJudge(Judge):
    """A judge that asks a chat backend. ``cache``: an AnswerCache, a path for one (created if missing), or None
    for an in-memory cache."""

    def __init__(self, name: str, backend: ChatBackend, *, cache: AnswerCache | str | os.PathLike | None = None,
                 settings: ProtocolSettings | None = None):
        self.name = name
        self.backend = backend
        self.settings = settings or ProtocolSettings()
        self._owns_cache = not isinstance(cache, AnswerCache)
        self.cache = cache if isinstance(cache, AnswerCache) else AnswerCache(cache)
        self.chat = CachedChat(backend, self.cache)

    def score_detail(self, caption: str, events: Sequence[str], *, pass_index: int = 0) -> ScoreDetail:
        events = list(events)
        if not events:
            raise ValueError("a caption cannot be judged without ground-truth events")
        n_sentences, repeated = repetition_counts(caption)
        text = deloop(caption)
        attempts, problems = 0, []
        for kind, messages, parse, status in (("full", judge_messages(text, events), parse_judgement, OK),
                                              ("counts", fallback_messages(text, events), parse_counts, FALLBACK)):
            for attempt in range(1 + self.settings.parse_retries):
                temperature = 0.0 if attempt == 0 else self.settings.retry_temperature
                answer = self.chat.ask(messages, temperature=temperature,
                                       variant=f"pass={pass_index} prompt={kind} attempt={attempt}")
                attempts += 1
                try:
                    judgement = parse(answer, len(events))
                except AnswerError as err:
                    problems.append(f"{kind} prompt, attempt {attempt + 1}: {err}")
                    continue
                return _detail(judgement, len(events), n_sentences, repeated, status, attempts, problems)
        if self.settings.on_failure == "raise":
            raise JudgeError(f"{self.name} judge gave no usable answer after {attempts} tries: "
                             + "; ".join(problems))
        logger.warning("%s judge gave no usable answer after %d tries (%s); all %d events counted as missed",
                       self.name, attempts, problems[-1], len(events))
        failed = Judgement(correct=0, missed=len(events), incorrect=0, hallucination=0, missed_events=events)
        return _detail(failed, len(events), n_sentences, repeated, FAILED, attempts, problems)

    def judge_batch(self, items: Sequence[Item], *, pass_index: int = 0, progress: bool = False) -> list[ScoreDetail]:
        """Judge ``items`` with at most ``concurrency`` captions in flight; results keep the input order. A
        JudgeError (or any exception) cancels what has not started and is raised; finished answers stay cached."""
        bar = tqdm(total=len(items), desc=f"{self.name} judge, pass {pass_index + 1}", disable=not progress,
                   leave=False)
        results: list[ScoreDetail | None] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self.score_detail, caption, events, pass_index=pass_index): i
                       for i, (caption, events) in enumerate(items)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        bar.close()
                        raise future.exception()
                    results[futures[future]] = future.result()
                    bar.update(1)
        bar.close()
        return results

    @property
    def label(self) -> str:
        return f"{self.name}:{self.backend.label}"

    def describe(self) -> dict:
        return {"name": self.name, **self.backend.describe(), "prompt_version": PROMPT_VERSION,
                **asdict(self.settings)}

    def stats(self) -> dict:
        return {"requests": self.backend.calls, "cache_hits": self.cache.hits, "cache_misses": self.cache.misses}

    def close(self) -> None:
        if self._owns_cache:
            self.cache.close()
        self.backend.close()


def _detail(judgement: Judgement, n_gt: int, n_sentences: int, repeated: int, status: str, attempts: int,
            problems: list[str]) -> ScoreDetail:
    counts = EventCounts(n_gt=n_gt, correct=judgement.correct, missed=judgement.missed,
                         incorrect=judgement.incorrect, hallucination=judgement.hallucination,
                         n_sentences=n_sentences, repeated_sentences=repeated)
    return ScoreDetail(counts=counts, incorrect=judgement.incorrect_events, missed=judgement.missed_events,
                       hallucinated=judgement.hallucinated_events, status=status, attempts=attempts,
                       problems=problems)
