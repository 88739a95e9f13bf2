"""The SynthAV world: its vocabulary, its physical constants and the structured atomic event.

Everything a caption can say is named here, so the generator, the grammar and the judge share one vocabulary.
Bump ``WORLD_VERSION`` whenever a change here (or in sampling/rendering) changes what a seed produces.
"""

from __future__ import annotations

from dataclasses import dataclass

WORLD_VERSION = "synthav-1"

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = ("low", "high")
BEEP_COUNTS = (1, 2, 3)

VISUAL_KINDS = ("appear", "move", "change", "disappear")
SOUND_KINDS = ("tone", "beep", "noise")

# RGB, uint8. Saturated and far apart so they survive yuv420p chroma subsampling on 12-pixel shapes.
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
BACKGROUND_RGB = (30, 30, 30)

# Hz. Tones and beeps use different frequencies so that pitch and kind are both audible facts;
# all four are far apart on a log scale (>= 1 octave) and below AAC's 16 kHz-rate bandwidth.
TONE_HZ = {"low": 300.0, "high": 1200.0}
BEEP_HZ = {"low": 500.0, "high": 2000.0}

# Seconds. Every sound and every move ends before MIN_GAP_S, so at most one thing happens at a time
# and the temporal order of events is unambiguous.
TONE_S = 0.4
BEEP_S = 0.08
BEEP_GAP_S = 0.08
NOISE_S = 0.3
MOVE_S = 0.5
MIN_GAP_S = 0.5
ONSET_GRID_S = 0.25  # onsets are multiples of this, i.e. exactly on a frame at 4 and 8 fps
FIRST_ONSET_S = 0.25
TAIL_S = 0.75  # the last onset leaves this much clip for its move or sound to finish

MIN_EVENTS = 3
MAX_EVENTS = 6
MAX_OBJECTS = 2
MAX_SOUNDS = 2
MAX_EVENTS_PER_OBJECT = 3

SOUND_AMPLITUDE = 0.5
NOISE_AMPLITUDE = 0.3
FADE_S = 0.005  # raised-cosine fade at sound edges; avoids clicks that would smear the spectrum


@dataclass(frozen=True)
class Event:
    """One atomic event, without its time.

    Visual kinds (appear/move/change/disappear) use ``shape`` and ``colour`` (the colour *before* the event),
    plus ``direction`` (move) or ``new_colour`` (change); ``sound`` set makes it a tied event (the sound starts
    at the same instant). Sound kinds use ``pitch`` (tone, beep) and ``count`` (beep: 1-3).
    """

    kind: str
    shape: str | None = None
    colour: str | None = None
    direction: str | None = None
    new_colour: str | None = None
    pitch: str | None = None
    count: int | None = None
    sound: Event | None = None

    @property
    def is_visual(self) -> bool:
        return self.kind in VISUAL_KINDS

    @property
    def is_tied(self) -> bool:
        return self.sound is not None

    def to_dict(self) -> dict:
        """Fields that are set, in declaration order; a tied sound nests as a dict."""
        out: dict = {"kind": self.kind}
        for name in ("shape", "colour", "direction", "new_colour", "pitch", "count"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.sound is not None:
            out["sound"] = self.sound.to_dict()
        return out

    @classmethod
    def from_dict(cls, row: dict) -> Event:
        """Inverse of ``to_dict``; a ``t`` key (timeline rows) is ignored."""
        fields = {k: v for k, v in row.items() if k not in ("t", "sound")}
        sound = row.get("sound")
        return cls(**fields, sound=None if sound is None else cls.from_dict(sound))


@dataclass(frozen=True)
class TimedEvent:
    """An event with its onset ``t`` in seconds from the start of the clip."""

    t: float
    event: Event

    def to_dict(self) -> dict:
        return {"t": self.t, **self.event.to_dict()}
