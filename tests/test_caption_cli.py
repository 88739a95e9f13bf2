"""The caption CLI on a tiny base: one caption per clip, K samples with log-probs, a clear error for a bad clip."""

from __future__ import annotations

import json

import pytest

from src import caption
from src.models.build import build_tiny
from tests import media_fixtures as fx


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tokenizer_texts=300)


def test_one_caption_per_clip_and_bad_clip_reported(base, synthav, tmp_path, capsys):
    clips = [str(synthav / "test" / "test-000000.mp4"), str(synthav / "test" / "test-000001.mp4")]
    bad = fx.write_random_bytes(tmp_path / "broken.mp4")
    status = caption.main(["--ckpt", str(base), *clips, str(bad), "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert status == 1
    assert [line.split("\t")[0] for line in lines] == clips
    assert f"{bad}: cannot open container" in err


def test_sampling_json_gives_k_samples_with_logps(base, synthav, capsys):
    clip = str(synthav / "test" / "test-000000.mp4")
    args = ["--ckpt", str(base), clip, "--max-new-tokens", "5", "--sample", "--temperature", "1.0", "--top-p", "0.9",
            "--num-samples", "3", "--json", "--seed", "1"]
    assert caption.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2] and all(r["video"] == clip for r in rows)
    assert all(r["logp"] < 0 and 1 <= r["tokens"] <= 5 for r in rows)
    assert caption.main(args) == 0  # the same seed gives the same samples
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


def test_beam_search_json_gives_one_caption_with_its_logp(base, synthav, capsys):
    clip = str(synthav / "test" / "test-000000.mp4")
    args = ["--ckpt", str(base), clip, "--max-new-tokens", "5", "--json"]
    assert caption.main([*args, "--num-beams", "3", "--length-penalty", "0"]) == 0
    beam = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(beam) == 1 and beam[0]["video"] == clip and 1 <= beam[0]["tokens"] <= 5 and beam[0]["logp"] < 0
    with pytest.raises(SystemExit):
        caption.main([*args, "--num-beams", "2", "--sample"])
