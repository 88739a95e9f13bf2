"""An OpenAI-compatible chat-completions endpoint as a judge backend, with the standard library only.

    POST {base_url}/chat/completions  {"model", "messages", "temperature", "max_tokens"}
    -> {"choices": [{"message": {"content": "..."}}]}

Works with OpenAI, Azure-style proxies, vLLM / SGLang / llama.cpp servers and anything else speaking that API.
The configuration holds the NAME of the environment variable with the key (``api_key_env``), never the key; the
key is read once, sent only in the Authorization header, and scrubbed from any error text, so it reaches no log,
result file or cache. ``api_key_env=None`` sends no key (a local server).

Transport retries: HTTP 429, 5xx, timeouts and dropped connections are retried up to ``max_retries`` times,
waiting ``backoff * 2**n`` seconds (capped at ``max_backoff``; a Retry-After header is honoured within that cap).
Other HTTP errors (400, 401, 404, ...) are configuration problems and stop at once with the server's reason.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from src.judge.base import JudgeError

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclass
class LLMSettings:
    """Where and how to ask. api_key_env: the NAME of the variable holding the key (None or "": send none).
    timeout: seconds per HTTP request. max_retries: transport retries per request. max_tokens: answer cap (part of
    the cache key)."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    max_tokens: int = 2048

    def __post_init__(self):
        if self.api_key_env == "":
            self.api_key_env = None  # "" from a command line or recipe: a server without a key
        if not self.model:
            raise ValueError("the llm judge needs a model name (settings 'model', CLI --judge-model)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError("api_key_env must be the NAME of an environment variable (letters, digits, _), "
                             "not a key: put the key in the environment and give its name")


class TransientError(Exception):
    """A request that may succeed if sent again (429, 5xx, timeout, dropped connection)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class ChatClient:
    """A ChatBackend over HTTP; thread-safe (each request opens its own connection)."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.model_id = self.label = settings.model
        self.max_tokens = settings.max_tokens
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self._key = self._read_key(settings.api_key_env)
        self._lock = threading.Lock()
        self.calls = 0

    @staticmethod
    def _read_key(name: str | None) -> str | None:
        if name is None:
            return None
        key = os.environ.get(name, "")
        if not key:
            raise JudgeError(f"the llm judge's key variable {name} (api_key_env) is not set in the environment; "
                             f"export it, or set api_key_env to null for a server without a key")
        return key

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model_id!r}, api_key_env={self.settings.api_key_env!r})"

    def describe(self) -> dict:
        s = self.settings
        return {"model": s.model, "base_url": s.base_url, "api_key_env": s.api_key_env, "timeout": s.timeout,
                "max_retries": s.max_retries, "max_tokens": s.max_tokens}

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def complete(self, messages: list[dict], *, temperature: float, seed: int) -> str:
        """The answer text; retries transient failures, raises JudgeError when they persist or the request is
        refused. ``seed`` is not sent (not every server accepts it); temperature 0 is the determinism we ask."""
        body = json.dumps({"model": self.model_id, "messages": messages, "temperature": temperature,
                           "max_tokens": self.max_tokens}).encode()
        for retry in range(self.settings.max_retries + 1):
            try:
                return self._post(body)
            except TransientError as err:
                if retry == self.settings.max_retries:
                    raise JudgeError(f"{self.url}: gave up after {retry + 1} requests: {self._scrub(str(err))}") \
                        from None
                wait = min(self.settings.backoff * 2 ** retry, self.settings.max_backoff)
                if err.retry_after is not None:
                    wait = min(max(wait, err.retry_after), self.settings.max_backoff)
                logger.info("%s: %s; retrying in %.2f s", self.url, self._scrub(str(err)), wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            reason = _error_text(err)
            if err.code in RETRY_STATUSES:
                raise TransientError(f"HTTP {err.code}: {reason}", _retry_after(err)) from None
            raise JudgeError(f"{self.url}: HTTP {err.code}: {self._scrub(reason)}") from None
        except (TimeoutError, socket.timeout) as err:
            raise TransientError(f"no answer within {self.settings.timeout} s ({err})") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout, ConnectionError)):
                raise TransientError(f"connection problem: {err.reason}") from None
            raise JudgeError(f"{self.url}: cannot connect: {err.reason}") from None
        except (ConnectionError, http.client.HTTPException) as err:
            raise TransientError(f"connection dropped: {type(err).__name__}: {err}") from None
        return self._content(raw)

    def _content(self, raw: bytes) -> str:
        """choices[0].message.content of a response body; a body of another shape is retried (proxies and
        overloaded servers answer 200 with an HTML page or a truncated body)."""
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TransientError(f"response body is not a chat completion: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise TransientError(f"message content is {type(content).__name__}, not text")
        return content

    def close(self) -> None:
        pass


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read(2000).decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = " ".join(body.split())[:300]
    return message or str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
