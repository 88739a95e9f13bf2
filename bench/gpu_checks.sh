#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run on a single CUDA GPU (a 7B-shaped random model, bf16):
#   bash bench/gpu_checks.sh OUT_DIR [STAGES]
# STAGES (default: env dpo4k sft dpo16k dpo1k, in this order; also dpo4k2 mask4k2 nockpt4k2 fp4k2 fp1k2 fx4k
# fx4kplain fx1k mc4k f4k sp4k2 sp1k2 c4k2 sp16k sp1k1 sp4k1 sxc4k2 rr4k2 rr16k rm4k2 rmc4k2 rm16k rmall4k2 rmm4k2,
# below). PROFILE=1:
# dpo4k also writes one profiled step of each of our paths to OUT_DIR/<path>_4096.txt (bench/dpo_step.py --profile).
# Each stage writes OUT_DIR/<stage>.json (its stderr is appended to OUT_DIR/stderr.log) and has its own time limit,
# so a failed or slow stage leaves the others' figures. The default stages take one pair per DPO step (the plain
# path's 2 pairs at 4k ran out of memory while the benchmark's parent process still held the 7B it had just built;
# fixed since: fp4k2 runs them in 43.5 GB). The 7B base is built once (26 s on an H100 machine) into $BASE_CACHE
# and reused by every stage.
# Stage limits: 30 + 250 + 150 + 200 + 100 s (+ 170 + 60 + 60); on an H100 (2026-11-27) the default stages took
# 20 + 189 + 32 + 108 + 54 s and dpo4k2 mask4k2 nockpt4k2 168 + 50 + 46 s, plus about 1 min to start the machine.
# "fast" is DPOModule's default prefix sharing: the split form since 2026-11-27, the cache form in earlier runs.
# On a machine without the project's packages, install them first (bench/RESULTS.md names the wheels).
set -u
out=${1:?usage: bench/gpu_checks.sh OUT_DIR [STAGES]}
stages=${2:-env dpo4k sft dpo16k dpo1k}
mkdir -p "$out"
py=${PYTHON:-python3}
base=${BASE_CACHE:-/tmp/bench-7b-base}
dev=${DEVICE:-cuda} model=${MODEL:-7b} profile=${PROFILE:+--profile $out}  # DEVICE=cpu MODEL=tiny: a dry run of the script itself
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.err"
  echo "[$name] exit $? after $((SECONDS - t0)) s"
  grep -iE "error|Traceback|exception|out of memory" "$out/$name.err" | tail -3
  { echo "== $name"; cat "$out/$name.err"; } >>"$out/stderr.log"; rm -f "$out/$name.err"
  pkill -f "^[^ ]*python[^ ]* [^ ]*bench/(dpo|sft)_step.py" 2>/dev/null; sleep 1  # a timed-out stage's children
  # hold GPU memory; the pattern names the interpreter so that a calling shell whose command line mentions a bench
  # script is spared (a bare "bench/dpo_step.py" killed the device call's own shell on 2026-11-27)
}
dpo="$py bench/dpo_step.py --device $dev --model $model --base-cache $base --json"
for s in $stages; do
  case $s in
    env) stage env 30 $py -c "import torch, transformers, peft, lightning, av, json; print(json.dumps({'gpu': torch.cuda.get_device_name(0), 'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, 'peft': peft.__version__, 'lightning': lightning.__version__, 'av': av.__version__}))" ;;
    dpo4k) stage dpo4k 250 $dpo --prompt-len 4096 --pairs 1 --steps 2 --timeout 80 $profile ;;  # 2 pairs per step: dpo4k2
    sft) stage sft 150 $py bench/sft_step.py --device $dev --model $model --base-cache "$base" --prompt-len 7680 --response-len 512 --json ;;
    dpo16k) stage dpo16k 200 $dpo --prompt-len 16384 --pairs 1 --steps 2 --paths plain,fast,trl --timeout 90 ;;
    dpo1k) stage dpo1k 100 $dpo --prompt-len 1024 --pairs 1 --steps 2 --paths plain,fast --timeout 45 ;;
    # 2 pairs per step (3 timed steps): the three paths, then the fast path with the mask form of prefix sharing
    # (one packed row per pair: half the kernel launches of the cache form) and without activation checkpointing
    dpo4k2) stage dpo4k2 170 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast,trl,plain --timeout 60 ;;
    mask4k2) stage mask4k2 60 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast --prefix-sharing mask --timeout 55 ;;
    nockpt4k2) stage nockpt4k2 60 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast --no-checkpointing --timeout 55 ;;
    # 2 pairs per step, fast and plain side by side (no TRL: 110 + 70 s on an H100)
    fp4k2) stage fp4k2 130 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast,plain --timeout 60 ;;
    fp1k2) stage fp1k2 90 $dpo --prompt-len 1024 --pairs 2 --steps 3 --paths fast,plain --timeout 40 ;;
    # the mask form with each decoder layer compiled (DPOModule compile_decoder; one graph for all layers, compiled
    # in the 2 warm-up steps) under FlexAttention (fx4k; fx4kplain and fx1k give plain the same settings) or SDPA's
    # dense mask (mc4k); f4k: FlexAttention alone (transformers compiles its kernel). On an H100 (2026-11-27) the
    # compiled fast path ran past per-path limits of 140 s and 115 s (7B load, compile, 5 steps), and the stage's
    # limit then cut the JSON off; each stage's limit now covers its paths' --timeout, and a path that runs past it
    # reports its last steps' times (last_stderr), where the compile shows.
    fx4k) stage fx4k 440 $dpo --prompt-len 4096 --pairs 1 --steps 3 --warmup 2 --paths fast --prefix-sharing mask --llm-attention flex_attention --compile-decoder --timeout 400 ;;
    fx4kplain) stage fx4kplain 440 $dpo --prompt-len 4096 --pairs 1 --steps 3 --warmup 2 --paths plain --prefix-sharing mask --llm-attention flex_attention --compile-decoder --timeout 400 ;;
    fx1k) stage fx1k 440 $dpo --prompt-len 1024 --pairs 1 --steps 3 --warmup 2 --paths fast,plain --prefix-sharing mask --llm-attention flex_attention --compile-decoder --timeout 200 ;;
    mc4k) stage mc4k 440 $dpo --prompt-len 4096 --pairs 1 --steps 3 --warmup 2 --paths fast --prefix-sharing mask --compile-decoder --timeout 400 ;;
    f4k) stage f4k 240 $dpo --prompt-len 4096 --pairs 1 --steps 3 --warmup 2 --paths fast --prefix-sharing mask --llm-attention flex_attention --timeout 200 ;;
    # the split form (DPOModule prefix_sharing="split", the default since 2026-11-27: the mask form's rows, SDPA
    # with the prompt causal, the flash kernel, and a mask for the responses only) beside plain (and TRL at 4k 2
    # pairs and 16k), and the cache form alone on the same machine. On an H100 (2026-11-27) sp4k2 c4k2 sp16k sp1k2
    # took 154 + 46 + 113 + 63 s, sp4k1 69 s and sp1k1 74 s on a warm machine; the first stage of a fresh machine
    # also builds the 7B base (about 40 s), which sp1k1's old 90 s limit did not cover.
    sp4k2) stage sp4k2 260 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast,plain,trl --prefix-sharing split --timeout 80 ;;
    sp1k2) stage sp1k2 110 $dpo --prompt-len 1024 --pairs 2 --steps 3 --paths fast,plain --prefix-sharing split --timeout 50 ;;
    c4k2) stage c4k2 80 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast --prefix-sharing cache --timeout 70 ;;
    sp16k) stage sp16k 220 $dpo --prompt-len 16384 --pairs 1 --steps 2 --paths fast,plain,trl --prefix-sharing split --timeout 90 ;;
    sp1k1) stage sp1k1 130 $dpo --prompt-len 1024 --pairs 1 --steps 3 --paths fast,plain --prefix-sharing split --timeout 45 ;;
    sp4k1) stage sp4k1 120 $dpo --prompt-len 4096 --pairs 1 --steps 3 --paths fast,plain --prefix-sharing split --timeout 60 ;;
    # the default split form with each decoder layer compiled (one graph for all layers and prompt prefixes on the
    # CPU, tests/test_packing.py); on an H200 (2026-11-27, after rr4k2 on the same machine) 1.537 pairs/s against
    # 1.365 uncompiled, its first warm-up step (the compile) 110 s, the stage 160 s
    sxc4k2) stage sxc4k2 440 $dpo --prompt-len 4096 --pairs 2 --steps 3 --warmup 2 --paths fast --compile-decoder --timeout 400 ;;
    # the step MrDPO runs (DESIGN section 7: reference log-probs from the rollout, no reference pass), split form,
    # beside TRL with its reference log-probs precomputed (the same shortcut), and fast (with its reference pass),
    # plain and TRL as they are measured above. On an H200 (2026-11-27) rr4k2 took 246 s with the 7B base built
    # first, and trl_precomputed_ref ran past an 80 s per-path limit: alone it took 91 s (7B load, the reference
    # log-probs computed through TRL's dataset machinery, 4 steps), hence 130 s
    rr4k2) stage rr4k2 480 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast_rollout_ref,trl_precomputed_ref,fast,plain,trl --prefix-sharing split --timeout 130 ;;
    rr16k) stage rr16k 480 $dpo --prompt-len 16384 --pairs 1 --steps 2 --paths fast_rollout_ref,trl_precomputed_ref,fast,trl --prefix-sharing split --timeout 130 ;;
    # the MrDPO step with the rollout's frozen encoder outputs too (fast_rollout_media: DPOModule's media cache,
    # filled by the rollout's pass) beside the same step running the encoders (fast_rollout_ref) and TRL; then
    # the same step with each decoder layer compiled
    rm4k2) stage rm4k2 420 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast_rollout_media,fast_rollout_ref,trl --prefix-sharing split --timeout 130 ;;
    rmc4k2) stage rmc4k2 330 $dpo --prompt-len 4096 --pairs 2 --steps 3 --warmup 2 --paths fast_rollout_media --compile-decoder --timeout 300 ;;
    # not yet run: every path in one run at 4k (rm4k2 had no plain; ~300 s), and the paper's DPO set, where the
    # merger trains and the video part keeps the frozen tower's output (video_stage "tower")
    rmall4k2) stage rmall4k2 480 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast_rollout_media,fast_rollout_ref,fast,plain,trl,trl_precomputed_ref --prefix-sharing split --timeout 130 ;;
    rmm4k2) stage rmm4k2 200 $dpo --prompt-len 4096 --pairs 2 --steps 3 --paths fast_rollout_media,fast_rollout_ref --trainable lora,aligner,merger --prefix-sharing split --timeout 90 ;;
    rm16k) stage rm16k 330 $dpo --prompt-len 16384 --pairs 1 --steps 2 --paths fast_rollout_media,fast_rollout_ref,trl --prefix-sharing split --timeout 100 ;;
    *) echo "unknown stage $s" ;;
  esac
done
