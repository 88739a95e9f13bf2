"""Manifests: every validation case names file:line, paths resolve, writes round-trip, appends survive crashes.

Media files here are empty placeholders: manifests only check that they exist, decoding is the dataset's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from src.data.manifest import (
    ManifestError,
    ManifestErrors,
    PreferenceRow,
    SFTRow,
    append_rows,
    read_manifest,
    repair_partial_last_line,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
GOOD_SFT = {"id": "ok", "video": "clips/a.mp4", "caption": "A dog barks."}
GOOD_PREF = {"id": "ok", "video": "clips/a.mp4", "chosen": "A dog barks.", "rejected": "A cat sings."}


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()


def _write_lines(path: Path, lines: list, end: str = "\n") -> Path:
    """Write raw lines (dicts become JSON) with ``end`` after each one, including the last."""
    text = "".join((json.dumps(line) if isinstance(line, dict) else line) + end for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    _touch(tmp_path, "clips/a.mp4", "clips/b.mp4", "clips/a.wav")
    return tmp_path


def _assert_error_at(err: ManifestError, path: Path, line: int | None, *words: str) -> None:
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert isinstance(err, ManifestError)
    assert err.line == line and err.path == str(path)
    assert str(err).startswith(where), str(err)
    for word in words:
        assert word in str(err), str(err)


# ---------------------------------------------------------------------------------------------- valid input

def test_sft_rows_resolve_paths_and_keep_extra_keys(data: Path):
    path = _write_lines(data / "train.jsonl", [
        {"id": "v1", "video": "clips/a.mp4", "prompt": "Describe.", "caption": "A dog barks.",
         "events": ["A dog barks."], "timeline": [{"t": 0.5}]},
        "",
        {"id": "a1", "audio": "clips/a.wav", "use_audio": True, "caption": "Rain."},
        {"id": "v2", "video": str(data / "clips/b.mp4"), "audio": "clips/a.wav", "use_audio": False,
         "caption": "Silent film."},
    ])
    v1, a1, v2 = read_manifest(path)
    assert v1 == SFTRow(id="v1", video=str(data / "clips/a.mp4"), audio=None, use_audio=True, prompt="Describe.",
                        caption="A dog barks.", events=("A dog barks.",), extra={"timeline": [{"t": 0.5}]},
                        source=f"{path}:1")
    assert (a1.video, a1.audio, a1.use_audio, a1.prompt, a1.source) == (None, str(data / "clips/a.wav"), True,
                                                                        None, f"{path}:3")
    assert (v2.video, v2.use_audio) == (str(data / "clips/b.mp4"), False)


def test_use_audio_defaults_to_true(data: Path):
    (row,) = read_manifest(_write_lines(data / "m.jsonl", [GOOD_SFT]))
    assert row.use_audio is True


def test_preference_rows(data: Path):
    path = _write_lines(data / "pref.jsonl", [{
        **GOOD_PREF, "gt": "A dog barks twice.", "ref_chosen_logp": -12.5, "ref_rejected_logp": -30,
        "round": 2, "events": ["A dog barks."], "scores": [1, 3]}])
    (row,) = read_manifest(path, "preference")
    assert isinstance(row, PreferenceRow)
    assert (row.chosen, row.rejected, row.gt, row.round) == ("A dog barks.", "A cat sings.", "A dog barks twice.", 2)
    assert (row.ref_chosen_logp, row.ref_rejected_logp) == (-12.5, -30.0)
    assert row.extra == {"scores": [1, 3]}


def test_bom_is_tolerated(data: Path):
    path = data / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_SFT).encode() + b"\n")
    assert [row.id for row in read_manifest(path)] == ["ok"]


def test_crlf_and_missing_final_newline_are_fine(data: Path):
    path = data / "crlf.jsonl"
    path.write_bytes(json.dumps(GOOD_SFT).encode() + b"\r\n" + json.dumps({**GOOD_SFT, "id": "b"}).encode())
    assert [row.id for row in read_manifest(path)] == ["ok", "b"]


def test_check_media_false_skips_existence(tmp_path: Path):
    path = _write_lines(tmp_path / "m.jsonl", [{**GOOD_SFT, "video": "missing.mp4"}])
    (row,) = read_manifest(path, check_media=False)
    assert row.video == str(tmp_path / "missing.mp4")


def test_rows_are_frozen_and_pickle(data: Path):
    (row,) = read_manifest(_write_lines(data / "m.jsonl", [{**GOOD_SFT, "timeline": [1]}]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.caption = "changed"
    with pytest.raises(TypeError):
        row.extra["timeline"] = []
    assert pickle.loads(pickle.dumps(row)) == row
    assert dataclasses.replace(row, extra={"x": 1}).extra == {"x": 1}


# ---------------------------------------------------------------------------------------------- one error per case

SFT_CASES = {
    "invalid json": ('{"id": "x", "caption": }', "invalid JSON", "column 24"),
    "not an object": ('["a", "b"]', "expected a JSON object, got list"),
    "missing id": (json.dumps({"video": "clips/a.mp4", "caption": "c"}), "missing required field 'id'"),
    "missing caption": (json.dumps({"id": "x", "video": "clips/a.mp4"}), "missing required field 'caption'"),
    "preference row read as sft": (json.dumps({**GOOD_PREF, "id": "x"}), "looks like a preference row"),
    "caption not a string": (json.dumps({**GOOD_SFT, "id": "x", "caption": 3}), "'caption' must be a string"),
    "empty caption": (json.dumps({**GOOD_SFT, "id": "x", "caption": ""}), "'caption' is empty"),
    "whitespace caption": (json.dumps({**GOOD_SFT, "id": "x", "caption": " \n\t"}), "'caption' is empty"),
    "use_audio not a bool": (json.dumps({**GOOD_SFT, "id": "x", "use_audio": 1}), "'use_audio' must be true or false"),
    "events not a list": (json.dumps({**GOOD_SFT, "id": "x", "events": "a dog"}), "'events' must be a list"),
    "events with a number": (json.dumps({**GOOD_SFT, "id": "x", "events": ["a", 2]}), "'events'[1]"),
    "prompt not a string": (json.dumps({**GOOD_SFT, "id": "x", "prompt": ["p"]}), "'prompt' must be a string"),
    "no media": (json.dumps({"id": "x", "caption": "c"}), "neither 'video' nor 'audio'"),
    "audio-only without audio": (json.dumps({"id": "x", "audio": "clips/a.wav", "use_audio": False, "caption": "c"}),
                                 "nothing to read"),
    "missing video file": (json.dumps({**GOOD_SFT, "id": "x", "video": "clips/nope.mp4"}),
                           "video file not found", "clips/nope.mp4"),
    "missing audio file": (json.dumps({**GOOD_SFT, "id": "x", "audio": "nope.wav"}), "audio file not found"),
    "media is a folder": (json.dumps({**GOOD_SFT, "id": "x", "video": "clips"}), "video file is not a file"),
    "duplicate id": (json.dumps(GOOD_SFT), "duplicate id 'ok'", "first on line 1"),
}

PREFERENCE_CASES = {
    "missing rejected": (json.dumps({"id": "x", "video": "clips/a.mp4", "chosen": "a"}),
                         "missing required field 'rejected'"),
    "empty chosen": (json.dumps({**GOOD_PREF, "id": "x", "chosen": "  "}), "'chosen' is empty"),
    "chosen equals rejected": (json.dumps({**GOOD_PREF, "id": "x", "rejected": "A dog barks. "}), "same text"),
    "logp not a number": (json.dumps({**GOOD_PREF, "id": "x", "ref_chosen_logp": "-1", "ref_rejected_logp": -2}),
                          "'ref_chosen_logp' must be a finite number"),
    "logp NaN": ('{"id": "x", "video": "clips/a.mp4", "chosen": "a", "rejected": "b", '
                 '"ref_chosen_logp": -1.0, "ref_rejected_logp": NaN}', "'ref_rejected_logp' must be a finite number"),
    "logp bool": (json.dumps({**GOOD_PREF, "id": "x", "ref_chosen_logp": True, "ref_rejected_logp": -2}),
                  "finite number, got bool"),
    "only one logp": (json.dumps({**GOOD_PREF, "id": "x", "ref_chosen_logp": -1.0}), "must be given together"),
    "round not an int": (json.dumps({**GOOD_PREF, "id": "x", "round": 1.5}), "'round' must be a non-negative integer"),
    "round negative": (json.dumps({**GOOD_PREF, "id": "x", "round": -1}), "'round' must be a non-negative integer"),
    "empty gt": (json.dumps({**GOOD_PREF, "id": "x", "gt": ""}), "'gt' is empty"),
}


@pytest.mark.parametrize("kind, case", [("sft", name) for name in SFT_CASES]
                         + [("preference", name) for name in PREFERENCE_CASES])
def test_each_validation_error_names_file_and_line(data: Path, kind: str, case: str):
    bad_line, *words = (SFT_CASES if kind == "sft" else PREFERENCE_CASES)[case]
    good = GOOD_SFT if kind == "sft" else GOOD_PREF
    # Good row on line 1, a blank line 2 (skipped but counted), the bad row on line 3.
    path = _write_lines(data / "m.jsonl", [good, "", bad_line])
    with pytest.raises(ManifestError) as info:
        read_manifest(path, kind)
    assert not isinstance(info.value, ManifestErrors)
    _assert_error_at(info.value, path, 3, *words)


def test_invalid_utf8_names_the_line(data: Path):
    path = data / "m.jsonl"
    path.write_bytes(json.dumps(GOOD_SFT).encode() + b'\n{"id": "\xff"}\n')
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    _assert_error_at(info.value, path, 2, "invalid UTF-8")


def test_all_errors_of_a_file_are_reported(data: Path):
    path = _write_lines(data / "m.jsonl", [
        GOOD_SFT,
        {**GOOD_SFT, "id": "b", "caption": ""},
        "not json",
        {**GOOD_SFT, "id": "c"},
        {**GOOD_SFT, "id": "d", "video": "nope.mp4"},
        GOOD_SFT,
    ])
    with pytest.raises(ManifestErrors) as info:
        read_manifest(path)
    err = info.value
    assert [e.line for e in err.errors] == [2, 3, 5, 6]
    text = str(err)
    for line, word in [(2, "'caption' is empty"), (3, "invalid JSON"), (5, "video file not found"),
                       (6, "duplicate id")]:
        assert f"{path}:{line}: {word}" in text, text
    assert isinstance(err, ManifestError) and isinstance(err, ValueError)


# ---------------------------------------------------------------------------------------------- whole-file errors

def test_missing_file(tmp_path: Path):
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "nope.jsonl")
    _assert_error_at(info.value, tmp_path / "nope.jsonl", None, "file not found")


def test_directory(tmp_path: Path):
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    _assert_error_at(info.value, tmp_path, None, "is a directory")


def test_empty_manifest(tmp_path: Path):
    path = _write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    _assert_error_at(info.value, path, None, "empty manifest")
    assert read_manifest(path, allow_empty=True) == []


def test_unknown_kind(data: Path):
    path = _write_lines(data / "m.jsonl", [GOOD_SFT])
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "dpo")
    _assert_error_at(info.value, path, None, "unknown kind 'dpo'")


# ---------------------------------------------------------------------------------------------- writing

def test_write_read_round_trip_relativises_paths_under_the_output_folder(data: Path, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    _touch(outside, "far.mp4")
    rows = read_manifest(_write_lines(data / "in.jsonl", [
        {"id": "a", "video": "clips/a.mp4", "audio": "clips/a.wav", "prompt": "Describe.", "caption": "c",
         "events": ["e1", "e2"], "timeline": [{"t": 1}]},
        {"id": "b", "video": str(outside / "far.mp4"), "use_audio": False, "caption": "ü 字"},
    ]))
    out = data / "out" / "copy.jsonl"
    assert write_manifest(data / "copy.jsonl", rows) == 2
    assert write_manifest(out, rows) == 2  # a new sub-folder: the clips are no longer under it

    near = [json.loads(line) for line in (data / "copy.jsonl").read_text(encoding="utf-8").splitlines()]
    assert near[0] == {"id": "a", "video": "clips/a.mp4", "audio": "clips/a.wav", "use_audio": True,
                       "prompt": "Describe.", "caption": "c", "events": ["e1", "e2"], "timeline": [{"t": 1}]}
    assert near[1]["video"] == str(outside / "far.mp4")
    assert "ü 字" in (data / "copy.jsonl").read_text(encoding="utf-8")
    far = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert far["video"] == str(data / "clips/a.mp4")

    for copy in (data / "copy.jsonl", out):
        again = read_manifest(copy)
        assert [dataclasses.replace(r, source="") for r in again] == [dataclasses.replace(r, source="") for r in rows]


def test_write_preference_round_trip_from_dicts(data: Path):
    rows = [{**GOOD_PREF, "ref_chosen_logp": -1.5, "ref_rejected_logp": -9.0, "round": 0},
            {**GOOD_PREF, "id": "b", "gt": "g"}]
    path = data / "pref.jsonl"
    assert write_manifest(path, rows) == 2
    first, second = read_manifest(path, "preference")
    assert (first.ref_chosen_logp, first.round, second.gt) == (-1.5, 0, "g")
    assert json.loads(path.read_text().splitlines()[0])["video"] == "clips/a.mp4"


def test_write_is_atomic_and_validates_every_row(data: Path):
    path = _write_lines(data / "m.jsonl", [GOOD_SFT])
    before = path.read_bytes()
    bad = [{**GOOD_SFT, "id": "b"}, {**GOOD_SFT, "id": "c", "caption": ""}, {**GOOD_SFT, "id": "b"},
           {**GOOD_SFT, "id": "d", "extra_value": float("nan")}]
    with pytest.raises(ManifestErrors) as info:
        write_manifest(path, bad)
    assert [e.reason.split(":")[0] for e in info.value.errors] == ["row 2 to write", "row 3 to write",
                                                                   "row 4 to write"]
    assert "duplicate id 'b'" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(data)) == ["clips", "m.jsonl"]  # no temp file left behind


def test_write_refuses_mixed_kinds_and_no_rows(data: Path):
    with pytest.raises(ManifestError, match="mix SFT and preference"):
        write_manifest(data / "m.jsonl", [GOOD_SFT, {**GOOD_PREF, "id": "p"}])
    with pytest.raises(ManifestError, match="no rows"):
        write_manifest(data / "m.jsonl", [])
    assert not (data / "m.jsonl").exists()


# ---------------------------------------------------------------------------------------------- append-only files

def test_append_rows_and_partial_last_line(data: Path):
    path = data / "rollout.jsonl"
    append_rows(path, [{**GOOD_PREF, "id": "a"}])
    append_rows(path, [{**GOOD_PREF, "id": "b", "round": 1}])
    assert [r.id for r in read_manifest(path, "preference")] == ["a", "b"]

    with open(path, "ab") as f:  # a writer killed mid-row
        f.write(b'{"id": "c", "video": "clips/a.mp4", "cho')
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "preference")
    _assert_error_at(info.value, path, 3, "incomplete last line")
    assert [r.id for r in read_manifest(path, "preference", tolerate_partial_last_line=True)] == ["a", "b"]

    with pytest.raises(ManifestError, match="repair_partial_last_line"):
        append_rows(path, [{**GOOD_PREF, "id": "c"}])
    assert repair_partial_last_line(path) is True
    assert repair_partial_last_line(path) is False
    append_rows(path, [{**GOOD_PREF, "id": "c"}])
    assert [r.id for r in read_manifest(path, "preference")] == ["a", "b", "c"]


def test_partial_line_in_the_middle_is_an_ordinary_error(data: Path):
    path = _write_lines(data / "m.jsonl", ['{"id": "a", "vid', GOOD_SFT])
    with pytest.raises(ManifestError) as info:
        read_manifest(path, tolerate_partial_last_line=True)
    _assert_error_at(info.value, path, 1, "invalid JSON")


def test_repair_completes_a_whole_last_row(data: Path):
    path = data / "m.jsonl"
    path.write_text(json.dumps(GOOD_SFT))  # hand-written, no final newline
    assert repair_partial_last_line(path) is True
    assert path.read_text().endswith("}\n")
    append_rows(path, [{**GOOD_SFT, "id": "b"}])
    assert [r.id for r in read_manifest(path)] == ["ok", "b"]


# ---------------------------------------------------------------------------------------------- command line

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.data.manifest", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_check(data: Path):
    good = _write_lines(data / "good.jsonl", [GOOD_SFT, {**GOOD_SFT, "id": "b"}])
    bad = _write_lines(data / "bad.jsonl", [GOOD_SFT, {**GOOD_SFT, "id": "b", "caption": ""}, "[]"])
    result = _cli("check", str(good))
    assert result.returncode == 0, result.stderr
    assert f"{good}: 2 rows OK" in result.stdout

    result = _cli("check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:2: " in result.stderr and f"{bad}:3: " in result.stderr

    missing_media = _write_lines(data / "nomedia.jsonl", [{**GOOD_PREF, "video": "gone.mp4"}])
    assert _cli("check", str(missing_media), "--kind", "preference").returncode == 1
    assert _cli("check", str(missing_media), "--kind", "preference", "--no-media").returncode == 0
