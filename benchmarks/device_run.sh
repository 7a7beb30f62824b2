#!/usr/bin/env bash
# One call on the GPU device machine: build the CUDA extension in place, run the
# GPU tests and the training tests (on the GPU there), run every
# benchmarks/bench_*.py, print a summary table last.
# Logs go to $OUT (the device tool's output folder) or ./device_out.
#   usage: bash benchmarks/device_run.sh        (from the repository root)
# Environment: TORCH_CUDA_ARCH_LIST [9.0], CUDA_HOME [found from nvcc], PYTEST_ARGS,
#   BENCH_ONLY (space-separated benchmark names to run, e.g. "bench_postprocess"; default all),
#   ARGS_<name> (extra arguments for one benchmark, e.g. ARGS_bench_postprocess=--profile),
#   SKIP_TESTS=1 (no pytest), SKIP_TRAINING_TESTS=1 (no slow tests: the demo training and what uses it),
#   DALI_DEMO=1 (train and infer the demo with --with-dali, then infer without it: the mAPs of both
#   loaders on one model),
#   TENSORRT_INCLUDE=DIR[:DIR...] (TensorRT headers, carried: for each folder (say TensorRT 10's
#   and 11's) build the plugins and run their harness, axis-aligned and rotated cases, against
#   retinanet.ops.reference; no TensorRT library needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

# CUDA_HOME: the toolkit holding bin/nvcc (nvcc on PATH may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  nvcc_path=$(command -v nvcc || ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
  if [ -n "$nvcc_path" ]; then
    real=$(sed -n 's/^exec \([^ ]*\/bin\/nvcc\).*/\1/p' "$nvcc_path" 2>/dev/null | head -1)
    nvcc_path=$(readlink -f "${real:-$nvcc_path}")
    CUDA_HOME=$(dirname "$(dirname "$nvcc_path")")
  fi
fi
export CUDA_HOME

summary=()
step() {  # step NAME LOG COMMAND...: run, tee, record status and seconds
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-28s rc=%-3s %5ss  %s' "$name" "$rc" $((SECONDS - t0)) "$log")")
  return "$rc"
}

{
  echo "host: $(hostname)  CUDA_HOME=${CUDA_HOME:-unset}  TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, 'gpu', torch.cuda.get_device_name())"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -2
} 2>&1 | tee "$OUT/env.log"

dali_demo() {
  local work demo
  work=$(mktemp -d)
  demo=$(python3 -c "from retinanet.data import demo; print(demo.ensure())")
  (cd "$work" && python3 -m retinanet train demo.pth --with-dali &&
   python3 -m retinanet infer demo.pth --images "$demo/val" --annotations "$demo/val.json" --output dali.json \
     --with-dali &&
   python3 -m retinanet infer demo.pth --images "$demo/val" --annotations "$demo/val.json" --output torch.json)
}

plugin_harness() {  # every header folder of TENSORRT_INCLUDE, each with both case sets
  local include build set cases flag n=0 builds=()
  for include in ${TENSORRT_INCLUDE//:/ }; do  # the builds side by side: each compiles serially
    n=$((n + 1))
    builds+=("build/check_plugins_$n")
    TENSORRT_INCLUDE=$include bash scripts/check_plugins.sh "build/check_plugins_$n" > "$OUT/check_plugins_$n.log" 2>&1 &
  done
  wait
  n=0
  for include in ${TENSORRT_INCLUDE//:/ }; do
    build=${builds[$n]}
    n=$((n + 1))
    cat "$OUT/check_plugins_$n.log"
    [ -x "$build/plugin_harness" ] || return 1
    for set in axis rotated; do
      cases=$OUT/plugin_cases_$set
      flag=$([ "$set" = rotated ] && echo --rotated)
      echo "--- harness ($include, $set cases)"
      # shellcheck disable=SC2086
      python3 tests/plugins/compare.py write "$cases" $flag &&
      mkdir -p "$cases/out" && "$build/plugin_harness" "$cases" "$cases/out" | grep -E "FAIL|failed checks|^plugin_harness" &&
      python3 tests/plugins/compare.py check "$cases" "$cases/out" $flag && rm -rf "$cases" || return 1
    done
  done
}

if step build build.log python3 setup.py build_ext --inplace; then
  if [ -z "${SKIP_TESTS:-}" ]; then
    step "gpu tests" tests.log python3 -m pytest -m gpu -q -rfEsP --continue-on-collection-errors ${PYTEST_ARGS:-} tests/
    # The gpu-marked runs above include short fp16 and bf16 trainings; these train
    # the demo model through the CLI (on the GPU, bf16 autocast) and test it.
    if [ -z "${SKIP_TRAINING_TESTS:-}" ]; then
      step "training tests" training.log python3 -m pytest -m "slow and not gpu" -q -rfEsP ${PYTEST_ARGS:-} \
        tests/test_workflow.py tests/test_dali.py tests/test_gpu_loader.py
    fi
  fi
  if [ -n "${TENSORRT_INCLUDE:-}" ]; then
    step "plugin harness" plugins.log plugin_harness
  fi
  if [ -n "${DALI_DEMO:-}" ]; then
    step "dali demo" dali_demo.log dali_demo
  fi
  for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then continue; fi
    args_var="ARGS_$name"
    # shellcheck disable=SC2086
    step "$name" "$name.log" python3 "$bench" ${!args_var:-}
  done
fi

echo
echo "################ device_run summary ################"
printf '%s\n' "${summary[@]}"
tail -n 1 "$OUT/tests.log" 2>/dev/null | sed 's/^/tests: /'
tail -n 1 "$OUT/training.log" 2>/dev/null | sed 's/^/training tests: /'
grep -h "^GPU vs CPU loader\|^demo val mAP" "$OUT/tests.log" "$OUT/training.log" 2>/dev/null
for log in "$OUT"/bench_*.log; do
  [ -e "$log" ] || continue
  echo "--- $(basename "$log" .log)"
  if grep -q '^## results' "$log"; then
    sed -n '/^## results/,$p' "$log" | awk '/^## results/{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}'
  else
    tail -n 20 "$log"
  fi
done
