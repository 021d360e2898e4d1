#!/usr/bin/env bash
# The GPU suite on a GPU machine, from the repository root:  bench/gpu_suite.sh [STAGE...] [--dry-run]
#   quick   the bring-up run, everything below bounded to 9 minutes in all (docs/GPU_SUITE.md has the budget):
#           build for this GPU, GPU-only tests + a slice of the rest (junit.xml), verify on CUDA for backends cuda
#           and triton, the model benchmark (ResNet-50 and ResNet-18, train and infer, bf16 autocast,
#           channels_last, batch 256, eager / cuda / compile / triton in one process per model), then
#           results.json and summary.md. Triton convs use the heuristic autotune mode (no benchmarking).
#           --dry-run rehearses it on a CPU: tiny sizes, the Triton interpreter, the extension's CPU path.
#   tests   build the CUDA extension for this GPU, run every test (GPU tests included)
#   verify  `fused-resnet verify` on CUDA in several dtypes and layouts
#   bench   the extension's kernels (GB/s vs the copy ceiling; BN+ReLU units vs eager / torch.compile), bn_act
#           kernels, the conv engine (every ResNet-50 conv shape, fprop/dgrad/wgrad vs cuDNN), a chained
#           unit's backward with its input written by dgrad vs recomputed by wgrad, and ResNet-50 inference, each beside eager PyTorch / torch.compile / cuDNN measured in the same run
#   models  `fused-resnet bench`: resnet18 and resnet50 training and inference, every provider, with the
#           per-block chart (its folder comes back as bench_models.tar.gz)
#   micro   bench/test_microbench.py (pytest-benchmark) on ResNet-50's shapes, report in micro.json
#   parity  bench/bench_parity.py: resnet50 bf16, 200 SGD steps, backend triton's loss against eager's
# No STAGE: tests, verify and bench. The device tool allows 10 minutes per command: run the stages in separate calls
# there (the extension build is redone when the machine is fresh). Writes to $OUT (default bench/results/latest):
# env.json, suite.log, and per stage junit.xml, verify.json, bench_*.json (quick: results.json, summary.md).
# Exit status: non-zero if any step failed; every step runs regardless, each under its own time limit in quick.
# cuDNN fusion graphs: the GPU machine has no network, so cudnn-frontend's headers travel with the working tree:
# run `python fused_resnet/backends/build.py --stage-cudnn-frontend` here first and give the device call
# carry [".deps/cudnn_frontend"]; without them the extension builds without the graphs and info says so.
set -uo pipefail
scratch=$(mktemp -d)  # every stage's temporary files, removed however the suite ends
trap 'rm -rf "$scratch"' EXIT
DRY_RUN=0
STAGES=""
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY_RUN=1; else STAGES="$STAGES $arg"; fi
done
STAGES=${STAGES:-tests verify bench}  # quick, models, micro and parity run only when named
want() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
status=0
STAGE_TIMES="$OUT/stages.tsv"  # name, exit status, seconds, limit (quick's summary reads it)
: > "$STAGE_TIMES"
step() {  # step NAME COMMAND...: run, log, remember failure
  limited "$1" 0 "${@:2}"
}
limited() {  # limited NAME SECONDS COMMAND...: step under a time limit (0: none); SIGINT first, so pytest and
             # the benchmarks still write what they have
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  if [ "$limit" -gt 0 ]; then
    timeout -k 15 -s INT "$limit" "$@" 2>&1 | tee -a "$LOG"
  else
    "$@" 2>&1 | tee -a "$LOG"
  fi
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
  SUMMARY+=("$(printf '%-34s exit %-3s %5s s' "$name" "$rc" "$((SECONDS - t0))")")
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$STAGE_TIMES"
}
SUMMARY=()
merge_verify() {  # merge_verify DIR: every verify --json file in DIR as one $OUT/verify.json
  python3 - "$1" > "$OUT/verify.json" <<'PY'
import glob, json, sys
runs = [run for path in sorted(glob.glob(sys.argv[1] + "/*.json")) for run in json.load(open(path))["runs"]]
print(json.dumps({"runs": runs}, indent=1))
PY
}

