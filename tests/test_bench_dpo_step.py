"""bench/dpo_step.py at toy sizes: its inputs are what it says, its paths run a step, TRL's LLM is ours.

The benchmark's figures are not checked here (timing belongs in bench/RESULTS.md); the harness is: exact prompt
and response lengths, plain == packed loss on the same batch, the text LLM given to TRL computes the AV model's
logits, the 7B shape, the ratios. One test runs the script end to end in its subprocesses (slow, opt-in).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "dpo_step.py"
PROMPT, RESPONSE = 160, 8


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_dpo_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    settings = bench.Settings(prompt_len=PROMPT, response_len=RESPONSE, pairs=2, steps=1, warmup=0, model="tiny",
                              threads=1)
    workdir = tmp_path_factory.mktemp("dpo_step")
    info = bench.prepare(settings, workdir)
    return settings, workdir, info


def test_prompt_and_responses_have_the_asked_lengths(prepared):
    settings, workdir, info = prepared
    batch = torch.load(workdir / "batch.pt", weights_only=False)
    b = settings.pairs
    assert batch["responses"] == ["chosen", "rejected", "gt"] and batch["input_ids"].shape[0] == 3 * b
    labelled = batch["labels"] != -100
    for row in range(3 * b):
        positions = labelled[row].nonzero().flatten()
        assert positions[0] == PROMPT and len(positions) == RESPONSE  # prompt of PROMPT tokens, then the response
    assert info["media_tokens"] > PROMPT / 2  # the audio-visual span dominates the prompt
    texts = json.loads((workdir / "trl_texts.json").read_text())
    from src.models.processor import AVProcessor

    tokenizer = AVProcessor.from_pretrained(workdir / "base").tokenizer
    assert len(tokenizer.encode(texts["prompt"])) == PROMPT
    assert len(tokenizer.encode(texts["prompt"] + texts["chosen"])) == PROMPT + RESPONSE - 1  # + TRL's end token


def test_plain_and_fast_paths_run_a_step_with_the_same_loss(prepared):
    settings, workdir, _ = prepared
    plain = bench.run_path("plain", settings, workdir)
    assert plain["oom"] is False and plain["pairs_per_s"] > 0 and plain["peak_mem_mb"] >= 0
    if not bench.supports_packed():
        assert "skipped" in bench.run_path("fast", settings, workdir)
        return
    fast = bench.run_path("fast", settings, workdir)
    rollout = bench.run_path("fast_rollout_ref", settings, workdir)
    # LoRA starts at B = 0: policy == reference, so both losses are log 2 + 0.1 * gt CE, on the same batch
    assert fast["loss_first_step"] == pytest.approx(plain["loss_first_step"], abs=1e-5)
    assert rollout["loss_first_step"] == pytest.approx(plain["loss_first_step"], abs=1e-5)


def test_mask_and_split_prefix_sharing_and_profile(prepared, tmp_path):
    """--prefix-sharing mask and split run the same step as the cache form; --profile writes the phases' table."""
    from dataclasses import replace

    settings, workdir, _ = prepared
    cache = bench.run_path("fast", replace(settings, prefix_sharing="cache"), workdir)
    mask = bench.run_path("fast", replace(settings, prefix_sharing="mask", profile=str(tmp_path)), workdir)
    split = bench.run_path("fast", replace(settings, prefix_sharing="split"), workdir)
    assert (cache["prefix_sharing"], mask["prefix_sharing"], split["prefix_sharing"]) == ("cache", "mask", "split")
    assert mask["loss_first_step"] == pytest.approx(cache["loss_first_step"], abs=1e-5)
    assert split["loss_first_step"] == pytest.approx(cache["loss_first_step"], abs=1e-5)
    table = (tmp_path / f"fast_{PROMPT}.txt").read_text()
    assert all(phase in table for phase in ("step: forward + loss", "step: backward", "step: clip + AdamW"))


