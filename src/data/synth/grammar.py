"""The SynthAV caption grammar: structured event <-> sentence, both ways.

Templates (``{colour}`` in COLOURS, ``{shape}`` in SHAPES, ``{direction}`` in DIRECTIONS, ``{pitch}`` low/high,
``{count}`` once/twice/three times); the noun phrase is always the full "the {colour} {shape}", never a pronoun,
with the object's colour at the moment of the event:

    appear      The {colour} {shape} appears.
    move        The {colour} {shape} moves {direction}.
    change      The {colour} {shape} turns {new_colour}.
    disappear   The {colour} {shape} disappears.
    tone        A {pitch} tone plays.
    beep        A {pitch} beep sounds {count}.
    noise       A burst of noise plays.
    tied        <visual sentence without its period> as <sound sentence, lower-cased, without its period>.
                e.g. "The red square turns blue as a high beep sounds once."

A caption is the event sentences in temporal order joined by single spaces (no opener).
``parse`` accepts any case, extra whitespace, trailing ``.``/``!``/``?``, a leading "Then,"/"And then" and a comma
before "as"; anything else outside the templates parses to None.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from src.data.synth.world import COLOURS, DIRECTIONS, PITCHES, SHAPES, Event

COUNT_WORDS = {1: "once", 2: "twice", 3: "three times"}
_WORD_COUNTS = {word: n for n, word in COUNT_WORDS.items()}


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_COLOUR = _alternation(COLOURS)
_VISUAL_RE = re.compile(
    rf"the (?P<colour>{_COLOUR}) (?P<shape>{_alternation(SHAPES)}) "
    rf"(?:(?P<appear>appears)|(?P<disappear>disappears)"
    rf"|moves (?P<direction>{_alternation(DIRECTIONS)})|turns (?P<new_colour>{_COLOUR}))"
)
_PITCH = _alternation(PITCHES)
_TONE_RE = re.compile(rf"a (?P<pitch>{_PITCH}) tone plays")
_BEEP_RE = re.compile(rf"a (?P<pitch>{_PITCH}) beep sounds (?P<count>{_alternation(_WORD_COUNTS)})")
_NOISE_RE = re.compile(r"a burst of noise plays")
_TIED_RE = re.compile(r"(?P<visual>.+?),? as (?P<sound>.+)")
_LEAD_RE = re.compile(r"^(?:and )?then\b,? ?")


def _clause(event: Event) -> str:
    """Lower-case clause for one event without its tied sound, e.g. "the red circle moves left"."""
    kind = event.kind
    if kind in ("appear", "disappear"):
        return f"the {event.colour} {event.shape} {kind}s"
    if kind == "move":
        return f"the {event.colour} {event.shape} moves {event.direction}"
    if kind == "change":
        return f"the {event.colour} {event.shape} turns {event.new_colour}"
    if kind == "tone":
        return f"a {event.pitch} tone plays"
    if kind == "beep":
        return f"a {event.pitch} beep sounds {COUNT_WORDS[event.count]}"
    if kind == "noise":
        return "a burst of noise plays"
    raise ValueError(f"unknown event kind {kind!r}")


def sentence(event: Event) -> str:
    """The one sentence for ``event``: capitalised, ending with a period."""
    text = _clause(event)
    if event.sound is not None:
        text = f"{text} as {_clause(event.sound)}"
    return text[0].upper() + text[1:] + "."


def caption(events: Iterable[Event]) -> str:
    """The templated caption: event sentences (already in temporal order) joined by spaces."""
    return " ".join(sentence(e) for e in events)


def normalise(text: str) -> str:
    """Lower-case, single spaces, no trailing sentence punctuation, no leading "Then,"."""
    text = " ".join(text.lower().split()).rstrip(".!? ")
    return _LEAD_RE.sub("", text, count=1)


def _parse_visual(text: str) -> Event | None:
    m = _VISUAL_RE.fullmatch(text)
    if m is None:
        return None
    g = m.groupdict()
    kind = "appear" if g["appear"] else "disappear" if g["disappear"] else "move" if g["direction"] else "change"
    return Event(kind=kind, shape=g["shape"], colour=g["colour"], direction=g["direction"],
                 new_colour=g["new_colour"])


def _parse_sound(text: str) -> Event | None:
    if m := _TONE_RE.fullmatch(text):
        return Event(kind="tone", pitch=m["pitch"])
    if m := _BEEP_RE.fullmatch(text):
        return Event(kind="beep", pitch=m["pitch"], count=_WORD_COUNTS[m["count"]])
    if _NOISE_RE.fullmatch(text):
        return Event(kind="noise")
    return None


def parse(text: str) -> Event | None:
    """The event one sentence states, or None when the sentence is outside the grammar."""
    text = normalise(text)
    event = _parse_visual(text) or _parse_sound(text)
    if event is not None:
        return event
    m = _TIED_RE.fullmatch(text)
    if m is None:
        return None
    visual, sound = _parse_visual(m["visual"]), _parse_sound(m["sound"])
    if visual is None or sound is None:
        return None
    return dataclasses.replace(visual, sound=sound)