if [ "$DRY_RUN" = 1 ]; then  # the CPU rehearsal: Triton's interpreter and the extension's CPU registrations
  export TRITON_INTERPRET=1 FUSED_RESNET_EXT_ON_CPU=1
  DEVICE=cpu
else
  DEVICE=cuda
fi
export FUSED_RESNET_AUTOTUNE=${FUSED_RESNET_AUTOTUNE:-$(want quick && echo heuristic || echo full)}

python3 - "$DRY_RUN" > "$OUT/env.json" <<'PY'
import json, os, platform, subprocess, sys, torch, triton
env = {"dry_run": sys.argv[1] == "1", "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "triton": triton.__version__,
       "autotune": os.environ.get("FUSED_RESNET_AUTOTUNE", "full")}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    env.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1), nvidia_smi=smi, cudnn=torch.backends.cudnn.version())
else:
    env.update(gpu=f"none (CPU rehearsal: {platform.processor() or platform.machine()})")
print(json.dumps(env, indent=1))
PY
cat "$OUT/env.json" | tee -a "$LOG"

# The GPU machine's image sets CXX=/opt/gcc/bin/g++; an extension built with it segfaulted whenever one of its
# TORCH_CHECK messages was formatted (seen 2026-11-23, torch 2.11), and one built with the system g++ did not.
if [ -x /usr/bin/g++ ] && [ "${CXX:-/usr/bin/g++}" != /usr/bin/g++ ]; then
  echo "using the system compiler /usr/bin/g++ instead of CXX=$CXX" | tee -a "$LOG"
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
if [ "$DRY_RUN" = 1 ]; then  # the rehearsal keeps the extension the install built
  limited build 60 python3 -c "from fused_resnet.backends import extension; s = extension.status(); print(s);
