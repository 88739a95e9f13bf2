"""SynthAV generator: determinism, container format, grammar round trips, world coverage and rendering facts."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest

from src.data.synth import BEEP_HZ, TONE_HZ, Event, generate, parse, render_audio, render_video, sample_scene, sentence
from src.data.synth.__main__ import main
from src.data.synth.render import object_masks
from src.data.synth.scene import sound_length
from src.data.synth.world import (
    BEEP_COUNTS, COLOURS, DIRECTIONS, MIN_GAP_S, PITCHES, SHAPES, SOUND_KINDS, VISUAL_KINDS,
)

COUNTS = {"train": 6, "val": 2, "test": 2}
N_SCENES = 200


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The same small set written three ways (seed 0: in-process twice, 2 spawned workers once) and seed 1."""
    root = tmp_path_factory.mktemp("synthav")
    runs = {"a": (0, 1), "b": (0, 1), "workers2": (0, 2), "seed1": (1, 1)}
    for name, (seed, workers) in runs.items():
        generate(root / name, COUNTS, seed=seed, workers=workers)
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def scenes() -> list:
    return [sample_scene(seed) for seed in range(N_SCENES)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(datasets):
    a = _files(datasets["a"])
    assert sorted(a) == sorted(["meta.json"] + [f"{s}{kind}.jsonl" for s in COUNTS for kind in ("", "_audio")]
                               + [f"{s}/{s}-{i:06d}.mp4" for s, n in COUNTS.items() for i in range(n)])
    assert _files(datasets["b"]) == a
    assert _files(datasets["workers2"]) == a


def test_different_seed_gives_different_clips(datasets):
    for split in COUNTS:
        assert _rows(datasets["seed1"], split) != _rows(datasets["a"], split)
        captions = [r["caption"] for r in _rows(datasets["seed1"], split)]
        assert captions != [r["caption"] for r in _rows(datasets["a"], split)]


def test_every_clip_is_one_mp4_with_h264_video_and_aac_audio(datasets):
    root = datasets["a"]
    for split in COUNTS:
        for row in _rows(root, split):
            with av.open(str(root / row["video"])) as container:
                assert container.format.name.split(",")[0] == "mov"
                assert [s.codec_context.name for s in container.streams.video] == ["h264"]
                assert [s.codec_context.name for s in container.streams.audio] == ["aac"]
                video, audio = container.streams.video[0], container.streams.audio[0]
                assert (video.width, video.height, video.codec_context.pix_fmt) == (56, 56, "yuv420p")
                assert (audio.sample_rate, audio.codec_context.layout.nb_channels) == (16000, 1)
                assert sum(1 for _ in container.decode(video=0)) == 32  # 4 s at 8 fps


def test_manifest_rows_are_consistent_and_parse_back(datasets):
    root = datasets["a"]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"] == COUNTS and meta["world_version"]
    for split in COUNTS:
        rows = _rows(root, split)
        assert [r["id"] for r in rows] == [f"{split}-{i:06d}" for i in range(COUNTS[split])]
        for row in rows:
            assert row["video"] == f"{split}/{row['id']}.mp4" and row["use_audio"] is True
            assert row["caption"] == " ".join(row["events"])
            assert [parse(s) for s in row["events"]] == [Event.from_dict(e) for e in row["timeline"]]
            onsets = [e["t"] for e in row["timeline"]]
            assert all(b - a >= MIN_GAP_S for a, b in zip(onsets, onsets[1:]))


def test_world_covers_the_vocabulary(scenes):
    events = [te.event for s in scenes for te in s.events]
    sounds = [te.event for s in scenes for te in s.sounds]
    assert {e.shape for e in events if e.is_visual} == set(SHAPES)
    assert {e.colour for e in events if e.is_visual} == set(COLOURS)
    assert {e.direction for e in events if e.kind == "move"} == set(DIRECTIONS)
    assert {e.kind for e in events} == set(VISUAL_KINDS) | set(SOUND_KINDS)
    assert {(s.kind, s.pitch) for s in sounds if s.kind != "noise"} == set(itertools.product(("tone", "beep"),
                                                                                             PITCHES))
    assert {s.count for s in sounds if s.kind == "beep"} == set(BEEP_COUNTS)
    tied = [e for e in events if e.is_tied]
    assert {e.kind for e in tied} == set(VISUAL_KINDS) and {e.sound.kind for e in tied} == set(SOUND_KINDS)
    assert {len(s.objects) for s in scenes} == {1, 2}


def test_scenes_obey_the_world_rules(scenes):
    for scene in scenes:
        assert 3 <= len(scene.events) <= 6 and 1 <= len(scene.sounds) <= 2
        assert len(set(scene.sentences())) == len(scene.sentences())  # a repeat would look like a loop
        assert len({o.shape for o in scene.objects}) == len(scene.objects)
        onsets = [te.t for te in scene.events]
        assert all(b - a >= MIN_GAP_S for a, b in zip(onsets, onsets[1:]))
        assert onsets[-1] + max([0.5] + [sound_length(s.event) for s in scene.sounds]) <= scene.duration
        for obj in scene.objects:
            assert all(te.event.kind != "appear" for te in obj.events[1:])
            assert all(te.event.kind != "disappear" for te in obj.events[:-1])


def _all_events() -> list[Event]:
    sounds = ([Event("tone", pitch=p) for p in PITCHES] + [Event("noise")]
              + [Event("beep", pitch=p, count=c) for p in PITCHES for c in BEEP_COUNTS])
    visual = []
    for shape, colour in itertools.product(SHAPES, COLOURS):
        visual += [Event("appear", shape, colour), Event("disappear", shape, colour)]
        visual += [Event("move", shape, colour, direction=d) for d in DIRECTIONS]
        visual += [Event("change", shape, colour, new_colour=c) for c in COLOURS if c != colour]
    tied = [dataclasses.replace(v, sound=s) for v in visual for s in sounds]
    return sounds + visual + tied


def test_every_event_round_trips_through_its_sentence():
    events = _all_events()
    assert len(events) == 9 + 108 + 108 * 9
    for event in events:
        text = sentence(event)
        assert text[0].isupper() and text.endswith(".")
        assert parse(text) == event
        assert Event.from_dict(event.to_dict()) == event


@pytest.mark.parametrize("text", [
    "the red circle moves left", "  THE RED   CIRCLE moves LEFT!  ", "Then, the red circle moves left.",
    "and then the red circle moves left...",
])
def test_parse_tolerates_case_space_period_and_then(text):
    assert parse(text) == Event("move", "circle", "red", direction="left")


@pytest.mark.parametrize("text", [
    "", " ", ".", "The weather is nice today.", "The red circle moves sideways.", "The purple circle appears.",
    "A high beep sounds four times.", "The red circle moves left as the sun sets.", "as a high tone plays",
    "The red circle moves left. A high tone plays.", "ÿ\u200b🙂", "The red circle appears appears.",
])
def test_parse_returns_none_outside_the_grammar(text):
    assert parse(text) is None


def test_tied_sentence_example():
    event = Event("change", "square", "red", new_colour="blue", sound=Event("beep", pitch="high", count=1))
    assert sentence(event) == "The red square turns blue as a high beep sounds once."
    assert parse("the red square turns blue, as a high beep sounds once") == event


def test_audio_has_each_sound_at_its_frequency_and_silence_elsewhere(scenes):
    for scene in scenes[:40]:
        audio = render_audio(scene)
        assert audio.shape == (64000,) and audio.dtype == np.float32
        busy = np.zeros(len(audio), dtype=bool)
        for timed in scene.sounds:
            start, n = round(timed.t * 16000), round(sound_length(timed.event) * 16000)
            busy[start:start + n] = True
            segment = audio[start:start + n]
            if timed.event.kind == "noise":
                continue
            hz = (TONE_HZ if timed.event.kind == "tone" else BEEP_HZ)[timed.event.pitch]
            spectrum = np.abs(np.fft.rfft(segment, n=16000))  # 1 Hz bins
            assert abs(int(np.argmax(spectrum)) - hz) <= 2
            if timed.event.kind == "beep":
                loud = np.abs(segment) > 0.05
                # runs of sound separated by >= 10 ms of silence = number of beeps
                gaps = np.diff(np.flatnonzero(loud)) > 160
                assert int(gaps.sum()) + 1 == timed.event.count
            assert scene.sound_at(timed.t + 0.01) == timed.event
        assert np.all(audio[~busy] == 0)
        assert scene.sound_at(0.0) is None


def test_video_draws_each_object_where_its_centroid_says(scenes):
    for scene in scenes[:40]:
        frames = render_video(scene)
        assert frames.shape == (32, 56, 56, 3) and frames.dtype == np.uint8
        times = np.arange(32) / 8
        masks = [object_masks(o, times, 56)[0] for o in scene.objects]
        if len(masks) == 2:
            assert not np.any(masks[0] & masks[1])  # each object keeps to its half of the frame
        for obj, mask in zip(scene.objects, masks):
            for i in (0, 12, 31):
                centroid = scene.object_centroid(obj.shape, times[i])
                if not mask[i].any():
                    assert centroid is None
                    continue
                ys, xs = np.nonzero(mask[i])
                assert centroid == pytest.approx((xs.mean(), ys.mean()))
                assert np.all(frames[i][mask[i]] != (30, 30, 30))


def test_object_centroid_follows_moves_and_visibility():
    def has_appear_then_move(scene) -> bool:  # and a move that is not cut short by a disappearance
        kinds = [te.event.kind for te in scene.objects[0].events]
        return kinds[:2] == ["appear", "move"] and kinds[2:3] != ["disappear"]

    scene = next(s for s in map(sample_scene, range(500)) if has_appear_then_move(s))
    appear, move = scene.objects[0].events[:2]
    assert scene.object_centroid(0, appear.t - 0.1) is None and scene.object_centroid(0, appear.t) is not None
    before, after = scene.object_centroid(0, move.t), scene.object_centroid(0, move.t + 0.5)
    dx, dy = {"left": (-12, 0), "right": (12, 0), "up": (0, -12), "down": (0, 12)}[move.event.direction]
    assert after == pytest.approx((before[0] + dx, before[1] + dy))


def test_cli_writes_a_set(tmp_path, capsys):
    main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--test", "0", "--workers", "1"])
    assert len(_rows(tmp_path, "train")) == 2 and len(_rows(tmp_path, "val")) == 1
    assert not (tmp_path / "test.jsonl").exists()
    assert "wrote 3 clips" in capsys.readouterr().out


def test_audio_rows_caption_only_what_is_heard(datasets):
    """Each clip's audio-only row: the same file as audio, captioned with its sounds (tied ones included) in time
    order, every sentence a sound sentence of the grammar."""
    from src.data.synth import grammar

    rows = [json.loads(x) for x in (datasets["a"] / "train.jsonl").read_text().splitlines()]
    audio = [json.loads(x) for x in (datasets["a"] / "train_audio.jsonl").read_text().splitlines()]
    for row, arow in zip(rows, audio):
        assert arow["id"] == row["id"] + "-audio" and arow["audio"] == row["video"] and "video" not in arow
        sounds = [e.get("sound", e) for e in row["timeline"] if "sound" in e or e["kind"] in ("tone", "beep", "noise")]
        parsed = [grammar.parse(s) for s in arow["events"]]
        assert [p.kind for p in parsed] == [s["kind"] for s in sounds] and arow["caption"] == " ".join(arow["events"])
