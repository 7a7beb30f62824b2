// Device helpers shared by decode.cu and nms.cu (CUDA only, not part of the API).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/dtype.h"

namespace retinanet {
namespace detail {

// Calls f(Type<T>{}) with T the element type of `dtype` (float, __half or __nv_bfloat16):
// the entry points' one switch from the runtime dtype to their templated launch.
template <typename T>
struct Type {
  using type = T;
};

template <typename F>
cudaError_t dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(Type<float>{});
    case DType::kFloat16:
      return f(Type<__half>{});
    case DType::kBFloat16:
      return f(Type<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Order-preserving map of a float onto uint32 (larger float -> larger key).
// -0.0 maps like +0.0 so that both compare equal, as in a comparison sort.
__device__ __forceinline__ uint32_t float_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// clamp(min=0) / clamp(max=m) that keep NaN, like torch.clamp.
__device__ __forceinline__ float clamp_min0(float v) { return v < 0.f ? 0.f : v; }
__device__ __forceinline__ float clamp_max(float v, float m) { return v > m ? m : v; }

// n items of T as one aligned vector load.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__host__ __device__ inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace detail
}  // namespace retinanet
