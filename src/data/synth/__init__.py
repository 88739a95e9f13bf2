"""SynthAV: a seeded generator of short audio-visual clips with exactly known atomic events (DESIGN section 6).

World: 1-2 shapes (circle/square/triangle) in red/green/blue/yellow that appear, move left/right/up/down,
change colour and disappear; 1-2 sounds (low/high tone, low/high beep once/twice/three times, a burst of noise),
each alone or tied to a visual event. 3-6 events per clip at onsets >= 0.5 s apart.

Layout written by ``python -m src.data.synth --out DIR``:
    DIR/{train,val,test}/<id>.mp4   h264 yuv420p video + AAC mono audio, one file per clip
    DIR/{split}.jsonl               {"id", "video" (relative to DIR), "caption", "events", "use_audio", "timeline"}
    DIR/meta.json                   generator settings and the world version
"""

from src.data.synth.encode import write_av, write_clip
from src.data.synth.generate import ClipSettings, clip_rng, generate, make_clip
from src.data.synth.grammar import caption, parse, sentence
from src.data.synth.render import render_audio, render_video
from src.data.synth.scene import Scene, SceneObject, sample_scene
from src.data.synth.world import BEEP_HZ, TONE_HZ, WORLD_VERSION, Event, TimedEvent

__all__ = [
    "BEEP_HZ", "TONE_HZ", "WORLD_VERSION", "ClipSettings", "Event", "Scene", "SceneObject", "TimedEvent",
    "caption", "clip_rng", "generate", "make_clip", "parse", "render_audio", "render_video", "sample_scene",
    "sentence", "write_av", "write_clip",
]
