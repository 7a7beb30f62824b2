#!/usr/bin/env bash
# Compile-check the TensorRT plugins and the C++ programs against a TensorRT include folder.
#
#   TENSORRT_INCLUDE=/path/to/TensorRT/include scripts/check_plugins.sh [OUT_DIR]
#
# Builds, with no TensorRT library:
#   OUT_DIR/libretinanet_plugins.so   csrc/kernels + csrc/plugins (what loadLibrary / trtexec load)
#   OUT_DIR/static_registration.o     csrc/plugins/plugin_library.cpp with REGISTER_TENSORRT_PLUGIN
#   OUT_DIR/export.o, OUT_DIR/infer.o extras/cppapi (compile only: they need libnvinfer to link)
#   OUT_DIR/plugin_harness            tests/plugins/harness.cpp (runs the plugins without TensorRT)
# TensorRT's headers are included with -isystem, so -Werror applies to our code only.
# CUDA_ARCH (default 90: the H100) picks the GPU code; NVCC / CXX / CUDA_HOME override the tools.
# PLUGINS_ONLY=1 stops after the plugin library (what setup.py uses).
set -euo pipefail

: "${TENSORRT_INCLUDE:?set TENSORRT_INCLUDE to a TensorRT include folder (with NvInfer.h)}"
[[ -f "$TENSORRT_INCLUDE/NvInfer.h" ]] || { echo "check_plugins: $TENSORRT_INCLUDE/NvInfer.h not found" >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/build/check_plugins}"
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
ARCH="${CUDA_ARCH:-90}"
mkdir -p "$OUT"

version() { awk '/#define TRT_(MAJOR|MINOR|PATCH)_ENTERPRISE/ {printf "%s%s", sep, $3; sep="."}' "$TENSORRT_INCLUDE/NvInferVersion.h"; }
echo "check_plugins: TensorRT headers $(version) from $TENSORRT_INCLUDE"

WARN=(-Wall -Wextra -Werror)
CXXFLAGS=(-std=c++17 -O2 -fPIC -fvisibility=hidden "${WARN[@]}" -I"$ROOT/csrc" -isystem "$TENSORRT_INCLUDE" -isystem "$CUDA_INC")
NVCCFLAGS=(-std=c++17 -O3 -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra -Werror all-warnings
           -gencode "arch=compute_$ARCH,code=sm_$ARCH" -I"$ROOT/csrc")

objs=()
for cu in "$ROOT"/csrc/kernels/*.cu; do
  o="$OUT/$(basename "$cu" .cu).o"
  "$NVCC" "${NVCCFLAGS[@]}" -c "$cu" -o "$o"
  objs+=("$o")
done
for cpp in "$ROOT"/csrc/plugins/*.cpp; do
  o="$OUT/$(basename "$cpp" .cpp).o"
  "$CXX" "${CXXFLAGS[@]}" -c "$cpp" -o "$o"
  objs+=("$o")
done

# The plugin library: links against the CUDA runtime only, never libnvinfer.
"$CXX" -shared -o "$OUT/libretinanet_plugins.so" "${objs[@]}" -L"$CUDA_LIB" -lcudart -Wl,--no-undefined
exported="$(nm -D --defined-only "$OUT/libretinanet_plugins.so")"  # whole output first: grep -q would cut the pipe
for sym in getCreators setLoggerFinder; do
  grep -qw "$sym" <<<"$exported" || { echo "check_plugins: $sym not exported" >&2; exit 1; }
done
echo "check_plugins: $OUT/libretinanet_plugins.so exports getCreators, setLoggerFinder"
[[ -n "${PLUGINS_ONLY:-}" ]] && exit 0  # setup.py: the library is all an install needs

# Static registration and the C++ programs: compile only (linking needs libnvinfer).
"$CXX" "${CXXFLAGS[@]}" -DRETINANET_STATIC_REGISTRATION -c "$ROOT/csrc/plugins/plugin_library.cpp" \
  -o "$OUT/static_registration.o"
for prog in export infer; do
  "$CXX" "${CXXFLAGS[@]}" -c "$ROOT/extras/cppapi/$prog.cpp" -o "$OUT/$prog.o"
done
echo "check_plugins: static registration and extras/cppapi compile"

# The harness: plugin objects + kernels + the harness, no TensorRT library.
"$CXX" "${CXXFLAGS[@]}" -c "$ROOT/tests/plugins/harness.cpp" -o "$OUT/harness.o"
"$CXX" -o "$OUT/plugin_harness" "$OUT/harness.o" "${objs[@]}" -L"$CUDA_LIB" -lcudart -Wl,-rpath,"$CUDA_LIB"
echo "check_plugins: $OUT/plugin_harness built; all compiled without warnings"