assert s['loaded'], 'dry run: the extension is not built'"
else
  cc=$(python3 -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
  export FUSED_RESNET_CUDA_ARCH_LIST=${FUSED_RESNET_CUDA_ARCH_LIST:-$cc} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  limited build "$(want quick && echo 125 || echo 0)" python3 -m pip install --no-deps --no-build-isolation -e .
fi
# info builds and runs the cuDNN fusion probe's graphs on a GPU: bounded in quick, so a slow first plan build
# cannot eat the stages after it
limited info "$(want quick && echo 40 || echo 0)" python3 -m fused_resnet.tools.cli info
if [ "$DRY_RUN" = 0 ]; then  # cuDNN's description of this GPU, into env.json: with it bench/cudnn_check.py checks
                             # the fusion graphs' engines for this GPU on any machine, no GPU needed
  props="$scratch/cudnn_props.json"
  limited "cudnn device properties" 15 python3 bench/cudnn_check.py --save-device-properties "$props"
  python3 - "$OUT/env.json" "$props" <<'PY'
import json, sys
env = json.load(open(sys.argv[1]))
env["cudnn_device_properties"] = open(sys.argv[2]).read()
json.dump(env, open(sys.argv[1], "w"), indent=1)
PY
fi

if want quick; then
  # Time limits (seconds) sum to 575 with the build's 125, info's 40 and the device properties' 15
  # (docs/GPU_SUITE.md has the budget and why).
  if [ "$DRY_RUN" = 1 ]; then
    sel=(-k "(gpu or test_block_matches_reference or test_train_block or test_eval_block) and basic-16x16")
    vargs=(--device cpu --model cifar_resnet20 --batch 2 --steps 1)
    vcfgs=("float32")
    vlimit=90  # the interpreter is slow; on the GPU each verify run has 16 s
    margs=(--batch 4 --dtype float32 --size 16 --steps 2)
    models=(cifar_resnet8)
    declare -A mlimit=([cifar_resnet8]=240)  # compile and the interpreter on 2 cores: about 75 s seen
  else
    # scale-out's GPU tests (CUDA graph capture, NCCL) run in stage tests, not in quick's 110 s
    # + the extension's kernels no GPU has run yet: the avg-pool unit, stochastic depth, the open closing
    sel=(-k "(gpu or test_block_matches_reference or test_train_block or test_eval_block or test_bn_act or drelu or test_pooled_units or test_avg_pool_kernels or test_drop_path_in_the_block_ops or test_open_block_runs) and not test_graphs and not nccl")
    vargs=(--device cuda --model resnet18 --batch 4 --size 64)
    vcfgs=("float32" "bfloat16" "bfloat16 --channels-last")
    vlimit=16
    margs=(--batch 256 --dtype bfloat16 --amp --channels-last --steps 10)
    models=(resnet50 resnet18)
    declare -A mlimit=([resnet50]=105 [resnet18]=50)
  fi
  per_test=()  # a hung test is stopped alone where pytest-timeout is installed (it is on the GPU machine)
  python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
  limited "tests (GPU-only + slice)" 110 python3 -m pytest -q -p no:cacheprovider tests "${sel[@]}" \
    "${per_test[@]}" --junitxml="$OUT/junit.xml"
  vtmp="$scratch/verify_quick" && mkdir -p "$vtmp"
  for backend in cuda triton; do
    for cfg in "${vcfgs[@]}"; do
      tag=$backend-$(echo "$cfg" | tr -d ' -')
      # shellcheck disable=SC2086  # $cfg is "dtype [flags]" on purpose
      limited "verify $backend $cfg" "$vlimit" python3 -m fused_resnet.tools.cli verify --backend $backend \
        --dtype $cfg "${vargs[@]}" --json "$vtmp/$tag.json"
    done
  done
  merge_verify "$vtmp"
  rows="$scratch/rows" && mkdir -p "$rows"
  # One process per model: eager, compile, triton, cuda, cuda-unfused side by side. Backend cuda comes after the
  # others: its first step builds the cuDNN fusion plans (unmeasured how long); a stage cut short loses the last
  # providers first.
  for model in "${models[@]}"; do
    limited "models $model" "${mlimit[$model]}" python3 -m fused_resnet.tools.cli \
      bench --quiet --no-layers --mode train,infer --providers eager,compile,triton,cuda,cuda-unfused "${margs[@]}" \
      --model "$model" --out "$rows/$model"
  done
  cat "$rows"/*/rows.jsonl > "$OUT/rows.jsonl" 2>/dev/null
  limited summary 40 python3 bench/gpu_summary.py "$OUT"  # with the launch account's predictions: ~1 s each
fi
if want tests; then
  step tests python3 -m pytest -q tests -rs --junitxml="$OUT/junit.xml"
fi
if want verify; then
  tmp="$scratch/verify" && mkdir -p "$tmp"
  for backend in auto triton; do  # auto: backend cuda where the extension loads (the first in auto's order)
    for cfg in "float32" "bfloat16" "bfloat16 --channels-last"; do
      tag=$backend-$(echo "$cfg" | tr -d ' -')
      # shellcheck disable=SC2086  # $cfg is "dtype [flags]" on purpose
      step "verify $backend $cfg" python3 -m fused_resnet.tools.cli verify --device cuda --backend $backend --batch 8 \
        --size 96 --dtype $cfg --model resnet18,resnet50,cifar_resnet20 --json "$tmp/$tag.json"
    done
  done
  merge_verify "$tmp"
fi
if want bench; then
  step "bench bn_kernels" python3 bench/bench_bn_kernels.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_bn_kernels.json"
  step "bench bn_act" python3 bench/bench_bn_act.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_bn_act.json"
  step "bench conv" python3 bench/bench_conv.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_conv.json"
  step "bench wgrad input" python3 bench/bench_wgrad_input.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_wgrad_input.json"
  step "bench inference" python3 bench/bench_inference.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_inference.json"
fi
if want models; then
  models_dir="$scratch/bench_models"
  step "bench models" python3 -m fused_resnet.tools.cli bench --quiet --out "$models_dir"
  tar czf "$OUT/bench_models.tar.gz" -C "$(dirname "$models_dir")" bench_models
fi
if want micro; then
  FUSED_RESNET_MICRO_MODELS=resnet50 FUSED_RESNET_MICRO_JSON="$OUT/micro.json" step "microbenchmarks" \
    python3 -m pytest -q -p no:cacheprovider bench/test_microbench.py --benchmark-columns=median,min,max
fi
if want parity; then
  step "training parity" python3 bench/bench_parity.py --model resnet50 --dtype bfloat16 --batch 64 --steps 200 \
    --out "$OUT/parity.json"
fi

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
exit $status
