"""The llm judge against a real OpenAI-compatible HTTP server on 127.0.0.1, scripted per clip: good answers,
malformed JSON, inconsistent counts, 429, 500, a too-slow answer, a judge that only answers the counts-only
fallback, and one that never answers usably. The judge must retry, fall back, count each clip once, make zero
requests on a re-run (the cache), keep at most `concurrency` requests in flight, and never write the key."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from src import evaluate
from src.judge import JudgeError, make_judge, rates
from src.judge.cache import CACHE_FILE, AnswerCache
from src.judge.prompts import EXTRACT_SYSTEM, FALLBACK_SYSTEM, JUDGE_SYSTEM

KEY_ENV = "TEST_JUDGE_API_KEY"
SYSTEM_KIND = {JUDGE_SYSTEM: "full", FALLBACK_SYSTEM: "counts", EXTRACT_SYSTEM: "extract"}


def full(missed: list[str], incorrect: list[tuple[str, str]], hallucinated: list[str], *, fence=False) -> str:
    """A well-formed full answer whose counts match its lists."""
    text = json.dumps({"missed": len(missed), "incorrect": len(incorrect), "hallucination": len(hallucinated),
                       "missed_events": missed,
                       "incorrect_events": [{"event": e, "caption": c} for e, c in incorrect],
                       "hallucinated_events": hallucinated})
    return f"Here is my evaluation:\n```json\n{text}\n```" if fence else text


def counts(correct: int, missed: int, incorrect: int, hallucination: int) -> str:
    return json.dumps({"correct": correct, "missed": missed, "incorrect": incorrect, "hallucination": hallucination})


class JudgeServer:
    """POST /v1/chat/completions. ``script[(clip, kind)]`` is the list of replies for that clip's prompt kind
    (full / counts / extract), consumed in order (the last repeats). The clip is the "[name]" tag in the user
    message. A reply is an answer string, an int HTTP status, or ("slow", seconds, answer). Requests with another
    key get 401 with a body that (hostilely) echoes the Authorization header."""

    def __init__(self, script: dict, key: str):
        self.script, self.key = script, key
        self.requests: list[tuple[str, str]] = []  # (clip, kind) of each authorised request
        self.received = 0  # every request, refused ones included
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def count(self, clip: str | None = None, kind: str | None = None) -> int:
        return sum(1 for c, k in self.requests if (clip is None or c == clip) and (kind is None or k == kind))

    def _reply(self, clip: str, kind: str):
        with self.lock:
            seen = self.count(clip, kind)
            self.requests.append((clip, kind))
        replies = self.script[(clip, kind)]
        return replies[min(seen, len(replies) - 1)]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.received += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
            if h.path != "/v1/chat/completions":
                return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            if h.headers.get("Authorization") != f"Bearer {self.key}":
                return self._send(h, 401, {"error": {"message": f"bad credentials: {h.headers.get('Authorization')}"}})
            assert body["temperature"] == 0.0 and body["model"] == "judge-model"
            system, user = body["messages"][0]["content"], body["messages"][1]["content"]
            clip = user[user.index("[") + 1:user.index("]")]
            reply = self._reply(clip, SYSTEM_KIND[system])
            if isinstance(reply, int):
                return self._send(h, reply, {"error": {"message": "try later"}}, {"Retry-After": "0"})
            if isinstance(reply, tuple):
                time.sleep(reply[1])
                reply = reply[2]
            self._send(h, 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow answer
        finally:
            with self.lock:
                self.in_flight -= 1

    @staticmethod
    def _send(h, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key(monkeypatch) -> str:
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, secret)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return secret


@pytest.fixture
def serve(key):
    servers = []

    def start(script: dict) -> JudgeServer:
        servers.append(JudgeServer(script, key))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def llm_settings(server: JudgeServer, **overrides) -> dict:
    return {"model": "judge-model", "base_url": server.url, "api_key_env": KEY_ENV, "timeout": 0.3,
            "max_retries": 3, "backoff": 0.01, "max_backoff": 0.05, "parse_retries": 2, "concurrency": 3,
            **overrides}


def assert_no_key(key: str, *texts: str, folder=None) -> None:
    for text in texts:
        assert key not in text
    for path in (folder.rglob("*") if folder is not None else []):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


# Seven clips, 23 ground-truth events; what the scripted judge says about each.
EVENTS = {
    "good": ["A dog barks.", "A man enters.", "The door closes.", "Music plays."],
    "bad-json": ["A bell rings.", "A car passes.", "Rain falls."],
    "r429": ["A baby cries.", "A phone rings."],
    "r500": ["A bird sings.", "Wind blows.", "A cat jumps.", "A glass breaks.", "Someone laughs."],
    "slow": ["A train arrives.", "People talk.", "A whistle blows."],
    "fallback": ["A drum plays.", "A crowd cheers.", "Lights flash.", "A singer bows."],
    "failed": ["Water drips.", "A clock ticks."],
}
CAPTIONS = {clip: f"[{clip}] A caption of the {clip} clip. It describes things." for clip in EVENTS}
SCRIPT = {
    ("good", "full"): [full(["Music plays."], [("The door closes.", "The door opens")], ["A cat sleeps", "Snow"])],
    ("bad-json", "full"): ['```json\n{"missed": 1, "incorrect": 0,, }\n```',  # malformed JSON
                           full([], [], []).replace('"hallucination": 0', '"hallucination": 2'),  # counts != lists
                           full([], [], ["A horse runs"], fence=True)],
    ("r429", "full"): [429, full(["A baby cries.", "A phone rings."], [], [])],
    ("r500", "full"): [500, 503, full([], [("A bird sings.", "A crow caws"), ("Wind blows.", "Rain falls")], [])],
    ("slow", "full"): [("slow", 1.0, full([], [], [])),  # arrives after the 0.3 s timeout: never counted
                       full(["People talk."], [("A whistle blows.", "A horn sounds")], ["A dog"])],
    ("fallback", "full"): ["The caption is quite good overall."],
    ("fallback", "counts"): [counts(1, 2, 1, 3)],
    ("failed", "full"): ["{}"],
    ("failed", "counts"): [counts(5, 0, 0, 0)],  # 5 + 0 + 0 != 2 events
}


def judge_all(judge) -> list:
    return judge.judge_batch([(CAPTIONS[clip], EVENTS[clip]) for clip in EVENTS])


def test_protocol_retries_falls_back_counts_once_and_caches(serve, key, tmp_path, caplog, capsys):
    """Per clip (n_gt, missed, incorrect, hallucination) from the script:
    good (4, 1, 1, 2); bad-json (3, 0, 0, 1) on the 3rd answer; r429 (2, 2, 0, 0); r500 (5, 0, 2, 0);
    slow (3, 1, 1, 1) from the answer after the timeout; fallback (4, 2, 1, 3) counts only;
    failed (2, 2, 0, 0): every event missed.
    Sums: n_gt 23, missed 1+0+2+0+1+2+2 = 8, incorrect 1+0+0+2+1+1+0 = 5, hallucination 2+1+0+0+1+3+0 = 7;
    miss 8/23, incorrect 5/23, hallucination 7/23, EER 20/23.
    Judge answers read: good 1, bad-json 3, r429 1, r500 1, slow 1, fallback 3 full + 1 counts, failed 3 + 3 = 17;
    HTTP requests: those 17 plus the transport retries (r429 1, r500 2, slow 1) = 21."""
    caplog.set_level(logging.DEBUG)
    server = serve(SCRIPT)
    cache = tmp_path / CACHE_FILE
    with make_judge("llm", cache=cache, **llm_settings(server)) as judge:
        details = judge_all(judge)
        assert judge.stats() == {"requests": 21, "cache_hits": 0, "cache_misses": 17}
    assert server.count() == 21
    assert {clip: server.count(clip) for clip in EVENTS} == {
        "good": 1, "bad-json": 3, "r429": 2, "r500": 3, "slow": 2, "fallback": 4, "failed": 6}
    by_clip = dict(zip(EVENTS, details))
    got = {clip: (d.counts.n_gt, d.counts.missed, d.counts.incorrect, d.counts.hallucination)
           for clip, d in by_clip.items()}
    assert got == {"good": (4, 1, 1, 2), "bad-json": (3, 0, 0, 1), "r429": (2, 2, 0, 0), "r500": (5, 0, 2, 0),
                   "slow": (3, 1, 1, 1), "fallback": (4, 2, 1, 3), "failed": (2, 2, 0, 0)}
    assert [d.status for d in details] == ["ok"] * 5 + ["fallback", "failed"]
    assert [d.attempts for d in details] == [1, 3, 1, 1, 1, 4, 6]
    assert all(d.counts.correct + d.counts.missed + d.counts.incorrect == d.counts.n_gt for d in details)
    assert by_clip["good"].incorrect == [("The door closes.", "The door opens")]
    assert by_clip["good"].hallucinated == ["A cat sleeps", "Snow"]
    assert "no JSON object" in by_clip["bad-json"].problems[0] and "holds 0" in by_clip["bad-json"].problems[1]
    assert by_clip["failed"].missed == EVENTS["failed"] and len(by_clip["failed"].problems) == 6
    r = rates(d.counts for d in details)
    assert r["miss"] == pytest.approx(8 / 23) and r["incorrect"] == pytest.approx(5 / 23)
    assert r["hallucination"] == pytest.approx(7 / 23) and r["eer"] == pytest.approx(20 / 23)
    assert server.max_in_flight <= 3

    # the re-run: every answer, garbage included, replays from the cache; the server sees nothing
    with make_judge("llm", cache=cache, **llm_settings(server)) as judge:
        again = judge_all(judge)
        assert judge.stats() == {"requests": 0, "cache_hits": 17, "cache_misses": 0}
    assert server.count() == 21
    assert again == details
    assert_no_key(key, caplog.text, *capsys.readouterr(), folder=tmp_path)


def test_passes_are_new_questions_and_the_median_eer_pass_is_reported(serve, key, tmp_path, capsys):
    """One clip of 4 events judged 3 times; the judge says EER (missed + incorrect + hallucination) / 4 =
    pass 1: (2+1+1)/4 = 1.0, pass 2: 1/4 = 0.25, pass 3: 2/4 = 0.5. Sorted: 0.25, 0.5, 1.0: the median is pass 3."""
    events = EVENTS["good"]
    server = serve({("good", "full"): [full(events[:2], [(events[2], "x")], ["y"]), full([events[0]], [], []),
                                       full([events[0]], [], ["z"])]})
    data, preds = write_set(tmp_path, {"good": events}, {"good": CAPTIONS["good"]})
    out = tmp_path / "out"
    args = ["--data", str(data), "--pred", str(preds), "--out", str(out), "--judge", "llm", "--judge-model",
            "judge-model", "--base-url", server.url, "--api-key-env", KEY_ENV, "--passes", "3", "--quiet"]
    assert evaluate.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    info = json.loads((out / "judge.json").read_text())
    assert result["eer"] == pytest.approx(0.5) and result["judge"] == "llm:judge-model"
    assert [p["eer"] for p in info["passes"]] == pytest.approx([1.0, 0.25, 0.5]) and info["reported_pass"] == 2
    assert info["judge"]["api_key_env"] == KEY_ENV and info["stats"]["requests"] == 3
    assert "reported: pass 3" in (out / "report.md").read_text()
    assert evaluate.main(args) == 0 and server.count() == 3  # all three passes cached
    assert_no_key(key, *capsys.readouterr(), folder=tmp_path)


def write_set(folder, events: dict, captions: dict, *, with_events=True):
    """A manifest (media paths that need not exist: --pred never decodes) and a predictions file."""
    data, preds = folder / "test.jsonl", folder / "preds.jsonl"
    data.write_text("".join(json.dumps({"id": clip, "video": f"{clip}.mp4", "caption": f"[{clip}] {' '.join(ev)}",
                                        **({"events": ev} if with_events else {})}) + "\n"
                            for clip, ev in events.items()))
    preds.write_text("".join(json.dumps({"id": clip, "caption": c}) + "\n" for clip, c in captions.items()))
    return data, preds


def test_wrong_key_stops_at_once_and_the_echoed_key_is_scrubbed(serve, key, monkeypatch, tmp_path):
    server = serve(SCRIPT)
    monkeypatch.setenv("OTHER_KEY", key + "-wrong")
    with make_judge("llm", cache=tmp_path / CACHE_FILE, **llm_settings(server, api_key_env="OTHER_KEY")) as judge:
        with pytest.raises(JudgeError, match="HTTP 401") as err:
            judge.score(CAPTIONS["good"], EVENTS["good"])
    assert server.received == 1  # a refused key is not retried
    assert key not in str(err.value) and "***" in str(err.value)
    assert_no_key(key, folder=tmp_path)


def test_persistent_server_errors_give_up_and_cache_nothing(serve, key, tmp_path):
    server = serve({("good", "full"): [500]})
    with make_judge("llm", cache=tmp_path / CACHE_FILE, **llm_settings(server, max_retries=2)) as judge:
        with pytest.raises(JudgeError, match="gave up after 3 requests: HTTP 500"):
            judge.score(CAPTIONS["good"], EVENTS["good"])
    assert server.count() == 3 and len(AnswerCache(tmp_path / CACHE_FILE)) == 0


def test_missing_key_variable_and_keys_in_config_are_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_JUDGE_KEY .* is not set"):
        make_judge("llm", model="m", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(ValueError, match="'api_key' looks like a key"):
        make_judge("llm", model="m", api_key="sk-123")
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        make_judge("llm", model="m", api_key_env="sk-abc.def/ghi")
    with pytest.raises(ValueError, match="unknown setting.*tempreature"):
        make_judge("llm", model="m", api_key_env=None, tempreature=0)
    config = tmp_path / "judge.yaml"
    config.write_text("model: m\napi_key: sk-123\n")
    with pytest.raises(SystemExit):
        evaluate.main(["--data", "x.jsonl", "--pred", "p.jsonl", "--out", str(tmp_path), "--judge", "llm",
                       "--judge-config", str(config)])


def test_extract_events_then_judge(serve, key, tmp_path):
    """Rows without events: the extractor's first answer is garbage, the second a list of 2 events; the judge
    then gets those 2 events and answers 1 missed: EER 1/2."""
    server = serve({("ev", "extract"): ["Sure! The events are: a dog and a man.", '["A dog barks.", "A man talks."]'],
                    ("ev", "full"): [full(["A man talks."], [], [])]})
    data, preds = write_set(tmp_path, {"ev": ["unused"]}, {"ev": "[ev] A dog barks."}, with_events=False)
    result = evaluate.evaluate(None, None, data, judge="llm", judge_settings=llm_settings(server), preds=preds,
                               out=tmp_path / "out", extract_events=True)
    assert result["eer"] == pytest.approx(0.5) and result["n_clips"] == 1
    written = json.loads((tmp_path / "out" / "events.jsonl").read_text())
    assert written["events"] == ["A dog barks.", "A man talks."]
    assert server.count("ev", "extract") == 2


def test_extraction_that_never_parses_names_the_row(serve, key, tmp_path):
    server = serve({("ev", "extract"): ["no idea"]})
    data, preds = write_set(tmp_path, {"ev": ["unused"]}, {"ev": "[ev] A dog barks."}, with_events=False)
    with pytest.raises(ValueError, match=rf"{data}:1: no usable event list after 3 tries"):
        evaluate.evaluate(None, None, data, judge="llm", judge_settings=llm_settings(server), preds=preds,
                          out=tmp_path / "out", extract_events=True)
