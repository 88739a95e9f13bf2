"""Judge answer parsing: what is accepted, and the reason given for everything that is not."""

from __future__ import annotations

import json
import re

import pytest

from src.judge.answers import AnswerError, parse_counts, parse_event_list, parse_judgement


def answer(**fields) -> str:
    base = {"missed": 1, "incorrect": 1, "hallucination": 1, "missed_events": ["A dog barks."],
            "incorrect_events": [{"event": "A man runs.", "caption": "A man walks"}], "hallucinated_events": ["Snow"]}
    return json.dumps({**base, **fields})


def test_full_answer_in_prose_and_a_code_fence():
    """3 events, 1 missed + 1 incorrect: correct = 3 - 1 - 1 = 1."""
    text = "Sure. {not json} {} Here it is:\n```json\n" + answer() + "\n```\nHope that helps {}."
    j = parse_judgement(text, 3)
    assert (j.correct, j.missed, j.incorrect, j.hallucination) == (1, 1, 1, 1)
    assert j.incorrect_events == [("A man runs.", "A man walks")] and j.hallucinated_events == ["Snow"]


def test_integral_floats_and_plain_string_incorrect_items_are_accepted():
    j = parse_judgement(answer(missed=1.0, incorrect_events=["A man runs."]), 2)
    assert (j.correct, j.missed, j.incorrect_events) == (0, 1, [("A man runs.", "")])


@pytest.mark.parametrize("text, n_events, reason", [
    ("The caption is good.", 3, "no JSON object with 'missed'"),
    ('{"missed": 1, "incorrect": 0,, }', 3, "no JSON object with 'missed'"),
    (answer(missed=-1, missed_events=[]), 3, "'missed' must be a non-negative integer"),
    (answer(missed=True), 3, "'missed' must be a non-negative integer"),
    (answer(missed=1.5), 3, "'missed' must be a non-negative integer"),
    (answer(missed="1"), 3, "'missed' must be a non-negative integer"),
    ('{"missed": NaN, "incorrect": 0, "hallucination": 0}', 3, "'missed' must be a non-negative integer"),
    (json.dumps({"missed": 0, "incorrect": 0}), 3, "missing 'hallucination'"),
    (answer(), 1, "missed 1 + incorrect 1 exceeds the 1 events"),
    (answer(hallucination=2), 3, "'hallucination' is 2 but its list holds 1"),
    (answer(missed_events="A dog barks."), 3, "'missed_events' must be a list of strings"),
    (answer(incorrect_events=[{"caption": "x"}]), 3, "'incorrect_events' items must be"),
])
def test_unusable_full_answers_say_why(text, n_events, reason):
    with pytest.raises(AnswerError, match=re.escape(reason)):
        parse_judgement(text, n_events)


def test_counts_only_fallback_must_add_up_to_the_events():
    """4 events: correct 1 + missed 2 + incorrect 1 = 4 is accepted; 1 + 2 + 2 = 5 is not."""
    j = parse_counts('{"correct": 1, "missed": 2, "incorrect": 1, "hallucination": 3}', 4)
    assert (j.correct, j.missed, j.incorrect, j.hallucination, j.missed_events) == (1, 2, 1, 3, [])
    with pytest.raises(AnswerError, match="correct 1 \\+ missed 2 \\+ incorrect 2 != 4 events"):
        parse_counts('{"correct": 1, "missed": 2, "incorrect": 2, "hallucination": 0}', 4)


def test_event_lists():
    assert parse_event_list('Events:\n["A dog barks.", " A man talks. "]') == ["A dog barks.", "A man talks."]
    assert parse_event_list('{"events": ["A bell rings."]}') == ["A bell rings."]
    for bad in ("[]", '["ok", 3]', '["ok", "  "]', "no list here", '{"events": "x"}'):
        with pytest.raises(AnswerError):
            parse_event_list(bad)
