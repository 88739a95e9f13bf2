"""Parse and validate judge answers; anything that does not hold together is an ``AnswerError`` with the reason.

A judge model answers in free text that should contain one JSON value. ``find_json`` takes the first JSON object
(or list) in it, tolerating a Markdown code fence or a sentence around it. Validation is strict where leniency would
change the metric: counts are non-negative integers, missed + incorrect cannot exceed the number of events, and
the lists must be as long as the counts they explain. An answer that fails is retried, never repaired.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()
MAX_JSON_STARTS = 50  # candidate '{' / '[' positions tried in one answer; bounds the scan of a garbage answer


class AnswerError(ValueError):
    """A judge answer that cannot be used; the message says why (without the answer, which may be long)."""


@dataclass
class Judgement:
    """One parsed judge answer. ``incorrect_events`` holds (ground-truth event, what the caption said) pairs;
    ``correct`` is derived: n_gt - missed - incorrect (the judge names no correct events)."""

    correct: int
    missed: int
    incorrect: int
    hallucination: int
    missed_events: list[str] = field(default_factory=list)
    incorrect_events: list[tuple[str, str]] = field(default_factory=list)
    hallucinated_events: list[str] = field(default_factory=list)


def find_json(text: str, kind: type, key: str | None = None) -> dict | list:
    """The first JSON value of type ``kind`` (dict or list) in ``text``; with ``key``, the first object holding
    that key (so a stray "{}" in the prose before the answer is passed over)."""
    opener = "{" if kind is dict else "["
    start, tried = text.find(opener), 0
    while start != -1 and tried < MAX_JSON_STARTS:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, kind) and (key is None or key in value):
            return value
        start, tried = text.find(opener, start + 1), tried + 1
    what = "list" if kind is list else f"object with {key!r}" if key else "object"
    raise AnswerError(f"no JSON {what} in the answer")


def _count(obj: dict, key: str) -> int:
    if key not in obj:
        raise AnswerError(f"missing {key!r}")
    value = obj[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < 0):
        raise AnswerError(f"{key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _strings(obj: dict, key: str) -> list[str]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AnswerError(f"{key!r} must be a list of strings")
    return value


def _incorrect_pairs(obj: dict) -> list[tuple[str, str]]:
    value = obj.get("incorrect_events", [])
    if not isinstance(value, list):
        raise AnswerError("'incorrect_events' must be a list")
    pairs = []
    for item in value:
        if isinstance(item, str):
            pairs.append((item, ""))
        elif isinstance(item, dict) and isinstance(item.get("event"), str):
            said = item.get("caption", "")
            pairs.append((item["event"], said if isinstance(said, str) else json.dumps(said)))
        else:
            raise AnswerError("'incorrect_events' items must be strings or {\"event\", \"caption\"} objects")
    return pairs


def _check_total(missed: int, incorrect: int, n_events: int) -> None:
    if missed + incorrect > n_events:
        raise AnswerError(f"missed {missed} + incorrect {incorrect} exceeds the {n_events} events")


def parse_judgement(text: str, n_events: int) -> Judgement:
    """The full answer: counts plus the three event lists, each list as long as its count."""
    obj = find_json(text, dict, "missed")
    missed, incorrect, hallucination = (_count(obj, k) for k in ("missed", "incorrect", "hallucination"))
    _check_total(missed, incorrect, n_events)
    missed_events = _strings(obj, "missed_events")
    incorrect_events = _incorrect_pairs(obj)
    hallucinated_events = _strings(obj, "hallucinated_events")
    for name, count, items in (("missed", missed, missed_events), ("incorrect", incorrect, incorrect_events),
                               ("hallucination", hallucination, hallucinated_events)):
        if len(items) != count:
            raise AnswerError(f"{name!r} is {count} but its list holds {len(items)}")
    return Judgement(n_events - missed - incorrect, missed, incorrect, hallucination, missed_events,
                     incorrect_events, hallucinated_events)


def parse_counts(text: str, n_events: int) -> Judgement:
    """The fallback answer: counts only, with correct + missed + incorrect == n_events."""
    obj = find_json(text, dict, "correct")
    correct, missed, incorrect, hallucination = (
        _count(obj, k) for k in ("correct", "missed", "incorrect", "hallucination"))
    if correct + missed + incorrect != n_events:
        raise AnswerError(f"correct {correct} + missed {missed} + incorrect {incorrect} != {n_events} events")
    return Judgement(correct, missed, incorrect, hallucination)


def parse_event_list(text: str) -> list[str]:
    """An extraction answer: an object {"events": [...]}, else the first JSON list, of non-empty strings."""
    try:
        obj = find_json(text, dict, "events")
    except AnswerError:
        value = find_json(text, list)
    else:
        value = obj["events"]
        if not isinstance(value, list):
            raise AnswerError("'events' must be a list")
    events = [v.strip() for v in value if isinstance(v, str) and v.strip()]
    if len(events) != len(value) or not events:
        raise AnswerError("the events must be a non-empty list of non-empty strings")
    return events