def test_attention_packing_and_compile_options_reach_the_module(prepared):
    """--llm-attention and --pack-tokens reach DPOModule (two pairs in one packed row under eager attention: the
    cache form's loss); --compile-decoder is parsed into the settings (its step is in tests/test_packing.py)."""
    from dataclasses import replace

    settings, workdir, _ = prepared
    cache = bench.run_path("fast", settings, workdir)
    one_row = bench.run_path("fast", replace(settings, prefix_sharing="mask", llm_attention="eager",
                                             pack_tokens=settings.pairs * (PROMPT + 3 * RESPONSE)), workdir)
    assert settings.pairs == 2 and one_row["packed_rows"] == 1
    assert one_row["loss_first_step"] == pytest.approx(cache["loss_first_step"], abs=1e-5)
    args = bench.parse_args(["--llm-attention", "flex_attention", "--pack-tokens", "9000", "--compile-decoder",
                             "--prefix-sharing", "mask"])
    parsed = bench.settings_from(args)
    assert (parsed.llm_attention, parsed.pack_tokens, parsed.compile_decoder) == ("flex_attention", 9000, True)
    module = bench.build_module(replace(settings, compile_decoder=True, prefix_sharing="mask"), workdir, packed=True)
    assert module.compile_decoder and all(layer._compiled_call_impl is not None for layer in module.model.llm.layers)


def test_trl_gets_the_same_llm(prepared):
    """Qwen2ForCausalLM with the copied weights == the AV model's LLM on text (M-RoPE, three equal axes)."""
    _, workdir, _ = prepared
    from src.models.build import load_base

    av_model, processor = load_base(workdir / "base")
    text_model = bench.causal_lm_from(av_model, torch.float32).eval()
    ids = torch.tensor([processor.tokenizer.encode("a red ball rolls left while a dog barks")])
    positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        ours = av_model(input_ids=ids, position_ids=positions).logits
        theirs = text_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl lives in .venv-bench (make bench-venv)")
def test_trl_path_runs_a_step(prepared):
    settings, workdir, _ = prepared
    result = bench.run_path("trl", settings, workdir)
    assert result["oom"] is False and result["pairs_per_s"] > 0 and result["trl_version"] == "1.16.0"
    # with the reference log-probs precomputed (before the steps): the same first-step loss (LoRA B = 0, so the
    # precomputed reference equals the policy, as the per-step adapter-disabled pass does)
    pre = bench.run_path("trl_precomputed_ref", settings, workdir)
    assert pre["reference"].startswith("precomputed") and result["reference"] == "LoRA adapter disabled"
    assert pre["loss_first_step"] == pytest.approx(result["loss_first_step"], abs=1e-5)


def test_7b_shape_is_qwen2_5_vl_7b():
    from src.models.av_llm import AVLLM, parameter_summary

    config, _, _ = bench.base_config(bench.Settings(model="7b", device="cuda"))
    with torch.device("meta"):
        counts = parameter_summary(AVLLM(config))
    # Qwen2.5-VL-7B: 7.07 B in the decoder, a 545 M untied LM head, a 677 M vision tower; Whisper-large-v3's encoder
    assert round(counts["llm"] / 1e9, 2) == 7.07 and round(counts["lm_head"] / 1e6) == 545
    assert round(counts["vision"] / 1e6) == 677 and round(counts["whisper"] / 1e6) == 637


