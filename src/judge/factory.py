"""``make_judge(name, **settings)``: the one way to build a judge from configuration (CLI, recipe, rollout).

    make_judge("synth")
    make_judge("llm", model="gpt-4.1", base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
               concurrency=8, cache="runs/x/judge_cache.sqlite")
    make_judge("hf", path="checkpoints/Qwen2.5-7B-Instruct", device="cuda", retry_temperature=0.7)

Settings are the fields of LLMSettings (llm) or HFSettings (hf) plus ProtocolSettings and ``cache`` (a path, an
AnswerCache, or None for memory). An unknown setting is an error naming the valid ones, and a setting that looks
like a key itself (api_key, key, token) is refused: configuration names the environment variable, never the key.

``JudgeConfig`` is the same as a typed dataclass, for recipes read by LightningCLI / jsonargparse (a dict-typed
argument would arrive as a string there): the MrDPO rollout takes one and calls ``build()``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from src.judge.base import Judge
from src.judge.hf import HFSettings
from src.judge.llm import LLMSettings
from src.judge.protocol import ProtocolSettings

JUDGE_NAMES = ("synth", "llm", "hf")
# Captions in flight when not configured: an endpoint serves many requests at once; a local model runs one.
DEFAULT_CONCURRENCY = {"llm": 8, "hf": 1}
SECRET_NAMES = frozenset({"api_key", "key", "token", "secret", "password", "openai_api_key"})


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def setting_names(name: str) -> set[str]:
    """The settings ``make_judge(name, ...)`` accepts."""
    if name == "synth":
        return set()
    backend = {"llm": LLMSettings, "hf": HFSettings}[name]
    return _fields(backend) | _fields(ProtocolSettings) | {"cache"}


def check_settings(name: str, settings: dict[str, Any], source: str = "judge settings") -> None:
    """Raise ValueError naming ``source`` for an unknown judge, a secret-looking key or an unknown setting."""
    if name not in JUDGE_NAMES:
        raise ValueError(f"{source}: unknown judge {name!r}; choose one of {', '.join(JUDGE_NAMES)}")
    secret = sorted(k for k in settings if k.lower() in SECRET_NAMES)
    if secret:
        raise ValueError(f"{source}: {secret[0]!r} looks like a key; keys stay in the environment: set "
                         f"api_key_env to the NAME of the variable that holds it")
    unknown = sorted(set(settings) - setting_names(name))
    if unknown:
        valid = ", ".join(sorted(setting_names(name))) or "none"
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)} for the {name} judge (valid: {valid})")


@dataclass
class JudgeConfig:
    """A judge as a recipe gives it: ``name`` plus the settings of that judge; None leaves a setting at its
    default. ``api_key_env`` names the key's environment variable ("" for a server without a key). Settings of
    the other judges must stay None (a typo'd judge name would otherwise silently ignore them)."""

    name: str = "synth"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    path: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_tokens: int | None = None
    timeout: float | None = None
    max_retries: int | None = None
    backoff: float | None = None
    max_backoff: float | None = None
    concurrency: int | None = None
    parse_retries: int | None = None
    retry_temperature: float | None = None
    on_failure: str | None = None
    cache: str | None = None

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}

    def build(self, cache: str | os.PathLike | None = None) -> Judge:
        """The judge; ``cache`` (e.g. the run directory's file) is used when the config names none."""
        settings = self.settings()
        if cache is not None and self.name != "synth":
            settings.setdefault("cache", cache)
        return make_judge(self.name, **settings)


def make_judge(name: str, **settings: Any) -> Judge:
    """Build the named judge. synth takes no settings; llm needs ``model``; hf needs ``path``. Unless given,
    concurrency is DEFAULT_CONCURRENCY (llm 8, hf 1)."""
    check_settings(name, settings)
    if name == "synth":
        from src.judge.synth import SynthJudge

        return SynthJudge()
    required = {"llm": "model", "hf": "path"}[name]
    if not settings.get(required):
        raise ValueError(f"the {name} judge needs the setting {required!r}")
    from src.judge.protocol import PromptJudge

    protocol = ProtocolSettings(**{"concurrency": DEFAULT_CONCURRENCY[name],
                                   **{k: v for k, v in settings.items() if k in _fields(ProtocolSettings)}})
    cache = settings.get("cache")
    if name == "llm":
        from src.judge.llm import ChatClient

        backend = ChatClient(LLMSettings(**{k: v for k, v in settings.items() if k in _fields(LLMSettings)}))
    else:
        from src.judge.hf import HFChat

        backend = HFChat(HFSettings(**{k: v for k, v in settings.items() if k in _fields(HFSettings)}))
    return PromptJudge(name, backend, cache=cache, settings=protocol)
