"""src.evaluate: rates from predictions worked out by hand, output files, bad input named by file and line,
the median-EER pass, --compare's table and PNG, the CLI on a tiny checkpoint, and `make eval`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from src import evaluate
from src.judge.report import load_result
from src.evaluate import RESULT_KEYS, median_pass, read_predictions

ROOT = Path(__file__).resolve().parents[1]
GT = ["The red circle appears.", "A high beep sounds twice.", "The red circle turns blue as a low tone plays.",
      "The yellow square moves left."]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hand_set(folder: Path) -> tuple[Path, Path]:
    """Two clips, judged by the exact synth judge:
    a: 4 events; the caption has one wrong colour -> 3 correct, 1 incorrect.
    b: 2 events (GT[0], GT[3]); the caption says GT[0] twice and one free-text sentence -> GT[3] missed,
       1 hallucination; 3 sentences of which 1 repeats.
    Sums: 6 events, missed 1, incorrect 1, hallucination 1 -> miss = incorrect = hallucination = 1/6, EER 1/2;
    repetition 1 repeat / (4 + 3) sentences = 1/7."""
    data = write_jsonl(folder / "test.jsonl", [
        {"id": "a", "video": "a.mp4", "caption": " ".join(GT), "events": GT},
        {"id": "b", "video": "b.mp4", "caption": f"{GT[0]} {GT[3]}", "events": [GT[0], GT[3]]},
    ])
    preds = write_jsonl(folder / "preds.jsonl", [
        {"id": "a", "caption": " ".join(GT).replace("red circle appears", "green circle appears"), "finished": True},
        {"id": "b", "caption": f"{GT[0]} {GT[0]} The weather is nice today.", "finished": False},
    ])
    return data, preds


def test_rates_and_files_from_predictions_by_hand(tmp_path, capsys):
    data, preds = hand_set(tmp_path)
    out = tmp_path / "out"
    assert evaluate.main(["--data", str(data), "--pred", str(preds), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert tuple(result) == RESULT_KEYS and json.loads((out / "eval.json").read_text()) == result
    assert result["miss"] == pytest.approx(1 / 6) and result["incorrect"] == pytest.approx(1 / 6)
    assert result["hallucination"] == pytest.approx(1 / 6) and result["eer"] == pytest.approx(0.5)
    assert result["repetition"] == pytest.approx(1 / 7) and result["n_clips"] == 2 and result["judge"] == "synth"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["a", "b"] and samples[1]["finished"] is False
    assert samples[0]["incorrect"] == [[GT[0], "The green circle appears"]]
    assert samples[1]["missed"] == [GT[3]] and samples[1]["hallucinated"] == ["The weather is nice today"]
    assert samples[1]["counts"]["repeated_sentences"] == 1 and samples[1]["status"] == "ok"
    report = (out / "report.md").read_text()
    assert "| 16.7% | 16.7% | 16.7% | 50.0% | 14.3% | 2 |" in report and "1 captions never emitted" in report
    assert "EER 50.0%" in capsys.readouterr().out
    # preds.jsonl is valid --pred input and gives the same result
    again = evaluate.evaluate(None, None, data, preds=out / "preds.jsonl", out=tmp_path / "again")
    assert again == result


def test_bad_predictions_are_named_by_file_and_line(tmp_path, capsys):
    data, _ = hand_set(tmp_path)
    preds = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "caption": "ok"}, "{not json", {"id": "b"}, {"id": "a", "caption": "again"},
        {"id": "zzz", "caption": "x"}, [1, 2], {"id": "b", "caption": "c", "finished": "yes"},
    ])
    with pytest.raises(ValueError) as err:
        read_predictions(preds, evaluate.read_manifest(data, "sft", check_media=False))
    message = str(err.value)
    for expected in (f"{preds}:2: invalid JSON", f"{preds}:3: 'caption' must be a string",
                     f"{preds}:4: duplicate id 'a' (first on line 1)", f"{preds}:5: id 'zzz' is not in the manifest",
                     f"{preds}:6: expected a JSON object", f"{preds}:7: 'finished' must be true or false",
                     f"{preds}: no caption for 1 manifest rows: b"):
        assert expected in message
    assert evaluate.main(["--data", str(data), "--pred", str(preds), "--out", str(tmp_path / "o")]) == 2
    assert f"{preds}:2: invalid JSON" in capsys.readouterr().err


def test_limit_skips_later_manifest_rows_in_predictions(tmp_path):
    data, preds = hand_set(tmp_path)
    result = evaluate.evaluate(None, None, data, preds=preds, limit=1)
    assert result["n_clips"] == 1 and result["incorrect"] == pytest.approx(1 / 4)


def test_rows_without_events_are_named(tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", [{"id": "a", "video": "a.mp4", "caption": "x", "events": GT},
                                                 {"id": "b", "video": "b.mp4", "caption": "x"}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "caption": "x"}, {"id": "b", "caption": "y"}])
    with pytest.raises(ValueError, match=rf"no ground-truth events .*--extract-events.*: {data}:2"):
        evaluate.evaluate(None, None, data, preds=preds)


def test_bad_manifest_line_is_named(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", [{"id": "a", "video": "a.mp4", "caption": "x", "events": GT},
                                                 {"id": "b", "video": "b.mp4", "caption": "x", "events": "oops"}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "caption": "x"}])
    assert evaluate.main(["--data", str(data), "--pred", str(preds), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:2: 'events' must be a list of strings" in capsys.readouterr().err


@pytest.mark.parametrize("eers, expected", [
    ([0.3], 0),
    ([0.3, 0.1, 0.2], 2),  # sorted 0.1 (1), 0.2 (2), 0.3 (0): the middle is pass 2
    ([0.4, 0.1, 0.3, 0.2], 3),  # even: the lower median, 0.2 (3)
    ([0.5, 0.5, 0.1], 0),  # a tie keeps the earlier pass
    ([math.nan, 0.2, 0.1], 1),  # nan sorts last
    ([0.9, 0.1, 0.4, 0.7, 0.3, 0.2, 0.5], 2),  # 7 passes: sorted .1 .2 .3 .4 .5 .7 .9 -> 0.4
])
def test_median_pass(eers, expected):
    assert median_pass([{"eer": e} for e in eers]) == expected


def test_synth_judge_refuses_passes_and_llm_settings(tmp_path):
    data, preds = hand_set(tmp_path)
    common = ["--data", str(data), "--pred", str(preds), "--out", str(tmp_path / "o")]
    for extra in (["--passes", "3"], ["--judge-model", "gpt"], ["--extract-events"]):
        with pytest.raises(SystemExit) as err:
            evaluate.main(common + extra)
        assert err.value.code == 2


def test_judge_config_errors_name_the_file(tmp_path, capsys):
    data, preds = hand_set(tmp_path)
    common = ["--data", str(data), "--pred", str(preds), "--out", str(tmp_path / "o"), "--judge", "llm"]
    cases = {"syntax.yaml": ("model: m\nbase_url: [unclosed\n", "syntax.yaml:3: invalid judge config"),
             "unknown.yaml": ("model: m\ntemprature: 0\n", "unknown.yaml: unknown setting(s) temprature"),
             "list.json": ('["model"]', "list.json: the judge config must be a mapping")}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit):
            evaluate.main(common + ["--judge-config", str(tmp_path / name)])
        assert expected in capsys.readouterr().err


def test_compare_writes_a_png_and_a_table_in_order(tmp_path, capsys):
    data, preds = hand_set(tmp_path)
    evaluate.evaluate(None, None, data, preds=preds, out=tmp_path / "sft")
    write_jsonl(tmp_path / "better.jsonl", [{"id": "a", "caption": " ".join(GT)}, {"id": "b", "caption": GT[0]}])
    evaluate.evaluate(None, None, data, preds=tmp_path / "better.jsonl", out=tmp_path / "round1" / "final")
    plot = tmp_path / "docs" / "eer.png"
    assert evaluate.main(["--compare", str(tmp_path / "sft"), str(tmp_path / "round1" / "final"),
                          "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert plot.with_suffix(".md").read_text().strip() == table.strip()
    lines = table.strip().splitlines()
    # "better": a is exact, b misses GT[3]: 1 missed of 6 events
    assert lines[2].startswith("| sft | 16.7% |") and lines[3].startswith("| round1/final | 16.7% | 0.0% | 0.0% | 16.7%")
    # the EER change against the first run, with its paired bootstrap interval over the 2 clips
    change = next(line for line in lines if line.startswith("| round1/final | 16.7% |") and " pt |" in line)
    eer = {d: load_result(tmp_path / d)["eer"] for d in ("sft", "round1/final")}
    assert f"| {100 * (eer['round1/final'] - eer['sft']):+.1f} pt |" in change
    assert "EER change against sft: paired bootstrap over the 2 clips" in table
    evaluate.compare([str(tmp_path / "sft")], labels=["SFT"], plot=tmp_path / "one.png")
    with pytest.raises(ValueError, match="--labels gives 1 names for 2 directories"):
        evaluate.compare([str(tmp_path / "sft")] * 2, labels=["x"], plot=tmp_path / "x.png")
    with pytest.raises(ValueError, match=f"{tmp_path / 'docs'}: no results.json"):
        evaluate.compare([str(tmp_path / "docs")], plot=tmp_path / "x.png")
    (tmp_path / "other").mkdir()  # results but no per-clip samples: the comparison names the missing file
    (tmp_path / "other" / "results.json").write_text((tmp_path / "sft" / "results.json").read_text())
    with pytest.raises(ValueError, match="samples.jsonl: no per-clip samples"):
        evaluate.compare([str(tmp_path / "sft"), str(tmp_path / "other")], plot=tmp_path / "x.png")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"miss": 0.1,\n "eer": }')
    assert evaluate.main(["--compare", str(tmp_path / "broken"), "--plot", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path / 'broken' / 'results.json'}:2: invalid JSON" in capsys.readouterr().err


def test_cli_captions_a_checkpoint_and_rejudges_its_predictions(synthav, tmp_path, capsys):
    from src.models.build import build_tiny

    base = build_tiny(tmp_path / "tiny", tokenizer_texts=300)
    out = tmp_path / "eval"
    args = ["--ckpt", str(base), "--data", str(synthav / "test.jsonl"), "--max-new-tokens", "4", "--out", str(out)]
    assert evaluate.main(args + ["--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["n_clips"] == 2 and result["eer"] >= 0 and set(result) == set(RESULT_KEYS)
    preds = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["test-000000", "test-000001"]
    assert all(isinstance(p["finished"], bool) for p in preds)
    recorded = json.loads((out / "judge.json").read_text())["decoding"]  # the beam search by default
    assert recorded == {"max_new_tokens": 4, "num_beams": evaluate.EVAL_NUM_BEAMS, "length_penalty": 1.0}
    assert evaluate.evaluate(None, None, synthav / "test.jsonl", preds=out / "preds.jsonl") == result
    assert "EER" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_eval_runs_the_synthav_test_split():
    dry = subprocess.run(["make", "-n", "eval", "CKPT=checkpoints/mrdpo/final"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert ("-m src.evaluate --ckpt checkpoints/mrdpo/final --data data/synthav/test.jsonl --judge synth"
            in dry.stdout)
