"""The official video-SALMONN 2 / 2+ importer: every entry shape, every bad entry named by line, both CLIs.

Media files here are empty placeholders: the importer only checks that they exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from src.data.manifest import ManifestError, ManifestErrors, read_manifest
from src.data.official import import_official, strip_placeholders
from tests.test_manifest import _assert_error_at, _touch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- import_official

OFFICIAL = [
    {"video": "media/v0.mp4", "use_audio": True,
     "conversations": [{"from": "human", "value": "<video>\nDescribe the video in detail."},
                       {"from": "gpt", "value": "A dog barks at a red ball."}]},
    {"video": "media/v1.mp4",
     "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                       {"from": "gpt", "value": "Nothing."}]},
    {"id": "audio-7", "audio": "media/a2.wav",
     "conversations": [{"from": "human", "value": "<audio>\nTranscribe."}, {"from": "gpt", "value": "hello"}]},
    {"video": "media/v0.mp4", "use_audio": True, "num_tokens": 812,
     "conversations": [{"from": "human", "value": "<video>\nDescribe."},
                       {"from": "gpt", "value": "GT caption."},
                       {"from": "chosen", "value": "Good caption."},
                       {"from": "reject", "value": "Bad caption."}]},
    {"video": "media/v1.mp4", "audio": "media/a2.wav",
     "conversations": [{"role": "human", "content": "<image>\nDescribe."},
                       {"role": "gpt", "content": "First-generation chosen."},
                       {"role": "reject_gpt", "content": "First-generation rejected."},
                       {"role": "gt", "content": "First-generation GT."}]},
]


def _official_media(folder: Path) -> None:
    _touch(folder, "media/v0.mp4", "media/v1.mp4", "media/a2.wav")


def test_strip_placeholders():
    assert strip_placeholders("<video>\nDescribe the video.") == "Describe the video."
    assert strip_placeholders("Watch <video> closely.\n<audio>\n") == "Watch closely."
    assert strip_placeholders("First line\n<video>\nSecond line") == "First line\nSecond line"
    assert strip_placeholders("<video>") == ""


def test_import_official(tmp_path: Path):
    _official_media(tmp_path)
    src = tmp_path / "train.json"
    src.write_text(json.dumps(OFFICIAL, indent=4))
    sft_path, pref_path = tmp_path / "out" / "sft.jsonl", tmp_path / "out" / "pref.jsonl"
    assert import_official(src, sft_path, pref_path) == (3, 2)

    v0, v1, a2 = read_manifest(sft_path)
    assert (v0.id, v0.video, v0.audio, v0.use_audio) == ("train-0", str(tmp_path / "media/v0.mp4"), None, True)
    assert (v0.prompt, v0.caption) == ("Describe the video in detail.", "A dog barks at a red ball.")
    assert (v1.id, v1.use_audio) == ("train-1", False)  # the official loader ignores the track without use_audio
    assert (a2.id, a2.video, a2.audio, a2.use_audio, a2.prompt) == ("audio-7", None, str(tmp_path / "media/a2.wav"),
                                                                     True, "Transcribe.")
    plus, first_gen = read_manifest(pref_path, "preference")
    assert (plus.id, plus.chosen, plus.rejected, plus.gt) == ("train-3", "Good caption.", "Bad caption.", "GT caption.")
    assert plus.extra == {"num_tokens": 812} and plus.use_audio is True
    assert (first_gen.chosen, first_gen.rejected, first_gen.gt) == (
        "First-generation chosen.", "First-generation rejected.", "First-generation GT.")
    assert (first_gen.audio, first_gen.use_audio, first_gen.prompt) == (str(tmp_path / "media/a2.wav"), True,
                                                                         "Describe.")


def test_import_official_media_root_and_jsonl(tmp_path: Path):
    _official_media(tmp_path / "store")
    src = tmp_path / "meta" / "train.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(entry) + "\n" for entry in OFFICIAL[:3]))
    assert import_official(src, tmp_path / "sft.jsonl", None, media_root=tmp_path / "store") == (3, 0)
    assert read_manifest(tmp_path / "sft.jsonl")[0].video == str(tmp_path / "store/media/v0.mp4")


def test_import_official_reports_every_bad_entry_with_its_line(tmp_path: Path):
    _official_media(tmp_path)
    entries = [
        OFFICIAL[0],
        {"video": "media/v0.mp4"},
        {"video": "media/v0.mp4", "conversations": [{"from": "human", "value": "<video>"},
                                                     {"from": "chosen", "value": "only chosen"}]},
        {"image": "x.png", "conversations": OFFICIAL[0]["conversations"]},
        {"video": "media/missing.mp4", "conversations": OFFICIAL[0]["conversations"]},
        {"video": "media/v0.mp4", "conversations": OFFICIAL[0]["conversations"] * 2},
    ]
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(entries, indent=2))
    starts = [i + 1 for i, text in enumerate(src.read_text().splitlines()) if text == "  {"]
    with pytest.raises(ManifestErrors) as info:
        import_official(src, tmp_path / "sft.jsonl", tmp_path / "pref.jsonl")
    errors = info.value.errors
    assert [e.line for e in errors] == starts[1:]
    for err, (index, word) in zip(errors, [(1, "'conversations'"), (2, "needs both a 'chosen' and a 'reject'"),
                                           (3, "image entries"), (4, "video file not found"), (5, "multi-turn")]):
        _assert_error_at(err, src, err.line, f"entry {index}: ", word)
    assert not (tmp_path / "sft.jsonl").exists()


def test_import_official_needs_an_output_for_each_kind(tmp_path: Path):
    _official_media(tmp_path)
    src = tmp_path / "train.json"
    src.write_text(json.dumps(OFFICIAL))
    with pytest.raises(ManifestError, match="2 preference entries but no out_pref"):
        import_official(src, tmp_path / "sft.jsonl", None)


def test_import_official_syntax_error_names_the_line(tmp_path: Path):
    src = tmp_path / "broken.json"
    src.write_text('[\n  {"video": "a.mp4"},\n  {"video": }\n]')
    with pytest.raises(ManifestError) as info:
        import_official(src, tmp_path / "sft.jsonl", None)
    _assert_error_at(info.value, src, 3, "invalid JSON")


# ---------------------------------------------------------------------------------------------- command line

def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("command", [("src.data.manifest", "import-official"), ("src.data.official",)],
                         ids=["manifest import-official", "official"])
def test_cli_import_official(tmp_path: Path, command: tuple[str, ...]):
    _official_media(tmp_path)
    src = tmp_path / "train.json"
    src.write_text(json.dumps(OFFICIAL))
    result = _cli(*command, str(src), "--sft", str(tmp_path / "s.jsonl"), "--pref", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "3 SFT rows" in result.stdout and "2 preference rows" in result.stdout
    assert _cli("src.data.manifest", "check", str(tmp_path / "p.jsonl"), "--kind", "preference").returncode == 0
    failed = _cli(*command, str(src), "--sft", str(tmp_path / "s2.jsonl"))
    assert failed.returncode == 1 and "2 preference entries but no out_pref" in failed.stderr
    assert not (tmp_path / "s2.jsonl").exists()


def test_cli_no_media_skips_the_existence_check(tmp_path: Path):
    src = tmp_path / "train.json"
    src.write_text(json.dumps(OFFICIAL[:3]))  # no media files written
    assert _cli("src.data.official", str(src), "--sft", str(tmp_path / "s.jsonl")).returncode == 1
    result = _cli("src.data.official", str(src), "--sft", str(tmp_path / "s.jsonl"), "--no-media")
    assert result.returncode == 0, result.stderr
    assert "3 SFT rows" in result.stdout and "0 preference rows (no file written)" in result.stdout
