"""A SynthAV scene: objects with their visual events, sounds, and the sampler that draws one from a seed.

Coordinates are pixels, (x, y) with y pointing down; times are seconds from the clip start.
A scene holds structure only; ``render.py`` turns it into frames and samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from src.data.synth import grammar
from src.data.synth.world import (
    BEEP_COUNTS, BEEP_GAP_S, BEEP_S, COLOURS, DIRECTIONS, FIRST_ONSET_S, MAX_EVENTS, MAX_EVENTS_PER_OBJECT,
    MAX_OBJECTS, MAX_SOUNDS, MIN_EVENTS, MIN_GAP_S, MOVE_S, NOISE_S, ONSET_GRID_S, PITCHES, SHAPES, SOUND_KINDS,
    TAIL_S, TONE_S, Event, TimedEvent,
)

P_TIED = 0.4  # chance that a sound is bound to a visual event rather than standing alone
SOUND_KIND_P = (0.35, 0.4, 0.25)  # tone, beep, noise
MAX_TRIES = 1000


def shape_radius(size: int) -> int:
    """Half-extent of every shape in pixels (6 at 56x56)."""
    return max(2, round(0.11 * size))


def move_distance(size: int) -> int:
    """How far one move carries an object, in pixels (12 at 56x56)."""
    return max(2, round(0.22 * size))


def direction_step(direction: str, size: int) -> tuple[int, int]:
    d = move_distance(size)
    return {"left": (-d, 0), "right": (d, 0), "up": (0, -d), "down": (0, d)}[direction]


def sound_length(sound: Event) -> float:
    """Seconds from a sound's onset to its end."""
    if sound.kind == "tone":
        return TONE_S
    if sound.kind == "beep":
        return sound.count * BEEP_S + (sound.count - 1) * BEEP_GAP_S
    return NOISE_S


