#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run on a single CUDA GPU (a 7B-shaped random model, bf16):
#   bash bench/gpu_checks.sh OUT_DIR [STAGES]
# STAGES (default all, in this order): env dpo4k sft dpo16k dpo1k. Each stage writes OUT_DIR/<stage>.json (its
# stderr is appended to OUT_DIR/stderr.log) and has its own time limit, so a failed or slow stage leaves the
# others' figures. One pair per DPO step: the plain path's 2 pairs at 4k exceed an H100's 80 GB.
# The 7B base is built once (26 s on an H100 machine) into $BASE_CACHE and reused by every stage. All stages
# limits: 60 + 240 + 150 + 200 + 120 s; on an H100 the first four stages of the first run took 9 min. On a machine
# without the project's packages, install them first (bench/RESULTS.md names the wheels the H100 runs used).
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
    dpo4k) stage dpo4k 240 $dpo --prompt-len 4096 --pairs 1 --steps 2 --timeout 80 ;;  # plain: 2 pairs exceed 80 GB
    sft) stage sft 150 $py bench/sft_step.py --device $dev --model $model --base-cache "$base" --prompt-len 7680 --response-len 512 --json ;;
    dpo16k) stage dpo16k 200 $dpo --prompt-len 16384 --pairs 1 --steps 2 --paths plain,fast,trl --timeout 90 ;;
    dpo1k) stage dpo1k 120 $dpo --prompt-len 1024 --pairs 1 --steps 2 --paths plain,fast --timeout 55 ;;
    *) echo "unknown stage $s" ;;
  esac
done
