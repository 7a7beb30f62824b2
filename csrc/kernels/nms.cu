// Greedy class-aware NMS, batched over images (see nms.h).
//
// 1. sort: per image, the candidates with score > 0 in score order, ties by
//    input position, as the unique 64-bit key  float_bits(score) << 32 |
//    (0xffffffff - position). Up to kRankMax candidates each key's rank (its
//    sorted position) is counted directly, over many blocks; beyond that a CUB
//    segmented radix sort (descending, stable). Sorted boxes and classes are
//    gathered once.
// 2. mask: for each pair of 64-candidate blocks (upper triangle), a bit per
//    (i, j > i) that says "i suppresses j" (same class, IoU > threshold); one
//    64-thread block per block pair.
// 3. scan: one warp per image walks the sorted candidates 64 at a time: the
//    first not-suppressed one is kept, its word of the diagonal block (held in
//    registers) suppresses the rest of this block, and once the block is done
//    the kept rows are ORed into the later words. It stops after `detections`
//    kept, then writes the kept candidates and the padding.
// Axis-aligned and rotated boxes share all of it: a geometry policy (AxisGeometry,
// RotatedGeometry) says how many values a box has, how a sorted box is stored and
// prepared, and when two boxes overlap; nothing else differs.
#include "kernels/nms.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "kernels/device_utils.cuh"
#include "kernels/rotated.h"
#include "kernels/rotated_geometry.cuh"

namespace retinanet {
namespace {

using detail::ceil_div;

constexpr int kBlock = 64;  // candidates per mask word
constexpr int kPrepareThreads = 256;
constexpr int kRankMax = 8192;  // rank sort up to here (n^2 comparisons), CUB beyond
constexpr int kRankThreads = 256;
constexpr int kRankSplit = 4;  // threads that share one key's ranking
constexpr int kRankTile = 1024;
constexpr size_t kMaxSharedRemoved = 48 * 1024;

struct Layout {
  size_t counts, offsets, keys_in, keys_out, order_in, order, boxes, classes, removed, keep, mask, sort_temp,
      sort_temp_bytes, total;
};

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

int words(int n) { return ceil_div(n, kBlock); }

bool rank_sort(int n) { return n <= kRankMax; }

template <class Geo>
Layout layout(const NmsArgs& a) {
  Layout l{};
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    size_t at = off;
    off = align_up(off + bytes);
    return at;
  };
  const size_t batch = static_cast<size_t>(a.batch);
  const size_t items = batch * a.num_candidates;
  const size_t nw = words(a.num_candidates);
  l.counts = take(batch * sizeof(int));
  l.order = take(items * sizeof(int));
  l.boxes = take(items * sizeof(typename Geo::Stored));
  l.classes = take(items * sizeof(int));
  l.removed = take(batch * nw * sizeof(unsigned long long));
  l.keep = take(batch * static_cast<size_t>(a.detections) * sizeof(int));
  l.mask = take(items * nw * sizeof(unsigned long long));
  if (!rank_sort(a.num_candidates)) {
    l.offsets = take((batch + 1) * sizeof(int));
    l.keys_in = take(items * sizeof(uint32_t));
    l.keys_out = take(items * sizeof(uint32_t));
    l.order_in = take(items * sizeof(int));
    size_t temp = 0;
    cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, temp, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int*>(nullptr), static_cast<int*>(nullptr), static_cast<int>(items), a.batch,
        static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), 0, 31);
    l.sort_temp_bytes = temp;
    l.sort_temp = take(temp);
  }
  l.total = off;
  return l;
}

// Axis-aligned boxes (x1, y1, x2, y2): IoU with the float32 operations of ops/box.py box_iou.
struct AxisGeometry {
  static constexpr int kValues = 4;
  using Stored = float4;
  struct Box {
    float x1, y1, x2, y2, area;
  };

  template <typename T>
  __device__ static Stored load(const T* boxes, size_t i) {
    return make_float4(detail::to_float(boxes[4 * i + 0]), detail::to_float(boxes[4 * i + 1]),
                       detail::to_float(boxes[4 * i + 2]), detail::to_float(boxes[4 * i + 3]));
  }

