#!/usr/bin/env bash
# Compile-check the TensorRT plugins and the C++ programs against a TensorRT include folder.
#
#   TENSORRT_INCLUDE=/path/to/TensorRT/include scripts/check_plugins.sh [--dry-run] [OUT_DIR]
#   scripts/check_plugins.sh --print-gencode
#
# Builds, with no TensorRT library:
#   OUT_DIR/libretinanet_plugins.so   csrc/kernels + csrc/plugins (what loadLibrary / trtexec load)
#   OUT_DIR/static_registration.o     csrc/plugins/plugin_library.cpp with REGISTER_TENSORRT_PLUGIN
#   OUT_DIR/export.o, OUT_DIR/infer.o extras/cppapi (compile only: they need libnvinfer to link)
#   OUT_DIR/plugin_harness            tests/plugins/harness.cpp (runs the plugins without TensorRT)
# TensorRT's headers are included with -isystem, so -Werror applies to our code only.
# GPU code: TORCH_CUDA_ARCH_LIST when set, else csrc/cuda_arch_list.txt, the list setup.py
# builds the torch extension for as well (numeric entries: 9.0, 9.0a, 12.0+PTX).
# NVCC / CXX / CUDA_HOME override the tools. PLUGINS_ONLY=1 stops after the plugin
# library (what setup.py uses). --dry-run prints the commands instead of running them;
# --print-gencode prints the nvcc -gencode flags, one a line (tests/test_build.py
# compares them with torch's for the same list).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=""
PRINT_GENCODE=""
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --print-gencode) PRINT_GENCODE=1 ;;
    -*) echo "check_plugins: unknown option $arg" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
OUT="${OUT:-$ROOT/build/check_plugins}"

# TORCH_CUDA_ARCH_LIST syntax -> nvcc flags, as torch.utils.cpp_extension spells them:
# X.Y[a] gives sm_XY[a] code, X.Y[a]+PTX adds compute_XY[a] PTX.
arch_list="${TORCH_CUDA_ARCH_LIST:-$(sed 's/#.*//' "$ROOT/csrc/cuda_arch_list.txt")}"
GENCODE=()
for entry in ${arch_list//;/ }; do
  [[ "$entry" =~ ^([0-9]+)\.([0-9]+a?)(\+PTX)?$ ]] || {
    echo "check_plugins: architecture '$entry' not understood: use entries like 8.6, 9.0a or 12.0+PTX" >&2; exit 2; }
  num="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  GENCODE+=("-gencode=arch=compute_$num,code=sm_$num")
  if [[ -n "${BASH_REMATCH[3]}" ]]; then GENCODE+=("-gencode=arch=compute_$num,code=compute_$num"); fi
done
((${#GENCODE[@]})) || { echo "check_plugins: no GPU architectures in '$arch_list'" >&2; exit 2; }
if [[ -n "$PRINT_GENCODE" ]]; then
  printf '%s\n' "${GENCODE[@]}"
  exit 0
fi
if [[ -n "${CUDA_ARCH:-}" ]]; then
  echo "check_plugins: CUDA_ARCH is no longer read; TORCH_CUDA_ARCH_LIST (e.g. 9.0) picks the GPU code" >&2
fi

: "${TENSORRT_INCLUDE:?set TENSORRT_INCLUDE to a TensorRT include folder (with NvInfer.h)}"
[[ -f "$TENSORRT_INCLUDE/NvInfer.h" ]] || { echo "check_plugins: $TENSORRT_INCLUDE/NvInfer.h not found" >&2; exit 2; }
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
if [[ -z "${CUDA_HOME:-}" ]]; then  # nvcc may be a wrapper script: look for the toolkit beside it, then the usual place
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
    [[ -f "$c/include/cuda_runtime_api.h" ]] && { CUDA_HOME="$c"; break; }
  done
fi
: "${CUDA_HOME:?set CUDA_HOME to the CUDA toolkit}"
CUDA_INC="$CUDA_HOME/include"
CUDA_LIB="$CUDA_HOME/lib64"

# Each build step goes through run: printed (shell-quoted, one a line) with --dry-run, else run.
run() {
  if [[ -n "$DRY_RUN" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}
say() { if [[ -z "$DRY_RUN" ]]; then echo "check_plugins: $*"; fi; }

version() { awk '/#define TRT_(MAJOR|MINOR|PATCH)_ENTERPRISE/ {printf "%s%s", sep, $3; sep="."}' "$TENSORRT_INCLUDE/NvInferVersion.h"; }
say "TensorRT headers $(version) from $TENSORRT_INCLUDE; GPU code ${arch_list//[[:space:]]/}"
if [[ -z "$DRY_RUN" ]]; then mkdir -p "$OUT"; fi

WARN=(-Wall -Wextra -Werror)
CXXFLAGS=(-std=c++17 -O3 -DNDEBUG -fPIC -fvisibility=hidden "${WARN[@]}" -I"$ROOT/csrc" -isystem "$TENSORRT_INCLUDE" -isystem "$CUDA_INC")
NVCCFLAGS=(-std=c++17 -O3 -DNDEBUG -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra -Werror all-warnings
           "${GENCODE[@]}" -I"$ROOT/csrc")

objs=()
for cu in "$ROOT"/csrc/kernels/*.cu; do
  o="$OUT/$(basename "$cu" .cu).o"
  run "$NVCC" "${NVCCFLAGS[@]}" -c "$cu" -o "$o"
  objs+=("$o")
done
for cpp in "$ROOT"/csrc/plugins/*.cpp; do
  o="$OUT/$(basename "$cpp" .cpp).o"
  run "$CXX" "${CXXFLAGS[@]}" -c "$cpp" -o "$o"
  objs+=("$o")
done

# The plugin library: links against the CUDA runtime only, never libnvinfer.
run "$CXX" -shared -o "$OUT/libretinanet_plugins.so" "${objs[@]}" -L"$CUDA_LIB" -lcudart -Wl,--no-undefined
if [[ -z "$DRY_RUN" ]]; then
  exported="$(nm -D --defined-only "$OUT/libretinanet_plugins.so")"  # whole output first: grep -q would cut the pipe
  for sym in getCreators setLoggerFinder; do
    grep -qw "$sym" <<<"$exported" || { echo "check_plugins: $sym not exported" >&2; exit 1; }
  done
fi
say "$OUT/libretinanet_plugins.so exports getCreators, setLoggerFinder"
[[ -n "${PLUGINS_ONLY:-}" ]] && exit 0  # setup.py: the library is all an install needs

# Static registration and the C++ programs: compile only (linking needs libnvinfer).
run "$CXX" "${CXXFLAGS[@]}" -DRETINANET_STATIC_REGISTRATION -c "$ROOT/csrc/plugins/plugin_library.cpp" \
  -o "$OUT/static_registration.o"
for prog in export infer; do
  run "$CXX" "${CXXFLAGS[@]}" -c "$ROOT/extras/cppapi/$prog.cpp" -o "$OUT/$prog.o"
done
say "static registration and extras/cppapi compile"

# The harness: plugin objects + kernels + the harness, no TensorRT library.
run "$CXX" "${CXXFLAGS[@]}" -c "$ROOT/tests/plugins/harness.cpp" -o "$OUT/harness.o"
run "$CXX" -o "$OUT/plugin_harness" "$OUT/harness.o" "${objs[@]}" -L"$CUDA_LIB" -lcudart -Wl,-rpath,"$CUDA_LIB"
say "$OUT/plugin_harness built; all compiled without warnings"
