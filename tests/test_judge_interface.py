"""The judge interface a rollout uses (make_judge, JudgeConfig, score_batch), the protocol over an in-process
backend (order under concurrency, a dead backend stops the batch), and the answer cache."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from src.judge import JudgeConfig, JudgeError, SynthJudge, make_judge
from src.judge.cache import AnswerCache
from src.judge.protocol import PromptJudge, ProtocolSettings

GT = ["The red circle appears.", "A high beep sounds twice."]


class EchoBackend:
    """Answers the full prompt with "all events missed, N hallucinations", N read from the caption's "#N" tag,
    after a random short delay; "#dead" raises JudgeError (an endpoint that is down)."""

    model_id = label = "echo"
    max_tokens = 64

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def complete(self, messages, *, temperature, seed):
        with self.lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(random.uniform(0, 0.01))
            user = messages[-1]["content"]
            tag = user[user.index("#") + 1:].split()[0]
            if tag == "dead":
                raise JudgeError("echo: connection refused")
            n = int(tag)
            return json.dumps({"missed": len(GT), "incorrect": 0, "hallucination": n, "missed_events": GT,
                               "incorrect_events": [], "hallucinated_events": [f"thing {i}" for i in range(n)]})
        finally:
            with self.lock:
                self.in_flight -= 1

    def describe(self):
        return {"model": self.model_id}

    def close(self):
        pass


def test_batches_keep_their_order_under_bounded_concurrency():
    backend = EchoBackend()
    judge = PromptJudge("echo", backend, settings=ProtocolSettings(concurrency=4))
    items = [(f"caption #{n}", GT) for n in range(40)]
    counts = judge.score_batch(items)
    assert [c.hallucination for c in counts] == list(range(40))
    assert all(c.missed == 2 and c.correct == 0 for c in counts)
    assert 1 <= backend.max_in_flight <= 4 and backend.calls == 40
    assert judge.score_batch(items) == counts and backend.calls == 40  # the in-memory cache answers


def test_a_dead_backend_stops_the_batch():
    backend = EchoBackend()
    judge = PromptJudge("echo", backend, settings=ProtocolSettings(concurrency=2))
    items = [("caption #1", GT), ("caption #dead", GT)] + [(f"caption #{n}", GT) for n in range(2, 200)]
    with pytest.raises(JudgeError, match="connection refused"):
        judge.judge_batch(items)
    assert backend.calls < len(items)  # the rest was cancelled, not asked


def test_synth_score_batch_is_score_per_item():
    judge = make_judge("synth")
    samples = ["The red circle appears. A high beep sounds twice.", "The red circle appears.", "Nothing."]
    assert judge.score_batch([(s, GT) for s in samples]) == [SynthJudge().score(s, GT) for s in samples]
    assert [c.missed for c in judge.score_batch([(s, GT) for s in samples])] == [0, 1, 2]
    assert judge.label == "synth"


def test_make_judge_and_config_refuse_what_they_cannot_build():
    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        make_judge("gpt")
    with pytest.raises(ValueError, match="the llm judge needs the setting 'model'"):
        make_judge("llm", api_key_env=None)
    with pytest.raises(ValueError, match="the hf judge needs the setting 'path'"):
        make_judge("hf")
    with pytest.raises(ValueError, match="on_failure must be one of miss, raise"):
        make_judge("llm", model="m", api_key_env=None, on_failure="skip")
    with pytest.raises(ValueError, match="unknown setting.*model for the synth judge"):
        JudgeConfig(model="m").build()


def test_config_builds_an_llm_judge_without_contacting_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLLOUT_JUDGE_KEY", "sk-rollout-secret")
    config = JudgeConfig(name="llm", model="judge-7b", base_url="http://127.0.0.1:9/v1",
                         api_key_env="ROLLOUT_JUDGE_KEY", concurrency=3)
    with config.build(cache=tmp_path / "rollout.sqlite") as judge:
        info = judge.describe()
        assert judge.label == "llm:judge-7b" and info["concurrency"] == 3
        assert info["api_key_env"] == "ROLLOUT_JUDGE_KEY" and "sk-rollout-secret" not in repr(info)
        assert "sk-rollout-secret" not in repr(judge.backend)
    assert (tmp_path / "rollout.sqlite").is_file()
    keyless = JudgeConfig(name="llm", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="").build()
    assert keyless.backend._key is None


def test_cache_persists_and_tells_variants_apart(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = AnswerCache(path)
    cache.put("m", "prompt", "pass=0", "first")
    cache.put("m", "prompt", "pass=1", "second")
    cache.close()
    cache = AnswerCache(path)
    assert (cache.get("m", "prompt", "pass=0"), cache.get("m", "prompt", "pass=1")) == ("first", "second")
    assert cache.get("other-model", "prompt", "pass=0") is None and len(cache) == 2
    assert cache.get_or_ask("m", "prompt", "pass=0", lambda: pytest.fail("asked again")) == "first"
    assert (cache.hits, cache.misses) == (1, 0)


def test_a_corrupt_cache_file_is_named(tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=f"{path}: not a usable judge cache"):
        AnswerCache(path)