  // `offset` is the box width convention (1: x2 - x1 + 1); with 0 it adds an exact zero.
  __device__ static Box prepare(const Stored& v, float offset) {
    Box r;
    r.x1 = v.x;
    r.y1 = v.y;
    r.x2 = v.z;
    r.y2 = v.w;
    r.area = __fmul_rn(detail::clamp_min0(__fadd_rn(__fsub_rn(r.x2, r.x1), offset)),
                       detail::clamp_min0(__fadd_rn(__fsub_rn(r.y2, r.y1), offset)));
    return r;
  }

  // IoU > threshold, in the order of box_iou (areas from prepare() with the same offset).
  __device__ static bool overlaps(const Box& a, const Box& b, float threshold, float offset) {
    const float w = detail::clamp_min0(__fadd_rn(__fsub_rn(fminf(a.x2, b.x2), fmaxf(a.x1, b.x1)), offset));
    const float h = detail::clamp_min0(__fadd_rn(__fsub_rn(fminf(a.y2, b.y2), fmaxf(a.y1, b.y1)), offset));
    const float inter = __fmul_rn(w, h);
    const float uni = __fsub_rn(__fadd_rn(a.area, b.area), inter);
    return __fdiv_rn(inter, fmaxf(uni, FLT_MIN)) > threshold;
  }
};

// Rotated boxes (cx, cy, w, h, θ): the IoU of rotated_geometry.cuh; a is the kept box.
struct RotatedGeometry {
  static constexpr int kValues = 5;
  struct Stored {
    float v[5];
  };
  using Box = rotated::Box;

  template <typename T>
  __device__ static Stored load(const T* boxes, size_t i) {
    Stored s;
#pragma unroll
    for (int k = 0; k < 5; ++k) s.v[k] = detail::to_float(boxes[5 * i + k]);
    return s;
  }

  __device__ static Box prepare(const Stored& s, float /*offset: always 0*/) {
    return rotated::make_box(s.v[0], s.v[1], s.v[2], s.v[3], s.v[4]);
  }

  __device__ static bool overlaps(const Box& a, const Box& b, float threshold, float /*offset*/) {
    return rotated::iou(a, b) > threshold;
  }
};

template <class Geo, typename T>
__device__ __forceinline__ void gather_candidate(const T* boxes, const int32_t* classes, size_t src,
                                                 typename Geo::Stored* out_boxes, int* out_classes, size_t dst) {
  out_boxes[dst] = Geo::template load<T>(boxes, src);
  out_classes[dst] = classes[src];
}

template <typename T>
__device__ __forceinline__ unsigned long long score_key(const T* scores, size_t base, int i) {
  const float s = detail::to_float(scores[base + i]);
  // 0 (below every candidate) unless score > 0, which is also false for NaN.
  return s > 0.f ? (static_cast<unsigned long long>(__float_as_uint(s)) << 32) | (0xffffffffu - i) : 0ull;
}