@dataclass
class SceneObject:
    """One shape: its colour and centre at t=0 and its visual events (time order, possibly tied)."""

    shape: str
    colour: str
    start: tuple[int, int]
    events: list[TimedEvent]

    def track(self, times: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """State at ``times`` (T,) seconds: visible (T,) bool, centre x (T,) and y (T,) float px, colour index (T,).

        Appear/disappear/change take effect at their onset; a move goes linearly over MOVE_S seconds.
        """
        times = np.asarray(times, dtype=np.float64)
        visible = np.ones(times.shape, dtype=bool)
        cx = np.full(times.shape, float(self.start[0]))
        cy = np.full(times.shape, float(self.start[1]))
        colour = np.full(times.shape, COLOURS.index(self.colour))
        for timed in self.events:
            t, ev = timed.t, timed.event
            if ev.kind == "appear":
                visible &= times >= t
            elif ev.kind == "disappear":
                visible &= times < t
            elif ev.kind == "change":
                colour = np.where(times >= t, COLOURS.index(ev.new_colour), colour)
            elif ev.kind == "move":
                dx, dy = direction_step(ev.direction, size)
                frac = np.clip((times - t) / MOVE_S, 0.0, 1.0)
                cx, cy = cx + dx * frac, cy + dy * frac
        return visible, cx, cy, colour


@dataclass
class Scene:
    """One clip's content. ``events`` holds every atomic event (visual, tied and standalone sounds) in time order."""

    objects: list[SceneObject]
    events: list[TimedEvent]
    noise_seed: int
    duration: float = 4.0
    size: int = 56
    fps: int = 8
    sample_rate: int = 16000

    @property
    def n_frames(self) -> int:
        return round(self.duration * self.fps)

    @property
    def n_samples(self) -> int:
        return round(self.duration * self.sample_rate)

    @property
    def sounds(self) -> list[TimedEvent]:
        """Every sound (standalone or tied) with its onset, in time order."""
        out = []
        for timed in self.events:
            ev = timed.event
            if ev.kind in SOUND_KINDS:
                out.append(timed)
            elif ev.sound is not None:
                out.append(TimedEvent(timed.t, ev.sound))
        return out

    def sentences(self) -> list[str]:
        return [grammar.sentence(te.event) for te in self.events]

    def caption(self) -> str:
        return grammar.caption(te.event for te in self.events)

    def object(self, key: str | int) -> SceneObject:
        """An object by its shape name (unique within a scene) or its index."""
        if isinstance(key, int):
            return self.objects[key]
        for obj in self.objects:
            if obj.shape == key:
                return obj
        raise KeyError(f"no {key!r} in this scene (shapes: {[o.shape for o in self.objects]})")

    def object_centroid(self, key: str | int, t: float) -> tuple[float, float] | None:
        """Mean (x, y) pixel of the object's drawn mask at time ``t``, or None when it is not visible."""
        from src.data.synth.render import object_masks  # render imports scene; import late to avoid a cycle

        mask, _ = object_masks(self.object(key), np.array([t]), self.size)
        ys, xs = np.nonzero(mask[0])
        if len(xs) == 0:
            return None
        return float(xs.mean()), float(ys.mean())

    def sound_at(self, t: float) -> Event | None:
        """The sound audible at time ``t`` (beeps: anywhere in their group, gaps included), or None."""
        for timed in self.sounds:
            if timed.t <= t < timed.t + sound_length(timed.event):
                return timed.event
        return None


def sample_scene(rng: np.random.Generator | int, duration: float = 4.0, size: int = 56, fps: int = 8,
                 sample_rate: int = 16000) -> Scene:
    """Draw one scene. Rejection sampling keeps only scenes with 3-6 events, distinct sentences and objects
    that stay inside their region of the frame."""
    rng = np.random.default_rng(rng)
    slots = _onset_slots(duration)
    for _ in range(MAX_TRIES):
        scene = _try_sample(rng, slots, duration, size, fps, sample_rate)
        if scene is not None:
            return scene
    raise RuntimeError(f"no valid scene after {MAX_TRIES} tries (duration {duration}, size {size})")


def _onset_slots(duration: float) -> np.ndarray:
    """All allowed onset times (seconds); needs room for MIN_EVENTS onsets MIN_GAP_S apart."""
    last = duration - TAIL_S
    slots = np.arange(FIRST_ONSET_S, last + 1e-9, ONSET_GRID_S)
    if len(slots) == 0 or slots[-1] - slots[0] < (MIN_EVENTS - 1) * MIN_GAP_S - 1e-9:
        raise ValueError(f"duration {duration} s is too short for {MIN_EVENTS} events {MIN_GAP_S} s apart")
    return slots


def _sample_onsets(rng: np.random.Generator, slots: np.ndarray, n: int) -> list[float] | None:
    """``n`` sorted onsets from ``slots`` with consecutive gaps >= MIN_GAP_S (None if they cannot fit)."""
    step = round(MIN_GAP_S / ONSET_GRID_S)
    room = len(slots) - (n - 1) * (step - 1)
    if room < n:
        return None
    # Choosing n of the `room` compressed positions and re-inserting step-1 slots between neighbours
    # gives every valid arrangement with equal probability.
    picked = np.sort(rng.choice(room, size=n, replace=False)) + np.arange(n) * (step - 1)
    return [float(slots[i]) for i in picked]


def _sample_kinds(rng: np.random.Generator, k: int) -> list[str]:
    """Visual event kinds for one object: appear only first, disappear only last, nothing after disappear."""
    kinds = []
    for i in range(k):
        options = ["move", "change"] + (["appear"] if i == 0 else []) + (["disappear"] if i == k - 1 else [])
        kinds.append(str(rng.choice(options)))
    return kinds


def _sample_sound(rng: np.random.Generator) -> Event:
    kind = str(rng.choice(SOUND_KINDS, p=SOUND_KIND_P))
    if kind == "tone":
        return Event(kind="tone", pitch=str(rng.choice(PITCHES)))
    if kind == "beep":
        return Event(kind="beep", pitch=str(rng.choice(PITCHES)), count=int(rng.choice(BEEP_COUNTS)))
    return Event(kind="noise")


def _regions(rng: np.random.Generator, n_objects: int, size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per object, the ((x_lo, x_hi), (y_lo, y_hi)) box its centre must stay in. Two objects get the two halves
    of the frame (split along a random axis), so they never overlap."""
    r = shape_radius(size)
    full = (r + 1, size - 2 - r)
    if n_objects == 1:
        return [(full, full)]
    half = size // 2
    first, second = (r + 1, half - 2 - r), (half + 1 + r, size - 2 - r)
    if rng.integers(2) == 0:
        return [(first, full), (second, full)]
    return [(full, first), (full, second)]


def _place(rng: np.random.Generator, box, steps: list[tuple[int, int]]) -> tuple[int, int] | None:
    """A start centre such that the centre stays in ``box`` after every prefix of ``steps``; None if impossible."""
    start = []
    for axis in (0, 1):
        path = np.cumsum([0] + [s[axis] for s in steps])
        lo, hi = box[axis][0] - path.min(), box[axis][1] - path.max()
        if lo > hi:
            return None
        start.append(int(rng.integers(lo, hi + 1)))
    return start[0], start[1]


def _object_events(rng, shape: str, kinds: list[str], onsets: list[float]) -> tuple[str, list[TimedEvent]]:
    """Initial colour and the object's timed visual events, each naming the colour it has at that moment."""
    colour0 = colour = str(rng.choice(COLOURS))
    events = []
    for kind, t in zip(kinds, onsets):
        fields = {"kind": kind, "shape": shape, "colour": colour}
        if kind == "move":
            fields["direction"] = str(rng.choice(DIRECTIONS))
        elif kind == "change":
            colour = fields["new_colour"] = str(rng.choice([c for c in COLOURS if c != colour]))
        events.append(TimedEvent(t, Event(**fields)))
    return colour0, events


def _try_sample(rng, slots, duration, size, fps, sample_rate) -> Scene | None:
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    shapes = [str(s) for s in rng.choice(SHAPES, size=n_objects, replace=False)]
    per_object = [int(k) for k in rng.integers(1, MAX_EVENTS_PER_OBJECT + 1, size=n_objects)]
    n_sounds = int(rng.integers(1, MAX_SOUNDS + 1))
    n_tied = int(rng.binomial(n_sounds, P_TIED))
    n_events = sum(per_object) + n_sounds - n_tied
    if not MIN_EVENTS <= n_events <= MAX_EVENTS or n_tied > sum(per_object):
        return None
    onsets = _sample_onsets(rng, slots, n_events)
    if onsets is None:
        return None
    # Who owns each onset slot: object index, or -1 for a standalone sound.
    owners = rng.permutation(sum(([i] * k for i, k in enumerate(per_object)), []) + [-1] * (n_sounds - n_tied))
    timeline = [TimedEvent(t, _sample_sound(rng)) for t, o in zip(onsets, owners) if o == -1]
    objects = []
    for i, (shape, box) in enumerate(zip(shapes, _regions(rng, n_objects, size))):
        obj_onsets = [t for t, o in zip(onsets, owners) if o == i]
        colour0, events = _object_events(rng, shape, _sample_kinds(rng, len(obj_onsets)), obj_onsets)
        steps = [direction_step(te.event.direction, size) for te in events if te.event.kind == "move"]
        start = _place(rng, box, steps)
        if start is None:
            return None
        objects.append(SceneObject(shape, colour0, start, events))
    objects = _tie_sounds(rng, objects, n_tied)
    timeline = sorted(timeline + [te for obj in objects for te in obj.events], key=lambda te: te.t)
    scene = Scene(objects, timeline, int(rng.integers(2**31)), duration, size, fps, sample_rate)
    sentences = scene.sentences()
    # Identical sentences would be indistinguishable from a looping caption (and from each other in the judge).
    return scene if len(set(sentences)) == len(sentences) else None


def _tie_sounds(rng, objects: list[SceneObject], n_tied: int) -> list[SceneObject]:
    """Bind a fresh sound to ``n_tied`` randomly chosen visual events (same onset)."""
    slots = [(i, j) for i, obj in enumerate(objects) for j in range(len(obj.events))]
    for pick in rng.choice(len(slots), size=n_tied, replace=False):
        i, j = slots[pick]
        timed = objects[i].events[j]
        objects[i].events[j] = TimedEvent(timed.t, dataclasses.replace(timed.event, sound=_sample_sound(rng)))
    return objects
