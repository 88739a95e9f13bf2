"""A local Hugging Face causal-LM directory as a judge backend, fully offline.

    make_judge("hf", path="checkpoints/Qwen2.5-7B-Instruct", device="cuda", dtype="bfloat16")

The directory is loaded with AutoModelForCausalLM / AutoTokenizer, ``local_files_only=True`` and
``trust_remote_code=False``: no network, no code from the directory. Messages are rendered with the tokenizer's
chat template (a directory without one gets plain "role: content" turns and a warning, since an instruction model
without its template answers worse). Decoding is greedy at temperature 0 and seeded sampling above it, one prompt
at a time: judge prompts are long and few, and greedy answers must not depend on batch padding.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from src.judge.base import JudgeError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFSettings:
    """path: the model directory. device: "cpu", "cuda", "cuda:1", ... dtype: "auto" (the directory's, float32 on
    CPU) or one of DTYPES. max_tokens: new tokens per answer (part of the cache key)."""

    path: str
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"
    max_tokens: int = 1024

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")


class HFChat:
    """A ChatBackend generating with a local causal LM. Calls are serialised (one model, one device)."""

    def __init__(self, settings: HFSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        path = Path(settings.path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise JudgeError(f"{settings.path}: not a Hugging Face model directory (no config.json)")
        self.model_id = f"hf:{path}"
        self.label = path.name
        self.max_tokens = settings.max_tokens
        self.calls = 0
        self._lock = threading.Lock()
        dtype = DTYPES.get(settings.dtype, "auto" if settings.device != "cpu" else torch.float32)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                              dtype=dtype)
        except (OSError, ValueError) as err:
            raise JudgeError(f"{settings.path}: cannot load the judge model offline: {err}") from None
        self.model.to(settings.device).eval()
        if self.tokenizer.chat_template is None:
            logger.warning("%s has no chat template: prompts are rendered as plain 'role: content' turns", path)
        self._eos = self._end_ids()

    def _end_ids(self) -> list[int]:
        """Tokens that end an answer: the generation config's eos ids and the tokenizer's eos."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def describe(self) -> dict:
        return {"model": self.model_id, "device": self.settings.device, "dtype": self.settings.dtype,
                "max_tokens": self.max_tokens}

    def _prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        if self.tokenizer.chat_template is not None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.settings.device)

    @torch.no_grad()
    def complete(self, messages: list[dict], *, temperature: float, seed: int) -> str:
        with self._lock:
            self.calls += 1
            input_ids = self._prompt_ids(messages)
            sampling = {"do_sample": False}
            if temperature > 0:
                sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0}
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self._eos or [0])[0]
            cuda = self.settings.device.startswith("cuda")
            # generate() samples from the global generator: seed a forked one, so the caller's RNG (a training
            # run's) is left as it was
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
                torch.manual_seed(seed)
                out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                          max_new_tokens=self.max_tokens, eos_token_id=self._eos or None,
                                          pad_token_id=pad, top_k=None, **sampling)
            return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    def close(self) -> None:
        self.model = None
        if self.settings.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