// n <= kRankMax. grid (n / 64, batch): kRankSplit threads count how many keys
// of the image are above one candidate's key, which is its sorted position.
// Block 0 also counts the candidates.
template <class Geo, typename T>
__global__ void __launch_bounds__(kRankThreads)
    rank_sort_kernel(const T* __restrict__ scores, const T* __restrict__ boxes, const int32_t* __restrict__ classes,
                     int n, int* __restrict__ counts, int* __restrict__ order,
                     typename Geo::Stored* __restrict__ sorted_boxes, int* __restrict__ sorted_classes) {
  __shared__ unsigned long long tile[kRankTile];
  __shared__ int valid_total;
  const int b = blockIdx.y;
  const size_t base = static_cast<size_t>(b) * n;
  const int part = threadIdx.x % kRankSplit;
  const int i = blockIdx.x * (kRankThreads / kRankSplit) + threadIdx.x / kRankSplit;
  const unsigned long long mine = i < n ? score_key(scores, base, i) : 0ull;
  const bool counter = blockIdx.x == 0;
  if (threadIdx.x == 0) valid_total = 0;
  int rank = 0, valid = 0;
  for (int t0 = 0; t0 < n; t0 += kRankTile) {
    __syncthreads();
#pragma unroll
    for (int k = threadIdx.x; k < kRankTile; k += kRankThreads) {
      const int j = t0 + k;
      const unsigned long long key = j < n ? score_key(scores, base, j) : 0ull;
      tile[k] = key;
      valid += key != 0;
    }
    __syncthreads();
    if (mine != 0) {
      const int lim = min(kRankTile, n - t0);
      for (int k = part; k < lim; k += kRankSplit) rank += tile[k] > mine;
    }
  }
#pragma unroll
  for (int off = 1; off < kRankSplit; off <<= 1) rank += __shfl_xor_sync(0xffffffffu, rank, off);
  if (counter) {
    if (valid) atomicAdd(&valid_total, valid);
    __syncthreads();
    if (threadIdx.x == 0) counts[b] = valid_total;
  }
  if (part == 0 && mine != 0) {
    order[base + rank] = i;
    gather_candidate<Geo>(boxes, classes, base + i, sorted_boxes, sorted_classes, base + rank);
  }
}

// Larger n: keys for CUB (float bits of the candidates, 0 for the others).
template <typename T>
__global__ void __launch_bounds__(kPrepareThreads)
    prepare_kernel(const T* __restrict__ scores, int n, int batch, uint32_t* __restrict__ keys, int* __restrict__ order,
                   int* __restrict__ counts, int* __restrict__ offsets) {
  const int b = blockIdx.y;
  const int i = blockIdx.x * kPrepareThreads + threadIdx.x;
  bool valid = false;
  if (i < n) {
    const size_t g = static_cast<size_t>(b) * n + i;
    const float s = detail::to_float(scores[g]);
    valid = s > 0.f;  // also false for NaN
    keys[g] = valid ? __float_as_uint(s) : 0u;
    order[g] = i;
  }
  const int block_count = __syncthreads_count(valid);
  if (threadIdx.x == 0 && block_count > 0) atomicAdd(counts + b, block_count);
  if (blockIdx.x == 0 && b == 0)
    for (int k = threadIdx.x; k <= batch; k += kPrepareThreads) offsets[k] = k * n;
}

template <class Geo, typename T>
__global__ void __launch_bounds__(kPrepareThreads)
    gather_kernel(const T* __restrict__ boxes, const int32_t* __restrict__ classes, int n,
                  const int* __restrict__ counts, const int* __restrict__ order,
                  typename Geo::Stored* __restrict__ sorted_boxes, int* __restrict__ sorted_classes) {
  const int b = blockIdx.y;
  const int i = blockIdx.x * kPrepareThreads + threadIdx.x;
  if (i >= counts[b]) return;
  const size_t base = static_cast<size_t>(b) * n;
  gather_candidate<Geo>(boxes, classes, base + order[base + i], sorted_boxes, sorted_classes, base + i);
}

