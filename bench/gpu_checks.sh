#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run on a single CUDA GPU (a 7B-shaped random model, bf16):
#   bash bench/gpu_checks.sh OUT_DIR [STAGES]
# STAGES (default all, in this order): env dpo4k sft dpo16k dpo1k. Each stage writes OUT_DIR/<stage>.json (its
# stderr is appended to OUT_DIR/stderr.log) and has its own time limit, so a failed or slow stage leaves the others' figures.
# The 7B base is built once (about a minute) into $BASE_CACHE and reused by every stage.
set -u
out=${1:?usage: bench/gpu_checks.sh OUT_DIR [STAGES]}
stages=${2:-env dpo4k sft dpo16k dpo1k}
mkdir -p "$out"
py=${PYTHON:-python3}
base=${BASE_CACHE:-/tmp/bench-7b-base}
dev=${DEVICE:-cuda} model=${MODEL:-7b}  # DEVICE=cpu MODEL=tiny: a dry run of the script itself
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.err"
  echo "[$name] exit $? after $((SECONDS - t0)) s"
  grep -iE "error|Traceback|exception|out of memory" "$out/$name.err" | tail -3
  { echo "== $name"; cat "$out/$name.err"; } >>"$out/stderr.log"; rm -f "$out/$name.err"
  pkill -f "bench/(dpo|sft)_step.py" 2>/dev/null; sleep 1  # a timed-out stage's children hold GPU memory
}
dpo="$py bench/dpo_step.py --device $dev --model $model --base-cache $base --json"
for s in $stages; do
  case $s in
    env) stage env 60 $py -c "import torch, transformers, peft, lightning, av, json; print(json.dumps({'gpu': torch.cuda.get_device_name(0), 'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, 'peft': peft.__version__, 'lightning': lightning.__version__, 'av': av.__version__}))" ;;
    dpo4k) stage dpo4k 300 $dpo --prompt-len 4096 --timeout 150 ;;
    sft) stage sft 150 $py bench/sft_step.py --device $dev --model $model --base-cache "$base" --prompt-len 7680 --response-len 512 --json ;;
    dpo16k) stage dpo16k 240 $dpo --prompt-len 16384 --pairs 1 --steps 2 --paths plain,fast,trl --timeout 110 ;;
    dpo1k) stage dpo1k 150 $dpo --prompt-len 1024 --paths plain,fast --timeout 70 ;;
    *) echo "unknown stage $s" ;;
  esac
done
