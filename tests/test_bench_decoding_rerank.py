"""bench/decoding_rerank.py end to end on the tiny base and a small SynthAV split: one line per decoding choice."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "decoding_rerank.py"


def test_prints_the_rates_of_each_choice(tiny_base, synthav, capsys):
    spec = importlib.util.spec_from_file_location("decoding_rerank", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--ckpt", str(tiny_base), "--data", str(synthav / "test.jsonl"), "--k", "2",
                 "--max-new-tokens", "8", "--beams", "2", "--length-penalties", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("captioned 2 clips")
    names = [line.split(": {")[0] for line in lines[1:]]
    assert names == ["greedy", "beam search, 2 beams, length penalty 1", "best of 3, summed log-prob",
                     "best of 3, mean log-prob", "one sample"]
    for line in lines[1:]:
        rates = json.loads(line.split(": ", 1)[1])
        assert rates["n_clips"] == 2 and rates["eer"] >= 0
