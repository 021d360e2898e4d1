#!/usr/bin/env bash
# The GPU suite on a GPU machine, from the repository root:  bench/gpu_suite.sh [STAGE...]
#   tests   build the CUDA extension for this GPU, run every test (GPU tests included)
#   verify  `fused-resnet verify` on CUDA in several dtypes and layouts
#   bench   the extension's kernels (GB/s vs the copy ceiling; BN+ReLU units vs eager / torch.compile), bn_act
#           kernels, the conv engine (every ResNet-50 conv shape, fprop/dgrad/wgrad vs cuDNN) and
#           ResNet-50 inference, each beside eager PyTorch / torch.compile / cuDNN measured in the same run
#   models  `fused-resnet bench`: resnet18 and resnet50 training and inference, every provider, with the
#           per-block chart (its folder comes back as bench_models.tar.gz)
#   micro   bench/test_microbench.py (pytest-benchmark) on ResNet-50's shapes, report in micro.json
#   parity  bench/bench_parity.py: resnet50 bf16, 200 SGD steps, backend triton's loss against eager's
# No STAGE: tests, verify and bench. The device tool allows 10 minutes per command: run the stages in separate calls there
# (the extension build is redone when the machine is fresh). Writes env.json, suite.log, junit.xml,
# verify.json, bench_bn_kernels.json, bench_bn_act.json, bench_conv.json and bench_inference.json to $OUT (default
# bench/results/latest). Exit status: non-zero if any step failed; every step runs regardless.
set -uo pipefail
STAGES=${*:-tests verify bench}  # models, micro and parity run only when named
want() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
status=0
step() {  # step NAME COMMAND...: run, log, remember failure
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
  SUMMARY+=("$(printf '%-28s exit %-3s %5s s' "$name" "$rc" "$((SECONDS - t0))")")
}
SUMMARY=()

python3 - > "$OUT/env.json" <<'PY'
import json, platform, subprocess, torch, triton
p = torch.cuda.get_device_properties(0)
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": p.name, "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                  "memory_gib": round(p.total_memory / 2**30, 1), "nvidia_smi": smi,
                  "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__}, indent=1))
PY
cat "$OUT/env.json" | tee -a "$LOG"

# The GPU machine's image sets CXX=/opt/gcc/bin/g++; an extension built with it segfaulted whenever one of its
# TORCH_CHECK messages was formatted (seen 2026-11-23, torch 2.11), and one built with the system g++ did not.
if [ -x /usr/bin/g++ ] && [ "${CXX:-/usr/bin/g++}" != /usr/bin/g++ ]; then
  echo "using the system compiler /usr/bin/g++ instead of CXX=$CXX" | tee -a "$LOG"
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
cc=$(python3 -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
export FUSED_RESNET_CUDA_ARCH_LIST=${FUSED_RESNET_CUDA_ARCH_LIST:-$cc}
step build python3 -m pip install --no-deps --no-build-isolation -e .
step info python3 -m fused_resnet.tools.cli info
if want tests; then
  step tests python3 -m pytest -q tests -rs --junitxml="$OUT/junit.xml"
fi
if want verify; then
  tmp=$(mktemp -d)
  for backend in auto triton; do  # auto: backend cuda where the extension loads (the first in auto's order)
    for cfg in "float32" "bfloat16" "bfloat16 --channels-last"; do
      tag=$backend-$(echo "$cfg" | tr -d ' -')
      # shellcheck disable=SC2086  # $cfg is "dtype [flags]" on purpose
      step "verify $backend $cfg" python3 -m fused_resnet.tools.cli verify --device cuda --backend $backend --batch 8 \
        --size 96 --dtype $cfg --model resnet18,resnet50,cifar_resnet20 --json "$tmp/$tag.json"
    done
  done
  python3 - "$tmp" > "$OUT/verify.json" <<'PY'
import glob, json, sys
runs = [run for path in sorted(glob.glob(sys.argv[1] + "/*.json")) for run in json.load(open(path))["runs"]]
print(json.dumps({"runs": runs}, indent=1))
PY
fi
if want bench; then
  step "bench bn_kernels" python3 bench/bench_bn_kernels.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_bn_kernels.json"
  step "bench bn_act" python3 bench/bench_bn_act.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_bn_act.json"
  step "bench conv" python3 bench/bench_conv.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_conv.json"
  step "bench inference" python3 bench/bench_inference.py --model resnet50 --batch 256 --dtype bfloat16 \
    --out "$OUT/bench_inference.json"
fi
if want models; then
  models_dir=$(mktemp -d)/bench_models
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