def test_ratios_skip_missing_and_oom_paths():
    results = {"plain": {"pairs_per_s": 1.0, "peak_mem_mb": 400.0, "oom": False},
               "trl": {"oom": True, "error": "out of memory"},
               "fast": {"pairs_per_s": 2.5, "peak_mem_mb": 100.0, "oom": False}}
    assert bench.ratios(results) == {"fast/plain": {"pairs_per_s": 2.5, "peak_mem_mb": 0.25},
                                     "fast/trl": {"pairs_per_s": None, "peak_mem_mb": None}}
    # the rollout-reference step against TRL with precomputed reference log-probs, when both ran
    results |= {"fast_rollout_ref": {"pairs_per_s": 3.0, "peak_mem_mb": 90.0, "oom": False},
                "trl_precomputed_ref": {"pairs_per_s": 1.2, "peak_mem_mb": 180.0, "oom": False}}
    assert bench.ratios(results)["fast_rollout_ref/trl_precomputed_ref"] == {"pairs_per_s": 2.5, "peak_mem_mb": 0.5}
    assert bench.ratios(results)["fast/trl_precomputed_ref"]["pairs_per_s"] == pytest.approx(2.083, abs=1e-3)


FREED_BLOCKS = """
import torch
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
base = rss()
first = torch.ones(2**20)  # 4 MiB: mmapped; freeing it raises glibc's own threshold above 4 MiB
del first
blocks = [torch.ones(2**20) for _ in range(32)]  # 128 MiB, now from the heap
pin = torch.ones(2**20)  # allocated last: holds the heap's top, so the freed blocks below it cannot be trimmed
del blocks
print(rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux", reason="glibc, /proc")
def test_fixed_mmap_threshold_makes_the_resident_set_follow_live_tensors():
    """Why the memory run exists: under glibc's own tuning 128 MiB of freed tensors stay resident; with the fixed
    threshold the bench's memory run uses, they are returned (only the 4 MiB still live remain)."""
    held = {}
    for name, extra in (("glibc", {}), ("fixed", bench.FIXED_MMAP_THRESHOLD)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run([sys.executable, "-c", FREED_BLOCKS], env={**env, **extra}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        held[name] = float(done.stdout)
    assert held["glibc"] > 100 and held["fixed"] < 20, held


def test_memory_run_replaces_peak_mem_on_cpu(monkeypatch):
    calls = []

    def fake_child(path, settings, workdir, timeout, memory_run):
        calls.append((settings.warmup, settings.steps, memory_run))
        return {"pairs_per_s": 1.0, "peak_mem_mb": 50.0 if memory_run else 80.0, "peak_rss_mb": 1.0,
                "baseline_rss_mb": 0.5, "oom": False}

    monkeypatch.setattr(bench, "run_child", fake_child)
    result = bench.spawn("fast", bench.Settings(warmup=2, steps=5), Path("."), None)
    assert calls == [(2, 5, False), (1, 1, True)]
    assert result["peak_mem_mb"] == 50.0 and result["peak_rss_glibc_mb"] == 80.0
    calls.clear()
    assert bench.spawn("fast", bench.Settings(memory="rss"), Path("."), None)["peak_mem_mb"] == 80.0
    assert calls == [(1, 3, False)]


def test_a_path_past_its_timeout_reports_its_last_progress(monkeypatch, tmp_path):
    """The child's per-step lines on stderr come back with a timeout (there a first step that compiles shows)."""
    def too_slow(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], stderr=b"fast: step 1/5 93.210 s\n")

    monkeypatch.setattr(bench.subprocess, "run", too_slow)
    result = bench.run_child("fast", bench.Settings(), tmp_path, 100.0, memory_run=False)
    assert result["timeout"] is True and result["last_stderr"] == ["fast: step 1/5 93.210 s"]


@pytest.mark.slow
def test_script_prints_one_json_object():
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--prompt-len", str(PROMPT), "--response-len",
               str(RESPONSE), "--pairs", "1", "--steps", "1", "--warmup", "0", "--paths", "plain,fast", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert {"plain", "fast", "ratios", "machine", "settings"} <= set(report)
    assert report["plain"]["pairs_per_s"] > 0 and report["settings"]["prompt_len"] == PROMPT
    assert report["plain"]["peak_rss_glibc_mb"] >= 0 and report["plain"]["memory_run"]["peak_mem_mb"] >= 0
    assert set(report["ratios"]["fast/plain"]) == {"pairs_per_s", "peak_mem_mb", "peak_rss_glibc_mb"}
