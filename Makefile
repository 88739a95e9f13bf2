# The front door. Every target installs .venv first (through a stamp file), so a fresh clone needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYNTH  := data/synthav
SEED   ?= 0

.PHONY: install lint test test-all data base sft mrdpo mrdpo-single-round mrdpo-no-gt bench clean-venv
.PHONY: bench-venv bench-dpo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt
	touch $@

# The suite CI runs (.ci/run): lint for undefined names and unused imports (ruff's F rules; settings here, since
# ruff does not read setup.cfg), then pytest: CPU, offline; slow and GPU tests are opt-in (make test-all, -m gpu).
LINT := $(VENV)/bin/ruff check --quiet --select F --line-length 120 src tests bench

lint: $(STAMP)
	$(LINT)

test: $(STAMP)
	$(LINT)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

# SynthAV, the embedded default data set (DESIGN section 6): 8,000 / 200 / 200 clips (2,000 training clips
# overfit the tiny model: its val loss turned up after about 10 epochs). The stamp names the counts, so changing
# them regenerates the set; val and test clips do not depend on the training count.
TRAIN_CLIPS ?= 8000
SYNTH_STAMP := $(SYNTH)/.generated-$(TRAIN_CLIPS)-200-200-seed$(SEED)

data: $(SYNTH_STAMP)

$(SYNTH_STAMP): | $(STAMP)
	rm -f $(SYNTH)/.generated-*
	$(PY) -m src.data.synth --out $(SYNTH) --train $(TRAIN_CLIPS) --val 200 --test 200 --seed $(SEED)
	touch $@

# The tiny base of the embedded default: a random LLM (6 decoder layers: test EER 74% with 2, 66% with 4, 62%
# with 6, bench/RESULTS.md); its media path initialised on 64 training clips, its vision tower and Whisper encoder
# pretrained on the training clips' timelines (src/models/encoder_pretrain.py), as a real base's encoders come
# pretrained. With --clip-cache it first decodes every training and val clip into that cache (2 processes).
# BASE_SEED: the base's random init and pretraining draws, apart from the data's SEED (the run-to-run spread: test
# EER 55.4% with 0, 59.6% with 1; README, Status). Rebuild with: rm -rf checkpoints/tiny-base && make sft BASE_SEED=1
BASE_SEED ?= $(SEED)
VISION_STEPS ?= 1000
AUDIO_STEPS ?= 150
LLM_LAYERS ?= 6
base: checkpoints/tiny-base/config.json

checkpoints/tiny-base/config.json: | $(STAMP) $(SYNTH_STAMP)
	$(PY) -m src.models.build --tiny --out checkpoints/tiny-base --seed $(BASE_SEED) --calibrate $(SYNTH)/train.jsonl \
		--llm-layers $(LLM_LAYERS) --pretrain-vision-steps $(VISION_STEPS) --pretrain-audio-steps $(AUDIO_STEPS) \
		--pretrain-eval $(SYNTH)/val.jsonl --clip-cache $(SYNTH)/.clip_cache

# The main job on the embedded default: align, then SFT, export checkpoints/sft/final, judge the test split.
# SFT_ARGS: LightningCLI overrides of recipes/sft.yaml, e.g. SFT_ARGS=--trainer.max_steps=4000 (test EER 39.4%
# against the recipe's 50.9%, SFT 10 min 19 s against 8 min 17 s: past the 15 minutes; README, Status).
sft: data base
	$(PY) -m src.fit --recipe recipes/align.yaml
	$(PY) -m src.fit --recipe recipes/sft.yaml $(SFT_ARGS)
	$(PY) -m src.evaluate --ckpt checkpoints/sft/final --data $(SYNTH)/test.jsonl --judge synth

# Multi-round DPO from the SFT export (recipes/mrdpo.yaml; `make sft` first when checkpoints/sft/final is missing):
# prints the per-round caption-error table, writes runs/mrdpo/rounds.json and checkpoints/mrdpo/rounds.json, exports
# checkpoints/mrdpo/final. A killed run resumes with: $(PY) -m src.fit --recipe recipes/mrdpo.yaml --resume last
# The ablations (same budget): single-round DPO with a fixed reference, and lambda 0 (no ground-truth guidance).
SFT_EXPORT := checkpoints/sft/final/config.json

$(SFT_EXPORT):
	$(MAKE) sft

mrdpo: data | $(SFT_EXPORT)
	$(PY) -m src.fit --recipe recipes/mrdpo.yaml

mrdpo-single-round mrdpo-no-gt: data | $(SFT_EXPORT)
	$(PY) -m src.fit --recipe recipes/$(subst -,_,$@).yaml

# Judge a checkpoint on the SynthAV test split; results, report and samples land in the checkpoint directory.
#   make eval CKPT=checkpoints/mrdpo/final
#   make eval CKPT=... JUDGE=llm EVAL_ARGS="--judge-model gpt-4.1 --api-key-env OPENAI_API_KEY --passes 7"
CKPT  ?= checkpoints/sft/final
JUDGE ?= synth

.PHONY: eval
eval: data
	$(PY) -m src.evaluate --ckpt $(CKPT) --data $(SYNTH)/test.jsonl --judge $(JUDGE) $(EVAL_ARGS)

bench: $(STAMP)
	$(PY) bench/data_throughput.py

# TRL for bench/dpo_step.py only: .venv-bench = requirements.txt + bench/requirements-trl.txt (.venv stays without it).
BENCH_VENV  := .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): requirements.txt bench/requirements-trl.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet --progress-bar off -r bench/requirements-trl.txt
	touch $@

# One gDPO step, plain vs TRL's DPOTrainer vs the packed fast path: pairs/s and peak memory (bench/RESULTS.md).
#   make bench-dpo PROMPT_LEN=16384 DPO_BENCH_ARGS="--pairs 1 --steps 1"
#   make bench-dpo DPO_BENCH_ARGS="--json"
PROMPT_LEN     ?= 4096
DPO_BENCH_ARGS ?=

bench-dpo: $(BENCH_STAMP)
	$(BENCH_PY) bench/dpo_step.py --prompt-len $(PROMPT_LEN) $(DPO_BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