// grid (block pair, image), kBlock threads: the pairs (row <= col) of the upper
// triangle, row by row. Thread t owns sorted candidate row*64 + t and writes
// its suppression word for the column block.
template <class Geo>
__global__ void __launch_bounds__(kBlock)
    mask_kernel(const typename Geo::Stored* __restrict__ boxes, const int* __restrict__ classes, int n, int nw,
                float threshold, float offset, const int* __restrict__ counts, unsigned long long* __restrict__ mask) {
  const int b = blockIdx.y;
  const int pair = blockIdx.x;
  // Row r starts at pair r*nw - r*(r-1)/2; estimate r, then settle it exactly.
  auto row_start = [nw](long long r) { return r * nw - r * (r - 1) / 2; };
  const float q = 2.f * nw + 1.f;
  int row = static_cast<int>((q - sqrtf(fmaxf(q * q - 8.f * pair, 0.f))) * 0.5f);
  row = min(max(row, 0), nw - 1);
  while (row > 0 && row_start(row) > pair) --row;
  while (row + 1 < nw && row_start(row + 1) <= pair) ++row;
  const int col = row + (pair - row_start(row));
  const int valid = counts[b];
  if (col * kBlock >= valid) return;  // row <= col, so the row block is in range too
  __shared__ typename Geo::Box cols[kBlock];
  __shared__ int col_classes[kBlock];
  const size_t base = static_cast<size_t>(b) * n;
  const int t = threadIdx.x;
  const int j = col * kBlock + t;
  if (j < valid) {
    cols[t] = Geo::prepare(boxes[base + j], offset);
    col_classes[t] = classes[base + j];
  }
  __syncthreads();
  const int i = row * kBlock + t;
  if (i >= valid) return;
  const typename Geo::Box mine = Geo::prepare(boxes[base + i], offset);
  const int mine_class = classes[base + i];
  const int ncols = min(kBlock, valid - col * kBlock);
  const int first = row == col ? t + 1 : 0;  // only later candidates can be suppressed
  unsigned long long bits = 0;
  for (int k = first; k < ncols; ++k)
    if (col_classes[k] == mine_class && Geo::overlaps(mine, cols[k], threshold, offset)) bits |= 1ull << k;
  mask[(base + i) * nw + col] = bits;
}

template <int V, typename T>
__device__ __forceinline__ void write_detection(const T* scores, const T* boxes, const int32_t* classes, size_t src,
                                                T* out_scores, T* out_boxes, int32_t* out_classes, size_t dst) {
  out_scores[dst] = scores[src];
#pragma unroll
  for (int k = 0; k < V; ++k) out_boxes[V * dst + k] = boxes[V * src + k];
  out_classes[dst] = classes[src];
}

// One warp per image; `removed` (one bit per sorted candidate) is shared by the lanes.
// V: values per box.
template <int V, typename T>
__global__ void __launch_bounds__(32)
    scan_kernel(const T* __restrict__ scores, const T* __restrict__ boxes, const int32_t* __restrict__ classes, int n,
                int nw, int detections, const int* __restrict__ counts, const int* __restrict__ order,
                const unsigned long long* __restrict__ mask, unsigned long long* removed_global, bool shared_removed,
                int* __restrict__ keep_lists, T* __restrict__ out_scores, T* __restrict__ out_boxes,
                int32_t* __restrict__ out_classes) {
  extern __shared__ unsigned long long removed_shared[];
  constexpr unsigned kAll = 0xffffffffu;
  constexpr int kLoads = 8;  // mask rows read at once
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  unsigned long long* removed = shared_removed ? removed_shared : removed_global + static_cast<size_t>(b) * nw;
  const int valid = counts[b];
  const int valid_words = ceil_div(valid, kBlock);
  const size_t base = static_cast<size_t>(b) * n;
  const unsigned long long* rows = mask + base * nw;
  const size_t out = static_cast<size_t>(b) * detections;
  int* keep = keep_lists + out;  // sorted positions of the kept candidates

  for (int w = lane; w < valid_words; w += 32) removed[w] = 0;

  auto diagonal = [&](int w, unsigned long long& lo, unsigned long long& hi) {
    const int r = w * kBlock + lane;
    lo = r < valid ? rows[static_cast<size_t>(r) * nw + w] : 0;
    hi = r + 32 < valid ? rows[static_cast<size_t>(r + 32) * nw + w] : 0;
  };
  unsigned long long d_lo = 0, d_hi = 0;
  if (valid_words > 0) diagonal(0, d_lo, d_hi);

  int kept = 0;
  for (int w = 0; w < valid_words && kept < detections; ++w) {
    unsigned long long next_lo = 0, next_hi = 0;
    if (w + 1 < valid_words) diagonal(w + 1, next_lo, next_hi);  // prefetch
    __syncwarp();
    unsigned long long cur = removed[w];
    const int in_word = min(kBlock, valid - w * kBlock);
    const unsigned long long in_range = in_word == kBlock ? ~0ull : (1ull << in_word) - 1;
    unsigned long long alive = ~cur & in_range;
    unsigned long long kept_bits = 0;
    while (alive != 0 && kept < detections) {  // warp-uniform
      const int j = __ffsll(static_cast<long long>(alive)) - 1;
      if (lane == 0) keep[kept] = w * kBlock + j;  // no wait on memory in this loop
      ++kept;
      kept_bits |= 1ull << j;
      const unsigned long long from_lo = __shfl_sync(kAll, d_lo, j & 31);
      const unsigned long long from_hi = __shfl_sync(kAll, d_hi, j & 31);
      cur |= j < 32 ? from_lo : from_hi;
      alive = ~cur & in_range & (j == 63 ? 0ull : ~0ull << (j + 1));
    }
    if (kept < detections) {
      // The kept rows suppress candidates of later words: lane-owned words, kLoads rows at a time.
      for (int w2 = w + 1 + lane; w2 < valid_words; w2 += 32) {
        unsigned long long acc = 0, bits = kept_bits;
        while (bits != 0) {
          unsigned long long v[kLoads];
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            v[u] = 0;
            if (bits != 0) {
              const int j = __ffsll(static_cast<long long>(bits)) - 1;
              bits &= bits - 1;
              v[u] = rows[static_cast<size_t>(w * kBlock + j) * nw + w2];
            }
          }
#pragma unroll
          for (int u = 0; u < kLoads; ++u) acc |= v[u];
        }
        removed[w2] |= acc;
      }
    }
    d_lo = next_lo;
    d_hi = next_hi;
  }
  __syncwarp();
  for (int k = lane; k < kept; k += 32)
    write_detection<V>(scores, boxes, classes, base + order[base + keep[k]], out_scores, out_boxes, out_classes,
                       out + k);
  for (int k = kept + lane; k < detections; k += 32) {
    out_scores[out + k] = detail::from_float<T>(0.f);
#pragma unroll
    for (int c = 0; c < V; ++c) out_boxes[V * (out + k) + c] = detail::from_float<T>(0.f);
    out_classes[out + k] = -1;
  }
}

