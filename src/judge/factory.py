"""``make_judge(name, **settings)``: the one way to build a judge from configuration (CLI, recipe, rollout).

    make_judge("synth")
    make_judge("llm", model="gpt-4.1", base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
               concurrency=8, cache="runs/x/judge_cache.sqlite")
    make_judge("hf", path="checkpoints/Qwen2.5-7B-Instruct", device="cuda", retry_temperature=0.7)

Settings are the fields of LLMSettings (llm) or HFSettings (hf) plus ProtocolSettings and ``cache`` (a path, an
AnswerCache, or None for memory). An unknown setting is an error naming the valid ones, and a setting that looks
like a key itself (api_key, key, token) is refused: configuration names the environment variable, never the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from src.judge.base import Judge
from src.judge.hf import HFSettings
from src.judge.llm import LLMSettings
from src.judge.protocol import ProtocolSettings

JUDGE_NAMES = ("synth", "llm", "hf")
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


def make_judge(name: str, **settings: Any) -> Judge:
    """Build the named judge. synth takes no settings; llm needs ``model``; hf needs ``path``."""
    check_settings(name, settings)
    if name == "synth":
        from src.judge.synth import SynthJudge

        return SynthJudge()
    required = {"llm": "model", "hf": "path"}[name]
    if not settings.get(required):
        raise ValueError(f"the {name} judge needs the setting {required!r}")
    from src.judge.protocol import PromptJudge

    protocol = ProtocolSettings(**{k: v for k, v in settings.items() if k in _fields(ProtocolSettings)})
    cache = settings.get("cache")
    if name == "llm":
        from src.judge.llm import ChatClient

        backend = ChatClient(LLMSettings(**{k: v for k, v in settings.items() if k in _fields(LLMSettings)}))
    else:
        from src.judge.hf import HFChat

        backend = HFChat(HFSettings(**{k: v for k, v in settings.items() if k in _fields(HFSettings)}))
    return PromptJudge(name, backend, cache=cache, settings=protocol)
