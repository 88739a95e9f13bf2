"""The judge prompts (METHOD.md "Caption metric"): full judgement, counts-only fallback, event extraction.

The full prompt gives the judge the ground-truth atomic events and the caption and asks for the counts of Missed,
Incorrect and Hallucination events with the event lists behind them, as one JSON object. When that answer cannot
be parsed even after retries, the fallback prompt asks for the counts only, with Missed + Correct + Incorrect
equal to the number of events. Extraction asks for a ground-truth caption's base events, audio included, as a list
of short sentences.

The prompts are ours, written from the paper's description of the authors' evaluator (its own text is not
public). Changing any text here changes the cache keys, so old answers are never reused for a new prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_VERSION = "2026-11-1"

JUDGE_SYSTEM = (
    "You are a meticulous evaluator of video captions. You compare a caption of a video with the list of events "
    "that really happen in the video (what is seen and what is heard) and count the caption's errors. You answer "
    "with JSON only."
)

_JUDGE_TASK = """\
Compare the caption with the events and classify:
- Each event of the list is exactly one of:
  correct: the caption describes it faithfully;
  missed: the caption does not mention it at all;
  incorrect: the caption mentions it but gets it wrong (wrong object, colour, action, direction, sound, count \
or order).
- hallucination: anything the caption describes that is not among the events and cannot reasonably be inferred \
from them. A statement the caption repeats counts once.

Answer with one JSON object and nothing else, in this form:
{"missed": <number>, "incorrect": <number>, "hallucination": <number>,
 "missed_events": [<events of the list that are missed>],
 "incorrect_events": [{"event": <event of the list>, "caption": <what the caption says instead>}],
 "hallucinated_events": [<statements of the caption that are hallucinations>]}
Each number must equal the length of its list."""

FALLBACK_SYSTEM = (
    "You are a meticulous evaluator of video captions. You count a caption's errors against the list of events "
    "that really happen in the video. You answer with JSON only."
)

_FALLBACK_TASK = """\
Count, comparing the caption with the events:
- correct: events of the list the caption describes faithfully;
- missed: events of the list the caption does not mention;
- incorrect: events of the list the caption mentions but gets wrong;
- hallucination: things the caption describes that are not among the events.
correct + missed + incorrect must equal {n_events}, the number of events in the list.

Answer with one JSON object and nothing else:
{{"correct": <number>, "missed": <number>, "incorrect": <number>, "hallucination": <number>}}"""

EXTRACT_SYSTEM = (
    "You break a detailed description of a video into its base events. You answer with JSON only."
)

_EXTRACT_TASK = """\
List the base events of this video description, audio events included (speech, music, sounds), in the order \
they happen, as short sentences, one event per sentence. Do not add anything the description does not say.

Answer with one JSON list of strings and nothing else, for example:
["A man walks into the kitchen.", "A dog barks twice.", "The man opens the fridge."]"""


def _events_block(events: Sequence[str]) -> str:
    return "\n".join(f"{i}. {event}" for i, event in enumerate(events, start=1))


def _caption_block(caption: str) -> str:
    return f'"""\n{caption}\n"""'


def judge_messages(caption: str, events: Sequence[str]) -> list[dict]:
    """The full judgement request: counts and event lists."""
    user = (f"Events of the video ({len(events)}), one per line:\n{_events_block(events)}\n\n"
            f"Caption to evaluate:\n{_caption_block(caption)}\n\n{_JUDGE_TASK}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def fallback_messages(caption: str, events: Sequence[str]) -> list[dict]:
    """The counts-only request used after repeated parse failures of the full one."""
    user = (f"Events of the video ({len(events)}), one per line:\n{_events_block(events)}\n\n"
            f"Caption to evaluate:\n{_caption_block(caption)}\n\n{_FALLBACK_TASK.format(n_events=len(events))}")
    return [{"role": "system", "content": FALLBACK_SYSTEM}, {"role": "user", "content": user}]


def extract_messages(caption: str) -> list[dict]:
    """Ground-truth caption -> its atomic events."""
    user = f"Video description:\n{_caption_block(caption)}\n\n{_EXTRACT_TASK}"
    return [{"role": "system", "content": EXTRACT_SYSTEM}, {"role": "user", "content": user}]
