"""Chat backends the LLM judges and the event extractor talk to, and the cache in front of them.

A backend turns chat messages into one answer string: ``llm.ChatClient`` over an OpenAI-compatible HTTP endpoint,
``hf.HFChat`` with a local Hugging Face causal LM. ``CachedChat`` puts an ``AnswerCache`` in front, so everything
above it (the judging protocol, event extraction) is written once for both.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from src.judge.cache import AnswerCache, prompt_text

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]


class ChatBackend(Protocol):
    """``model_id`` names the answering model in the cache (endpoint model name, or the local directory);
    ``label`` is its short name in results ("gpt-4.1", a directory's name);
    ``max_tokens`` caps each answer (part of the cache key: it changes answers); ``calls`` counts the requests
    actually sent (HTTP requests including retries, or generate() calls)."""

    model_id: str
    label: str
    max_tokens: int
    calls: int

    def complete(self, messages: Messages, *, temperature: float, seed: int) -> str:
        """One answer. ``seed`` makes sampling reproducible where the backend samples (temperature > 0)."""

    def describe(self) -> dict:
        """Identity and settings for reports; never a secret."""

    def close(self) -> None:
        ...


class CachedChat:
    """Asks a backend through an AnswerCache."""

    def __init__(self, backend: ChatBackend, cache: AnswerCache):
        self.backend = backend
        self.cache = cache

    def ask(self, messages: Messages, *, temperature: float, variant: str) -> str:
        """The answer to ``messages`` for this ``variant`` (e.g. "pass=2 attempt=0"), from the cache when asked
        before. The sampling seed derives from the prompt and variant, so a sampled answer is reproducible too."""
        prompt = prompt_text(messages, temperature=temperature, max_tokens=self.backend.max_tokens)
        seed = int.from_bytes(hashlib.sha256(f"{variant}\n{prompt}".encode()).digest()[:4], "little")
        return self.cache.get_or_ask(self.backend.model_id, prompt, variant,
                                     lambda: self.backend.complete(messages, temperature=temperature, seed=seed))
