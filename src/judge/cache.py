"""Every judge answer, kept in SQLite so a re-run or a crashed run never pays for the same question twice.

A row is keyed by (judge model, prompt, variant): the model names the backend (endpoint model or local directory),
the prompt is the exact chat messages and decoding settings sent, and the variant says which ask this is for the
same prompt (the judging pass and the retry number). The variant matters: a retry after an unparsable answer must
be a new question, not a replay of the bad answer, and pass 2 of 7 must not be pass 1 again. With it, a second run
replays the first run's answer sequence exactly and sends nothing.

Only answers the backend actually returned are stored (garbage included: replaying it is what makes a re-run
identical); transport failures are not. Each answer is committed as it arrives (WAL journal), so a run killed
half-way keeps everything it paid for. Nothing secret is stored: requests hold messages and settings, never
headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

CACHE_FILE = "judge_cache.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key     TEXT PRIMARY KEY,
    model   TEXT NOT NULL,
    prompt  TEXT NOT NULL,
    variant TEXT NOT NULL,
    answer  TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def prompt_text(messages: list[dict], **decoding) -> str:
    """The canonical text of one request: messages plus the decoding settings that change the answer."""
    return json.dumps({"messages": messages, **decoding}, sort_keys=True, ensure_ascii=False)


class AnswerCache:
    """A thread-safe SQLite table of answers. ``path=None`` keeps it in memory (a rollout that judges each
    sample once has nothing to resume)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), timeout=30,
                                       check_same_thread=False)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a usable judge cache ({err}); move it away to start afresh") from None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: str, prompt: str, variant: str) -> str:
        return hashlib.sha256(json.dumps([model, prompt, variant]).encode()).hexdigest()

    def get(self, model: str, prompt: str, variant: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?",
                                   (self.key(model, prompt, variant),)).fetchone()
        return None if row is None else row[0]

    def put(self, model: str, prompt: str, variant: str, answer: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                             (self.key(model, prompt, variant), model, prompt, variant, answer, time.time()))
            self._db.commit()

    def get_or_ask(self, model: str, prompt: str, variant: str, ask: Callable[[], str]) -> str:
        """The cached answer, or ``ask()``'s (stored before it is returned). Two threads asking the same new
        question both pay; the judge never does that (each caption's questions are asked by one thread)."""
        answer = self.get(model, prompt, variant)
        if answer is not None:
            with self._lock:
                self.hits += 1
            return answer
        answer = ask()
        self.put(model, prompt, variant, answer)
        with self._lock:
            self.misses += 1
        return answer

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
