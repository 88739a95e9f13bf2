"""What is on screen and what is heard, from a SynthAV clip's timeline: per-shape colour and motion over a span
of frames, and the sound playing at each instant.

The timeline (``extra.timeline`` in the manifest) holds every visual event with the shape it happens to and the
colour the shape has at that moment, so the visible state at any time follows from it without the scene:

- a shape is on screen from the start unless its first event is ``appear``, and off after ``disappear``;
- its colour is its first event's colour until a ``change`` sets ``new_colour``;
- a ``move`` carries it in ``direction`` linearly over MOVE_S seconds from its onset.

``span_labels`` turns this into classification targets for a span of frames [t0, t1] (one temporal patch of the
vision tower): per shape, its colour (or absent) and its motion (still or a direction). A span in which the shape
appears, disappears or changes colour gets IGNORE for that target, since the two frames disagree.

``sound_classes`` gives, per time, which sound is audible: SILENT, or one of SOUND_CLASSES (a tone or a beep of
either pitch, or noise). Beeps are audible only during their BEEP_S pulses, so counting pulses counts beeps.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from src.data.synth.scene import sound_length
from src.data.synth.world import (
    BEEP_GAP_S, BEEP_S, COLOURS, DIRECTIONS, MOVE_S, PITCHES, SHAPES, SOUND_KINDS, Event,
)

IGNORE = -100
ABSENT = 0  # colour target: 0 = not on screen, 1 + COLOURS.index(c) otherwise
STILL = 0  # motion target: 0 = not moving, 1 + DIRECTIONS.index(d) otherwise
N_COLOUR_CLASSES = 1 + len(COLOURS)
N_MOTION_CLASSES = 1 + len(DIRECTIONS)
SILENT = 0  # sound target: 0 = nothing audible, 1 + SOUND_CLASSES.index((kind, pitch)) otherwise
SOUND_CLASSES = tuple((k, p) for k in ("tone", "beep") for p in PITCHES) + (("noise", None),)
N_SOUND_CLASSES = 1 + len(SOUND_CLASSES)


def _shape_events(timeline: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for ev in sorted(timeline, key=lambda e: e["t"]):
        if ev.get("shape") is not None:
            out.setdefault(ev["shape"], []).append(ev)
    return out


def colour_at(events: Sequence[Mapping], t: float) -> int:
    """Colour target of one shape (its time-ordered events) at time ``t``."""
    visible = events[0]["kind"] != "appear"
    colour = events[0]["colour"]
    for ev in events:
        if ev["t"] > t:
            break
        if ev["kind"] == "appear":
            visible = True
        elif ev["kind"] == "disappear":
            visible = False
        elif ev["kind"] == "change":
            colour = ev["new_colour"]
    return 1 + COLOURS.index(colour) if visible else ABSENT


def _moved(ev: Mapping, t: float) -> float:
    return min(1.0, max(0.0, (t - ev["t"]) / MOVE_S))


def motion_between(events: Sequence[Mapping], t0: float, t1: float) -> int:
    """Motion target of one shape between times t0 < t1: the direction of a move under way, else STILL."""
    for ev in events:
        if ev["kind"] == "move" and _moved(ev, t1) > _moved(ev, t0):
            return 1 + DIRECTIONS.index(ev["direction"])
    return STILL


def span_labels(timeline: Sequence[Mapping], t0: float, t1: float) -> list[tuple[int, int]]:
    """Per shape of SHAPES, (colour target, motion target) over the frames at t0 and t1 (see the module doc)."""
    per_shape = _shape_events(timeline)
    out = []
    for shape in SHAPES:
        events = per_shape.get(shape)
        if not events:
            out.append((ABSENT, IGNORE))
            continue
        c0, c1 = colour_at(events, t0), colour_at(events, t1)
        colour = c0 if c0 == c1 else IGNORE
        motion = motion_between(events, t0, t1) if c0 != ABSENT and c1 != ABSENT else IGNORE
        out.append((colour, motion))
    return out


def timed_sounds(timeline: Sequence[Mapping]) -> list[tuple[float, Event]]:
    """Every sound of the timeline, standalone or tied to a visual event, with its onset."""
    out = []
    for ev in timeline:
        if ev["kind"] in SOUND_KINDS:
            out.append((ev["t"], Event.from_dict(ev)))
        elif ev.get("sound") is not None:
            out.append((ev["t"], Event.from_dict(ev["sound"])))
    return sorted(out, key=lambda x: x[0])


def _audible(sound: Event, dt: float) -> bool:
    """Is ``sound`` audible ``dt`` seconds after its onset?"""
    if not 0.0 <= dt < sound_length(sound):
        return False
    return sound.kind != "beep" or dt % (BEEP_S + BEEP_GAP_S) < BEEP_S


def sound_classes(timeline: Sequence[Mapping], times: Sequence[float]) -> list[int]:
    """Sound target at each of ``times`` (seconds on the clip's clock)."""
    sounds = [(t, s, 1 + SOUND_CLASSES.index((s.kind, s.pitch if s.kind != "noise" else None)))
              for t, s in timed_sounds(timeline)]
    out = []
    for time in times:
        label = SILENT
        for onset, sound, cls in sounds:
            if _audible(sound, time - onset):
                label = cls
                break
        out.append(label)
    return out