template <class Geo, typename T>
cudaError_t launch(const NmsArgs& a, const T* scores, const T* boxes, const int32_t* classes, T* out_scores,
                   T* out_boxes, int32_t* out_classes, char* ws, cudaStream_t stream) {
  const Layout l = layout<Geo>(a);
  const int n = a.num_candidates;
  const int nw = words(n);
  auto* counts = reinterpret_cast<int*>(ws + l.counts);
  auto* order = reinterpret_cast<int*>(ws + l.order);
  auto* sorted_boxes = reinterpret_cast<typename Geo::Stored*>(ws + l.boxes);
  auto* sorted_classes = reinterpret_cast<int*>(ws + l.classes);
  auto* removed = reinterpret_cast<unsigned long long*>(ws + l.removed);
  auto* mask = reinterpret_cast<unsigned long long*>(ws + l.mask);
  auto* keep = reinterpret_cast<int*>(ws + l.keep);
  cudaError_t err;
  if (rank_sort(n)) {
    if (n == 0) {
      if ((err = cudaMemsetAsync(counts, 0, a.batch * sizeof(int), stream)) != cudaSuccess) return err;
    } else {
      const dim3 grid(ceil_div(n, kRankThreads / kRankSplit), a.batch);
      rank_sort_kernel<Geo, T>
          <<<grid, kRankThreads, 0, stream>>>(scores, boxes, classes, n, counts, order, sorted_boxes, sorted_classes);
    }
  } else {
    auto* offsets = reinterpret_cast<int*>(ws + l.offsets);
    auto* keys_in = reinterpret_cast<uint32_t*>(ws + l.keys_in);
    auto* keys_out = reinterpret_cast<uint32_t*>(ws + l.keys_out);
    auto* order_in = reinterpret_cast<int*>(ws + l.order_in);
    if ((err = cudaMemsetAsync(counts, 0, a.batch * sizeof(int), stream)) != cudaSuccess) return err;
    const dim3 grid(ceil_div(n, kPrepareThreads), a.batch);
    prepare_kernel<T><<<grid, kPrepareThreads, 0, stream>>>(scores, n, a.batch, keys_in, order_in, counts, offsets);
    size_t temp = l.sort_temp_bytes;
    // Bit 31 is 0 for every key (positive floats), so 31 bits are sorted.
    err = cub::DeviceSegmentedRadixSort::SortPairsDescending(ws + l.sort_temp, temp, keys_in, keys_out, order_in, order,
                                                             n * a.batch, a.batch, offsets, offsets + 1, 0, 31, stream);
    if (err != cudaSuccess) return err;
    gather_kernel<Geo, T>
        <<<grid, kPrepareThreads, 0, stream>>>(boxes, classes, n, counts, order, sorted_boxes, sorted_classes);
  }
  if (n > 0)
    mask_kernel<Geo><<<dim3(nw * (nw + 1) / 2, a.batch), kBlock, 0, stream>>>(
        sorted_boxes, sorted_classes, n, nw, a.iou_threshold, a.box_offset, counts, mask);
  const size_t removed_bytes = static_cast<size_t>(nw) * sizeof(unsigned long long);
  const bool in_shared = removed_bytes <= kMaxSharedRemoved;
  scan_kernel<Geo::kValues, T><<<a.batch, 32, in_shared ? removed_bytes : 0, stream>>>(
      scores, boxes, classes, n, nw, a.detections, counts, order, mask, removed, in_shared, keep, out_scores, out_boxes,
      out_classes);
  return cudaGetLastError();
}

