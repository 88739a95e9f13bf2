"""On-screen state from a SynthAV timeline (src/data/synth/labels.py): by hand, and against the renderer."""

from __future__ import annotations

import numpy as np
import pytest

from src.data.synth.labels import ABSENT, IGNORE, STILL, colour_at, motion_between, span_labels
from src.data.synth.scene import sample_scene
from src.data.synth.world import COLOURS, DIRECTIONS, SHAPES

TIMELINE = [
    {"t": 0.25, "kind": "move", "shape": "triangle", "colour": "green", "direction": "down"},
    {"t": 0.75, "kind": "noise"},
    {"t": 1.25, "kind": "change", "shape": "circle", "colour": "blue", "new_colour": "green",
     "sound": {"kind": "tone", "pitch": "low"}},
    {"t": 2.0, "kind": "appear", "shape": "square", "colour": "yellow"},
    {"t": 3.0, "kind": "disappear", "shape": "triangle", "colour": "green"},
]


def c(name):
    return 1 + COLOURS.index(name)


def d(name):
    return 1 + DIRECTIONS.index(name)


@pytest.mark.parametrize("t0, t1, expected", [
    # (circle, square, triangle) x (colour, motion)
    (0.0, 0.25, [(c("blue"), STILL), (ABSENT, IGNORE), (c("green"), STILL)]),
    (0.5, 0.75, [(c("blue"), STILL), (ABSENT, IGNORE), (c("green"), d("down"))]),  # the move is under way
    (0.75, 1.0, [(c("blue"), STILL), (ABSENT, IGNORE), (c("green"), STILL)]),  # it ended at 0.75
    (1.0, 1.25, [(IGNORE, STILL), (ABSENT, IGNORE), (c("green"), STILL)]),  # the circle turns green at 1.25
    (1.75, 2.0, [(c("green"), STILL), (IGNORE, IGNORE), (c("green"), STILL)]),  # the square appears at 2.0
    (2.0, 2.25, [(c("green"), STILL), (c("yellow"), STILL), (c("green"), STILL)]),
    (3.0, 3.25, [(c("green"), STILL), (c("yellow"), STILL), (ABSENT, IGNORE)]),
])
def test_span_labels_by_hand(t0, t1, expected):
    assert SHAPES == ("circle", "square", "triangle")
    assert span_labels(TIMELINE, t0, t1) == expected


@pytest.mark.parametrize("seed", range(40))
def test_labels_agree_with_the_rendered_scene(seed):
    """The timeline alone gives what SceneObject.track (the renderer's state) shows, frame by frame."""
    scene = sample_scene(seed)
    timeline = [te.to_dict() for te in scene.events]
    times = np.arange(scene.n_frames) / scene.fps
    for obj in scene.objects:
        events = [e for e in timeline if e.get("shape") == obj.shape]
        visible, cx, cy, colour = obj.track(times, scene.size)
        for i, t in enumerate(times):
            assert colour_at(events, float(t)) == (1 + int(colour[i]) if visible[i] else ABSENT)
        for i in range(len(times) - 1):
            step = (cx[i + 1] - cx[i], cy[i + 1] - cy[i])
            want = STILL
            if step != (0.0, 0.0):
                name = ("right" if step[0] > 0 else "left") if step[0] else ("down" if step[1] > 0 else "up")
                want = d(name)
            assert motion_between(events, float(times[i]), float(times[i + 1])) == want
