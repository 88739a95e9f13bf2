"""Atomic events for data without them: an LLM (endpoint or local) lists a ground-truth caption's base events.

METHOD.md: the authors extract each test video's events from its ground-truth caption with an LLM ("list the base
events, audio included, as a list of short sentences"). ``src.evaluate --extract-events`` does this for the rows of
a manifest that carry no ``events`` and writes the completed manifest next to its results, so the extraction is
paid once (and its answers are cached like the judge's). A caption whose answer never parses is an error naming
the row's file and line: evaluating against events nobody checked would be worse than stopping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from src.judge.answers import AnswerError, parse_event_list
from src.judge.protocol import PromptJudge
from src.judge.prompts import extract_messages


class ExtractionError(ValueError):
    """Rows whose events could not be extracted; the message lists each as file:line: reason."""


def extract_events(judge: PromptJudge, caption: str) -> list[str]:
    """The base events of ``caption`` as short sentences, asking up to 1 + parse_retries times."""
    problems = []
    for attempt in range(1 + judge.settings.parse_retries):
        temperature = 0.0 if attempt == 0 else judge.settings.retry_temperature
        answer = judge.chat.ask(extract_messages(caption), temperature=temperature,
                                variant=f"extract attempt={attempt}")
        try:
            return parse_event_list(answer)
        except AnswerError as err:
            problems.append(f"attempt {attempt + 1}: {err}")
    raise AnswerError(f"no usable event list after {len(problems)} tries ({'; '.join(problems)})")


def add_events(rows: Sequence, judge: PromptJudge, *, progress: bool = False) -> list:
    """``rows`` with ``events`` filled in where missing (rows that have events are returned as they are)."""
    todo = [i for i, row in enumerate(rows) if not row.events]
    out, errors = list(rows), []

    def one(i: int):
        try:
            return i, extract_events(judge, rows[i].caption), None
        except AnswerError as err:
            return i, None, f"{rows[i].source}: {err}"

    with ThreadPoolExecutor(max_workers=judge.settings.concurrency, thread_name_prefix="extract") as pool:
        for i, events, error in tqdm(pool.map(one, todo), total=len(todo), desc="extract events",
                                     disable=not progress, leave=False):
            if error:
                errors.append(error)
            else:
                out[i] = dataclasses.replace(rows[i], events=tuple(events))
    if errors:
        raise ExtractionError(f"{len(errors)} of {len(todo)} captions gave no event list:\n" + "\n".join(errors))
    return out
