"""bench/sft_step.py at toy sizes: the batch is what it says, the Lightning run trains under FSDP2 on one rank, and
bench/dpo_step.py's base cache is reused only for the model it was built for. Timing is not checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import dpo_step, sft_step
from src.models.processor import AVProcessor

ROOT = Path(__file__).resolve().parents[1]
PROMPT, RESPONSE = 256, 32


def test_sft_batch_lengths_and_a_fsdp2_run(tmp_path):
    settings = dpo_step.Settings(prompt_len=PROMPT, response_len=RESPONSE, pairs=2, steps=1, warmup=1, model="tiny",
                                 trainable="lora,aligner,merger", checkpointing=True)
    base = dpo_step.base_dir(settings, tmp_path / "base")
    batch, info = sft_step.sft_batch(AVProcessor.from_pretrained(base), settings)
    assert batch["input_ids"].shape == (2, PROMPT + RESPONSE) and info["tokens"] == 2 * (PROMPT + RESPONSE)
    assert info["response_tokens"] == 2 * RESPONSE and 0 < info["media_tokens"] < 2 * PROMPT
    # the Lightning run in its own process: its process group and rendezvous port stay out of this one
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sft_step.py"), "--prompt-len", str(PROMPT),
                           "--response-len", str(RESPONSE), "--batch", "2", "--steps", "1", "--warmup", "1",
                           "--base-cache", str(base), "--json"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    result = report["sft"]
    assert report["settings"]["prepare_s"] < 5  # the base came from the cache
    assert result["fsdp2"] and result["tokens_per_s"] > 0 and len(result["step_s"]) == 2
    assert result["tokens"] == info["tokens"] and result["response_tokens"] == info["response_tokens"]
    assert all(torch.isfinite(torch.tensor(result["losses"]))) and result["trainable_params"] > 0


def test_base_cache_is_reused_for_the_same_model_only(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(dpo_step, "build_base", lambda settings, out: built.append(settings.prompt_len) or out)
    settings = dpo_step.Settings(prompt_len=4096, model="tiny")
    cache = tmp_path / "base"
    cache.mkdir()
    dpo_step.base_dir(settings, cache)
    assert built == [dpo_step.CACHED_BASE_POSITIONS // 2]  # built for up to 16k prompts, whatever asked first
    dpo_step.base_dir(dpo_step.replace(settings, prompt_len=16384), cache)
    assert len(built) == 1
    dpo_step.base_dir(dpo_step.replace(settings, prompt_len=32768), cache)  # longer than it was built for
    dpo_step.base_dir(dpo_step.replace(settings, prompt_len=32768, seed=1), cache)  # another model
    assert built[1:] == [32768, 32768]
    assert json.loads((cache / "bench_base.json").read_text())["seed"] == 1