bool valid(const NmsArgs& a) {
  return a.batch >= 0 && a.batch <= 65535 && a.num_candidates >= 0 && a.detections >= 0 &&
         std::isfinite(a.box_offset) && a.box_offset >= 0.f &&
         static_cast<size_t>(a.batch) * a.num_candidates < (size_t(1) << 31) &&
         static_cast<long long>(words(a.num_candidates)) * (words(a.num_candidates) + 1) / 2 < (1ll << 31);
}

// The entry points of both geometries: argument checks, then launch<Geo>.
template <class Geo>
cudaError_t run(const NmsArgs& args, DType dtype, const void* scores, const void* boxes, const int32_t* classes,
                void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace, size_t workspace_size,
                cudaStream_t stream) {
  if (!valid(args)) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.detections == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_size < layout<Geo>(args).total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  return detail::dispatch_float(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return launch<Geo>(args, static_cast<const T*>(scores), static_cast<const T*>(boxes), classes,
                       static_cast<T*>(out_scores), static_cast<T*>(out_boxes), out_classes, ws, stream);
  });
}

// Rotated boxes have no +1 pixel convention.
bool valid_rotated(const NmsArgs& a) { return valid(a) && a.box_offset == 0.f; }

}  // namespace

size_t nms_workspace_size(const NmsArgs& args) { return valid(args) ? layout<AxisGeometry>(args).total : 0; }

cudaError_t nms(const NmsArgs& args, DType dtype, const void* scores, const void* boxes, const int32_t* classes,
                void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace, size_t workspace_size,
                cudaStream_t stream) {
  return run<AxisGeometry>(args, dtype, scores, boxes, classes, out_scores, out_boxes, out_classes, workspace,
                           workspace_size, stream);
}

size_t nms_rotated_workspace_size(const NmsArgs& args) {
  return valid_rotated(args) ? layout<RotatedGeometry>(args).total : 0;
}

cudaError_t nms_rotated(const NmsArgs& args, DType dtype, const void* scores, const void* boxes, const int32_t* classes,
                        void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace, size_t workspace_size,
                        cudaStream_t stream) {
  if (!valid_rotated(args)) return cudaErrorInvalidValue;
  return run<RotatedGeometry>(args, dtype, scores, boxes, classes, out_scores, out_boxes, out_classes, workspace,
                              workspace_size, stream);
}

}  // namespace retinanet
