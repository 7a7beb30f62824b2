// Pairwise rotated IoU (see rotated.h): one thread per output, the boxes of a tile
// prepared once in shared memory (their sine, cosine, area and radius).
#include <cstdint>

#include "kernels/device_utils.cuh"
#include "kernels/rotated.h"
#include "kernels/rotated_geometry.cuh"

namespace retinanet {
namespace {

constexpr int kTileX = 32;  // columns (b) per block: consecutive threads write consecutive outputs
constexpr int kTileY = 8;   // rows (a) per block

__device__ __forceinline__ rotated::Box load(const float* boxes, int64_t i) {
  const float* p = boxes + 5 * i;
  return rotated::make_box(p[0], p[1], p[2], p[3], p[4]);
}

__global__ void __launch_bounds__(kTileX* kTileY) iou_kernel(int64_t n, int64_t m, const float* __restrict__ a,
                                                             const float* __restrict__ b, float* __restrict__ out) {
  __shared__ rotated::Box rows[kTileY];
  __shared__ rotated::Box cols[kTileX];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileX;
  const int tid = threadIdx.y * kTileX + threadIdx.x;
  if (tid < kTileX && j0 + tid < m) cols[tid] = load(b, j0 + tid);
  // Row tiles stride over the grid's y extent, which is limited to 65535 blocks.
  for (int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTileY; i0 < n; i0 += static_cast<int64_t>(gridDim.y) * kTileY) {
    __syncthreads();
    if (tid < kTileY && i0 + tid < n) rows[tid] = load(a, i0 + tid);
    __syncthreads();
    const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
    if (i < n && j < m) out[i * m + j] = rotated::iou(rows[threadIdx.y], cols[threadIdx.x]);
  }
}

}  // namespace

cudaError_t rotated_iou(int64_t n, int64_t m, const float* a, const float* b, float* out, cudaStream_t stream) {
  if (n < 0 || m < 0) return cudaErrorInvalidValue;
  if (n == 0 || m == 0) return cudaSuccess;
  const int64_t rows = (n + kTileY - 1) / kTileY;
  const int64_t cols = (m + kTileX - 1) / kTileX;
  if (cols > INT32_MAX) return cudaErrorInvalidValue;  // the grid's x extent
  const dim3 grid(static_cast<unsigned>(cols), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  iou_kernel<<<grid, dim3(kTileX, kTileY), 0, stream>>>(n, m, a, b, out);
  return cudaGetLastError();
}

}  // namespace retinanet
