"""The hf judge on a tiny random Qwen2 causal-LM directory built here (config + BPE tokenizer, no download).

A random model's answers are garbage, so this exercises the whole failure path for real: every answer is
generated, fails to parse, the fallback prompt fails too, and the caption is counted as FAILED (all events
missed) or raises, as configured; the answers are cached, and sampling on re-asks is seeded.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from src import evaluate
from src.judge import JudgeError, make_judge
from src.judge.cache import CACHE_FILE
from src.judge.hf import HFChat
from src.judge.prompts import extract_messages, fallback_messages, judge_messages
from src.models.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, special_ids, train_tiny_tokenizer

EVENTS = ["A red circle appears.", "A high beep sounds twice.", "The square moves left."]
CAPTIONS = ["A red circle appears, then a beep.", "Nothing happens at all."]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A 2-layer Qwen2 (hidden 32) with a 512-token BPE trained on the judge prompts, and Qwen's chat template."""
    path = tmp_path_factory.mktemp("tiny-judge")
    corpus = [m["content"] for c in CAPTIONS for m in judge_messages(c, EVENTS) + fallback_messages(c, EVENTS)]
    corpus += [m["content"] for m in extract_messages(CAPTIONS[0])]
    tokenizer = train_tiny_tokenizer(corpus, vocab_size=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = special_ids(tokenizer, (ENDOFTEXT, IM_END))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def hf_settings(judge_dir, **overrides) -> dict:
    return {"path": str(judge_dir), "device": "cpu", "max_tokens": 12, "parse_retries": 1, **overrides}


def test_garbage_answers_fail_cleanly_are_counted_and_cached(judge_dir, tmp_path, monkeypatch):
    """2 captions x (1 + 1 full asks + 1 + 1 fallback asks) = 8 generations; each caption FAILED with all 3 events
    missed. Greedy answers repeat on the re-ask at temperature 0: still 8 distinct cache entries (by attempt)."""
    cache = tmp_path / CACHE_FILE
    with make_judge("hf", cache=cache, **hf_settings(judge_dir)) as judge:
        details = judge.judge_batch([(c, EVENTS) for c in CAPTIONS])
        assert judge.stats() == {"requests": 8, "cache_hits": 0, "cache_misses": 8}
        assert judge.label == f"hf:{judge_dir.name}"
    for detail in details:
        assert detail.status == "failed" and detail.attempts == 4 and len(detail.problems) == 4
        c = detail.counts
        assert (c.n_gt, c.correct, c.missed, c.incorrect, c.hallucination) == (3, 0, 3, 0, 0)
        assert detail.missed == EVENTS
    assert any("full prompt" in p for p in details[0].problems)
    assert any("counts prompt" in p for p in details[0].problems)

    def no_generation(*args, **kwargs):
        raise AssertionError("the re-run must be served from the cache")

    monkeypatch.setattr(HFChat, "complete", no_generation)
    with make_judge("hf", cache=cache, **hf_settings(judge_dir)) as judge:
        assert judge.judge_batch([(c, EVENTS) for c in CAPTIONS]) == details
        assert judge.stats()["cache_hits"] == 8


def test_on_failure_raise_stops(judge_dir):
    with make_judge("hf", on_failure="raise", **hf_settings(judge_dir, parse_retries=0)) as judge:
        with pytest.raises(JudgeError, match="no usable answer after 2 tries"):
            judge.score(CAPTIONS[0], EVENTS)


def test_sampled_reasks_are_reproducible_and_leave_the_global_rng_alone(judge_dir):
    """Re-asks at temperature > 0 sample with a seed drawn from (prompt, attempt): two fresh judges read the same
    answers; the caller's torch RNG is where it was."""
    state = torch.get_rng_state()
    answers = []
    for _ in range(2):
        with make_judge("hf", retry_temperature=1.0, **hf_settings(judge_dir, max_tokens=8)) as judge:
            judge.score(CAPTIONS[0], EVENTS)
            answers.append(sorted(judge.cache._db.execute("SELECT variant, answer FROM answers").fetchall()))
    assert answers[0] == answers[1] and len(answers[0]) == 4
    assert torch.equal(torch.get_rng_state(), state)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(JudgeError, match=f"{tmp_path}: not a Hugging Face model directory"):
        make_judge("hf", path=str(tmp_path))


def test_evaluate_cli_with_the_hf_judge(judge_dir, tmp_path, capsys):
    data, preds = tmp_path / "test.jsonl", tmp_path / "preds.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "video": f"c{i}.mp4", "caption": "x", "events": EVENTS}) + "\n"
                            for i in range(2)))
    preds.write_text("".join(json.dumps({"id": f"c{i}", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    out = tmp_path / "out"
    assert evaluate.main(["--data", str(data), "--pred", str(preds), "--out", str(out), "--judge", "hf",
                          "--judge-path", str(judge_dir), "--judge-device", "cpu", "--judge-max-tokens", "8",
                          "--parse-retries", "0", "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["miss"] == 1.0 and result["eer"] == 1.0 and result["judge"] == f"hf:{judge_dir.name}"
    assert json.loads((out / "judge.json").read_text())["judgements"] == {"ok": 0, "fallback": 0, "failed": 2}
    assert "2 failures" in (out / "report.md").read_text()
    assert (out / CACHE_FILE).is_file()


def test_event_extraction_garbage_names_the_row(judge_dir, tmp_path):
    data, preds = tmp_path / "test.jsonl", tmp_path / "preds.jsonl"
    data.write_text(json.dumps({"id": "c0", "video": "c0.mp4", "caption": CAPTIONS[0]}) + "\n")
    preds.write_text(json.dumps({"id": "c0", "caption": CAPTIONS[0]}) + "\n")
    with pytest.raises(ValueError, match=rf"{data}:1: no usable event list after 2 tries"):
        evaluate.evaluate(None, None, data, judge="hf", judge_settings=hf_settings(judge_dir), preds=preds,
                          out=tmp_path / "out", extract_events=True)
