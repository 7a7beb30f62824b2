// Decode of one FPN level, batched over images (see decode.h).
//
// Top-n selection is a radix select on the 64-bit key
//   U = float_key(score) << 32 | (0xffffffff - flat_index)
// which is unique and orders candidates exactly as the reference does (score
// descending, ties by smaller index).
//  pass 0 (whole grid): histogram the top 16 bits of U over the candidates;
//    the last block to finish finds the 16-bit digit that holds the top_n-th
//    candidate (a 256-bin coarse histogram first, then 256 fine bins).
//  pass 1 (whole grid): collect every candidate above that digit, and the
//    candidates of the boundary digit (the "bucket") when they fit its buffer.
//  refine (one block per image, nothing to do unless the bucket overflowed,
//    i.e. more than kBucketCapacity candidates share the boundary's top 16
//    bits): the same, digit by digit, on the next 16 bits; U is unique, so it
//    ends by the fourth digit.
// Kernels return at once for images that are done, so the host never looks at
// a count. The emit kernel ranks the (< top_n + bucket) collected keys: a key's
// rank is its output slot. It decodes the top `count` boxes and pads the rest.
// Rotated boxes (rotated.h) share all of it: only the emit kernel's box arithmetic,
// a coder policy (AxisCoder, RotatedCoder), differs.
#include "kernels/decode.h"

#include <algorithm>
#include <cmath>

#include <cub/block/block_scan.cuh>

#include "kernels/device_utils.cuh"
#include "kernels/rotated.h"

namespace retinanet {
namespace {

using detail::ceil_div;
using detail::Pack;

constexpr int kThreads = 256;         // grid passes and emit
constexpr int kRefineThreads = 1024;  // one block per image
constexpr int kDigitBits = 16;
constexpr int kBins = 1 << kDigitBits;
constexpr int kCoarseBits = 8;
constexpr int kCoarse = 1 << kCoarseBits;  // fine bins per coarse bin: kBins / kCoarse = 256
constexpr int kDigits = 64 / kDigitBits;
constexpr uint32_t kBucketCapacity = 4096;
constexpr int kFinished = 1 << 20;
constexpr int kRankSplit = 4;    // threads that share one key's ranking
constexpr int kRankTile = 1024;  // keys per shared-memory tile when ranking
// Pass 0 counts in shared memory first: most scores sit just above the
// threshold, and global atomics on those few bins would serialise. The window
// covers the 4096 digits from the threshold's up (32 octaves of scores).
constexpr uint32_t kWindow = 4096;

struct alignas(64) DecodeState {
  unsigned long long prefix;  // the digits of U found so far
  int level;                  // digits found so far; kFinished once collected
  int fits;                   // the boundary bucket fits its buffer: the next pass collects
  int select_all;             // no more candidates than top_n: keep all of them
  int count;                  // min(#candidates, top_n)
  uint32_t need;              // how many of the boundary bucket are kept
  uint32_t selected;          // collected keys above the boundary digit
  uint32_t bucketed;          // collected keys in the boundary digit
  uint32_t blocks_done;       // for the last-block search
};

struct Layout {
  size_t states, coarse, hist, selected, bucket, zeroed, total;
};

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

Layout layout(const DecodeArgs& a) {
  Layout l{};
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    size_t at = off;
    off = align_up(off + bytes);
    return at;
  };
  const size_t batch = static_cast<size_t>(a.batch);
  l.states = take(batch * sizeof(DecodeState));
  l.coarse = take(batch * kCoarse * sizeof(uint32_t));
  l.hist = take(batch * kBins * sizeof(uint32_t));
  l.zeroed = off;  // states and histograms start at zero
  l.selected = take(batch * static_cast<size_t>(a.top_n) * sizeof(uint64_t));
  l.bucket = take(batch * kBucketCapacity * sizeof(uint64_t));
  l.total = off;
  return l;
}

// One image's buffers.
struct ImageBuffers {
  DecodeState* st;
  uint32_t* coarse;  // [kCoarse] global
  uint32_t* hist;    // [kBins]
  uint64_t* sel;     // [top_n]
  uint64_t* bkt;     // [kBucketCapacity]
};

__device__ __forceinline__ ImageBuffers image_buffers(int b, int top_n, DecodeState* states, uint32_t* coarse,
                                                      uint32_t* hists, uint64_t* selected, uint64_t* bucket) {
  return {states + b, coarse + static_cast<size_t>(b) * kCoarse, hists + static_cast<size_t>(b) * kBins,
          selected + static_cast<size_t>(b) * top_n, bucket + static_cast<size_t>(b) * kBucketCapacity};
}

// Find the digit (at position `digit`) of the need-th largest histogrammed key
// and record it in the state; zero the histograms it used. Whole block.
template <int THREADS>
__device__ void search_digit(const ImageBuffers& im, int digit, int top_n) {
  static_assert(THREADS >= kCoarse, "one thread per bin");
  using BlockScan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint32_t coarse_counts[kCoarse];
  __shared__ uint32_t found_coarse, coarse_above, found_bin, found_above, found_count;
  const int t = threadIdx.x;

  // Coarse: thread t < 256 holds coarse bin 255 - t (the highest first).
  const uint32_t c = t < kCoarse ? __ldcg(im.coarse + (kCoarse - 1 - t)) : 0u;
  if (t < kCoarse) coarse_counts[kCoarse - 1 - t] = c;
  uint32_t before, total;
  BlockScan(scan_storage).ExclusiveSum(c, before, total);
  const bool first = digit == 0;
  const uint32_t need = first ? static_cast<uint32_t>(top_n) : __ldcg(&im.st->need);
  const bool take_all = first && total <= static_cast<uint32_t>(top_n);
  if (!take_all && before < need && need <= before + c) {
    found_coarse = kCoarse - 1 - t;
    coarse_above = before;
  }
  __syncthreads();

  if (!take_all) {  // fine: the 256 bins of that coarse bin, again highest first
    const uint32_t cbin = found_coarse;
    const uint32_t f = t < kCoarse ? __ldcg(im.hist + cbin * kCoarse + (kCoarse - 1 - t)) : 0u;
    uint32_t fbefore;
    BlockScan(scan_storage).ExclusiveSum(f, fbefore);
    const uint32_t above = coarse_above + fbefore;
    if (above < need && need <= above + f) {
      found_bin = cbin * kCoarse + (kCoarse - 1 - t);
      found_above = above;
      found_count = f;
    }
  }
  __syncthreads();

  // Zero what was counted: the fine bins of every non-empty coarse bin.
  for (int cb = 0; cb < kCoarse; ++cb)
    if (coarse_counts[cb] != 0 && t < kCoarse) __stcg(im.hist + cb * kCoarse + t, 0u);
  if (t < kCoarse) __stcg(im.coarse + t, 0u);

  if (t == 0) {
    DecodeState* st = im.st;
    if (take_all) {
      st->select_all = 1;
      st->fits = 1;
      st->count = static_cast<int>(total);
    } else {
      if (first) st->count = top_n;
      st->prefix = (st->prefix << kDigitBits) | found_bin;
      st->need = need - found_above;
      st->fits = found_count <= kBucketCapacity;
    }
    st->level = digit + 1;
    st->blocks_done = 0;
  }
  __syncthreads();
}

// Visit this thread's share of one image's scores for pass `pass`:
// pass 0 histograms digit 0 (into `window` where it can); pass p >= 1 collects
// the keys decided by the first p digits and, while the bucket is too large,
// histograms digit p.
template <typename T, int V>
__device__ __forceinline__ void pass_body(const T* __restrict__ scores, uint32_t per_image, uint32_t first,
                                          uint32_t step, float threshold, int top_n, int pass, bool all, bool fits,
                                          uint64_t prefix, const ImageBuffers& im, uint32_t* coarse_shared,
                                          uint32_t* window, uint32_t window_base) {
  const int shift = 64 - kDigitBits * pass;
  auto count = [&](uint32_t digit) {
    atomicAdd(im.hist + digit, 1u);
    atomicAdd(coarse_shared + (digit >> (kDigitBits - kCoarseBits)), 1u);
  };
  auto visit = [&](float f, uint32_t idx) {
    if (!(f > threshold)) return;
    const uint32_t key = detail::float_key(f);
    if (pass == 0) {
      const uint32_t digit = key >> (32 - kDigitBits);
      if (window != nullptr && digit - window_base < kWindow)
        atomicAdd(window + (digit - window_base), 1u);
      else
        count(digit);
      return;
    }
    const uint64_t u = (static_cast<uint64_t>(key) << 32) | (0xffffffffu - idx);
    if (all) {
      const uint32_t slot = atomicAdd(&im.st->selected, 1u);
      if (slot < static_cast<uint32_t>(top_n)) im.sel[slot] = u;
      return;
    }
    const uint64_t p = u >> shift;
    if (p > prefix) {
      // New only if it was in the previous pass's bucket.
      if (pass == 1 || (p >> kDigitBits) == (prefix >> kDigitBits)) {
        const uint32_t slot = atomicAdd(&im.st->selected, 1u);
        if (slot < static_cast<uint32_t>(top_n)) im.sel[slot] = u;
      }
    } else if (p == prefix) {
      if (fits) {
        const uint32_t slot = atomicAdd(&im.st->bucketed, 1u);
        if (slot < kBucketCapacity) im.bkt[slot] = u;
      } else if (pass < kDigits) {
        count(static_cast<uint32_t>(u >> (shift - kDigitBits)) & (kBins - 1));
      }
    }
  };

  const Pack<T, V>* packs = reinterpret_cast<const Pack<T, V>*>(scores);
  const uint32_t nvec = per_image / V;
  uint32_t i = first;
  for (; i + 3 * step < nvec; i += 4 * step) {  // four loads in flight per thread
    Pack<T, V> q[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) q[k] = packs[i + k * step];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) visit(detail::to_float(q[k].v[e]), (i + k * step) * V + e);
  }
  for (; i < nvec; i += step) {
    const Pack<T, V> q = packs[i];
#pragma unroll
    for (int e = 0; e < V; ++e) visit(detail::to_float(q.v[e]), i * V + e);
  }
}

__device__ __forceinline__ void flush_coarse(uint32_t* coarse_shared, uint32_t* coarse, int threads) {
  for (int k = threadIdx.x; k < kCoarse; k += threads)
    if (coarse_shared[k] != 0) atomicAdd(coarse + k, coarse_shared[k]);
}

// Pass 0 or 1 over one level (grid: blocks per image x batch).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    select_kernel(const T* __restrict__ scores, uint32_t per_image, float threshold, int top_n, int pass,
                  DecodeState* states, uint32_t* coarse, uint32_t* hists, uint64_t* selected, uint64_t* bucket) {
  __shared__ uint32_t coarse_shared[kCoarse];
  __shared__ uint32_t window[kWindow];
  __shared__ bool last;
  const int b = blockIdx.y;
  const ImageBuffers im = image_buffers(b, top_n, states, coarse, hists, selected, bucket);
  if (im.st->level != pass) return;  // same answer for every block of the image
  const bool all = im.st->select_all;
  const bool fits = im.st->fits;
  const uint64_t prefix = im.st->prefix;
  const uint32_t window_base = detail::float_key(threshold) >> (32 - kDigitBits);
  for (int k = threadIdx.x; k < kCoarse; k += kThreads) coarse_shared[k] = 0;
  if (pass == 0)
    for (int k = threadIdx.x; k < static_cast<int>(kWindow); k += kThreads) window[k] = 0;
  __syncthreads();
  pass_body<T, V>(scores + static_cast<size_t>(b) * per_image, per_image, blockIdx.x * kThreads + threadIdx.x,
                  gridDim.x * kThreads, threshold, top_n, pass, all, fits, prefix, im, coarse_shared,
                  pass == 0 ? window : nullptr, window_base);
  __syncthreads();
  if (pass == 0) {  // the window's counts go to the image's histograms
    for (int k = threadIdx.x; k < static_cast<int>(kWindow); k += kThreads) {
      const uint32_t c = window[k];
      if (c != 0) {
        const uint32_t digit = window_base + k;
        atomicAdd(im.hist + digit, c);
        atomicAdd(coarse_shared + (digit >> (kDigitBits - kCoarseBits)), c);
      }
    }
    __syncthreads();
  }
  flush_coarse(coarse_shared, im.coarse, kThreads);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&im.st->blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (pass > 0 && (fits || all)) {
    if (threadIdx.x == 0) {
      im.st->level = kFinished;
      im.st->blocks_done = 0;
    }
    return;
  }
  search_digit<kThreads>(im, pass, top_n);
}

// Digits 2..4 for images whose boundary bucket overflowed: one block per image
// does the remaining passes itself (rare: only heavy score ties get here).
template <typename T, int V>
__global__ void __launch_bounds__(kRefineThreads)
    refine_kernel(const T* __restrict__ scores, uint32_t per_image, float threshold, int top_n, DecodeState* states,
                  uint32_t* coarse, uint32_t* hists, uint64_t* selected, uint64_t* bucket) {
  __shared__ uint32_t coarse_shared[kCoarse];
  const int b = blockIdx.x;
  const ImageBuffers im = image_buffers(b, top_n, states, coarse, hists, selected, bucket);
  for (int pass = 2; pass <= kDigits; ++pass) {
    if (__ldcg(&im.st->level) != pass) return;  // block-uniform
    const bool fits = __ldcg(&im.st->fits);
    const uint64_t prefix = __ldcg(&im.st->prefix);
    for (int k = threadIdx.x; k < kCoarse; k += kRefineThreads) coarse_shared[k] = 0;
    __syncthreads();
    pass_body<T, V>(scores + static_cast<size_t>(b) * per_image, per_image, threadIdx.x, kRefineThreads, threshold,
                    top_n, pass, false, fits, prefix, im, coarse_shared, nullptr, 0);
    __syncthreads();
    flush_coarse(coarse_shared, im.coarse, kRefineThreads);
    __threadfence();
    __syncthreads();
    if (fits) {
      if (threadIdx.x == 0) im.st->level = kFinished;
      return;
    }
    search_digit<kRefineThreads>(im, pass, top_n);
  }
}

// One candidate's box from its anchor (centred on (0, 0)), the cell centre (cx, cy) and
// its deltas d = (dx, dy, dw, dh), clipped to [0, xmax] x [0, ymax]: the float32
// operations of ops/box.py decode(), in its order, rounded one by one (no FMA
// contraction), so that results equal the reference's. `offset` is the box width
// convention (1: a width counts both end pixels); with 0 its terms add and subtract
// an exact zero, which changes no bit.
__device__ __forceinline__ void decode_box(const float* __restrict__ anchor, float cx, float cy, float4 d, float clamp,
                                           float offset, float xmax, float ymax, float box[4]) {
  const float ax1 = __fadd_rn(anchor[0], cx);
  const float ay1 = __fadd_rn(anchor[1], cy);
  const float ax2 = __fadd_rn(anchor[2], cx);
  const float ay2 = __fadd_rn(anchor[3], cy);
  const float aw = __fadd_rn(__fsub_rn(ax2, ax1), offset);
  const float ah = __fadd_rn(__fsub_rn(ay2, ay1), offset);
  const float acx = __fadd_rn(ax1, __fmul_rn(0.5f, aw));
  const float acy = __fadd_rn(ay1, __fmul_rn(0.5f, ah));
  const float pcx = __fadd_rn(acx, __fmul_rn(d.x, aw));
  const float pcy = __fadd_rn(acy, __fmul_rn(d.y, ah));
  const float pw = __fmul_rn(aw, expf(detail::clamp_max(d.z, clamp)));
  const float ph = __fmul_rn(ah, expf(detail::clamp_max(d.w, clamp)));
  const float half_w = __fmul_rn(0.5f, pw);
  const float half_h = __fmul_rn(0.5f, ph);
  box[0] = detail::clamp_max(detail::clamp_min0(__fsub_rn(pcx, half_w)), xmax);
  box[1] = detail::clamp_max(detail::clamp_min0(__fsub_rn(pcy, half_h)), ymax);
  box[2] = detail::clamp_max(detail::clamp_min0(__fsub_rn(__fadd_rn(pcx, half_w), offset)), xmax);
  box[3] = detail::clamp_max(detail::clamp_min0(__fsub_rn(__fadd_rn(pcy, half_h), offset)), ymax);
}

// What the emit kernel needs to decode one level's boxes.
struct LevelGeometry {
  int width, height;
  float stride, box_clamp, box_offset;
};

// Axis-aligned boxes: anchors [A, 4] centred on (0, 0), deltas (dx, dy, dw, dh), boxes
// (x1, y1, x2, y2) clipped to the level's extent.
struct AxisCoder {
  static constexpr int kAnchorValues = 4;
  static constexpr int kDeltas = 4;
  static constexpr int kValues = 4;

  __device__ static void decode(const float* __restrict__ anchor, uint32_t x, uint32_t y, const float* d,
                                const LevelGeometry& g, float box[kValues]) {
    const float cx = __fmul_rn(__fadd_rn(static_cast<float>(x), 0.5f), g.stride);
    const float cy = __fmul_rn(__fadd_rn(static_cast<float>(y), 0.5f), g.stride);
    // The level's extent; with the +1 convention its last pixel starts at extent - 1.
    const float xmax = __fsub_rn(__fmul_rn(static_cast<float>(g.width), g.stride), g.box_offset);
    const float ymax = __fsub_rn(__fmul_rn(static_cast<float>(g.height), g.stride), g.box_offset);
    decode_box(anchor, cx, cy, make_float4(d[0], d[1], d[2], d[3]), g.box_clamp, g.box_offset, xmax, ymax, box);
  }
};

// Rotated boxes (docs/rotated.md): anchors [A, 5] (0, 0, w, h, α) relative to the cell
// centre, deltas (tx, ty, tw, th, ts, tc), boxes (cx, cy, w, h, θ), not clipped. Float32
// operations rounded one by one (no FMA contraction), in the order of the formulas.
struct RotatedCoder {
  static constexpr int kAnchorValues = 5;
  static constexpr int kDeltas = 6;
  static constexpr int kValues = 5;

  __device__ static void decode(const float* __restrict__ anchor, uint32_t x, uint32_t y, const float* d,
                                const LevelGeometry& g, float box[kValues]) {
    constexpr float kPi = 3.14159265358979323846f;
    // torch divides a CUDA tensor by a scalar as a product with the scalar's float32
    // reciprocal; the reference's wrap does, so this does too.
    constexpr float kInvPi = 1.f / kPi;
    const float cx = __fmul_rn(__fadd_rn(static_cast<float>(x), 0.5f), g.stride);
    const float cy = __fmul_rn(__fadd_rn(static_cast<float>(y), 0.5f), g.stride);
    const float acx = __fadd_rn(cx, anchor[0]);
    const float acy = __fadd_rn(cy, anchor[1]);
    const float aw = anchor[2], ah = anchor[3];
    box[0] = __fadd_rn(acx, __fmul_rn(d[0], aw));
    box[1] = __fadd_rn(acy, __fmul_rn(d[1], ah));
    box[2] = __fmul_rn(aw, expf(detail::clamp_max(d[2], g.box_clamp)));
    box[3] = __fmul_rn(ah, expf(detail::clamp_max(d[3], g.box_clamp)));
    // atan2(0, 0) = 0; the scale of (ts, tc) does not matter. A half turn is the same
    // rectangle, so the angle wraps into (−π/2, π/2]: θ − π·ceil((θ − π/2) / π).
    const float theta = __fadd_rn(anchor[4], __fmul_rn(atan2f(d[4], d[5]), 0.5f));
    const float turns = ceilf(__fmul_rn(__fsub_rn(theta, 0.5f * kPi), kInvPi));
    box[4] = __fsub_rn(theta, __fmul_rn(kPi, turns));
  }
};

// Rank the collected keys (unique, so a key's rank is its output slot), decode
// the top `count` of them and pad the rest of the image's top_n slots.
// kRankSplit threads rank one key, each against a share of the keys.
template <class Coder, typename T>
__global__ void __launch_bounds__(kThreads)
    emit_kernel(const T* __restrict__ deltas, const float* __restrict__ anchors, int num_anchors, int num_classes,
                LevelGeometry level, int top_n, const DecodeState* __restrict__ states,
                const uint64_t* __restrict__ selected, const uint64_t* __restrict__ bucket, T* __restrict__ out_scores,
                T* __restrict__ out_boxes, int32_t* __restrict__ out_classes) {
  constexpr int kPerBlock = kThreads / kRankSplit;
  __shared__ uint64_t tile[kRankTile];
  const int b = blockIdx.y;
  const DecodeState& st = states[b];
  const int count = st.count;
  const int nsel = static_cast<int>(min(st.selected, static_cast<uint32_t>(top_n)));
  const int m = nsel + static_cast<int>(min(st.bucketed, kBucketCapacity));
  if (static_cast<int>(blockIdx.x) * kPerBlock >= max(m, top_n)) return;  // whole block

  const uint64_t* sel = selected + static_cast<size_t>(b) * top_n;
  const uint64_t* bkt = bucket + static_cast<size_t>(b) * kBucketCapacity;
  const int part = threadIdx.x % kRankSplit;
  const int i = blockIdx.x * kPerBlock + threadIdx.x / kRankSplit;
  const uint64_t mine = i < m ? (i < nsel ? sel[i] : bkt[i - nsel]) : 0;
  int rank = 0;
  for (int base = 0; base < m; base += kRankTile) {
    __syncthreads();
#pragma unroll
    for (int k = threadIdx.x; k < kRankTile; k += kThreads) {
      const int j = base + k;
      tile[k] = j < m ? (j < nsel ? sel[j] : bkt[j - nsel]) : 0;
    }
    __syncthreads();
    if (i < m) {
      const int n = min(kRankTile, m - base);
      for (int k = part; k < n; k += kRankSplit) rank += tile[k] > mine;
    }
  }
#pragma unroll
  for (int off = 1; off < kRankSplit; off <<= 1) rank += __shfl_xor_sync(0xffffffffu, rank, off);
  if (part != 0) return;

  const size_t out = static_cast<size_t>(b) * top_n;
  if (i < m && rank < count) {
    const uint32_t idx = 0xffffffffu - static_cast<uint32_t>(mine);
    const float score = detail::key_float(static_cast<uint32_t>(mine >> 32));
    constexpr int V = Coder::kValues;
    const uint32_t hw = static_cast<uint32_t>(level.height) * level.width;
    const uint32_t a = idx / (static_cast<uint32_t>(num_classes) * hw);
    const uint32_t c = (idx / hw) % num_classes;
    const uint32_t cell = idx % hw;
    const uint32_t y = cell / level.width;
    const uint32_t x = cell % level.width;
    const T* dp = deltas + (static_cast<size_t>(b) * num_anchors + a) * Coder::kDeltas * hw + cell;
    float d[Coder::kDeltas];
#pragma unroll
    for (int k = 0; k < Coder::kDeltas; ++k) d[k] = detail::to_float(dp[k * hw]);
    float box[V];
    Coder::decode(anchors + Coder::kAnchorValues * a, x, y, d, level, box);
    const size_t slot = out + rank;
    out_scores[slot] = detail::from_float<T>(score);
#pragma unroll
    for (int k = 0; k < V; ++k) out_boxes[slot * V + k] = detail::from_float<T>(box[k]);
    out_classes[slot] = static_cast<int32_t>(c);
  }
  if (i >= count && i < top_n) {
    constexpr int V = Coder::kValues;
    const size_t slot = out + i;
    out_scores[slot] = detail::from_float<T>(0.f);
#pragma unroll
    for (int k = 0; k < V; ++k) out_boxes[slot * V + k] = detail::from_float<T>(0.f);
    out_classes[slot] = -1;
  }
}

template <class Coder, typename T>
cudaError_t launch(const DecodeArgs& a, const T* scores, const T* deltas, const float* anchors, T* out_scores,
                   T* out_boxes, int32_t* out_classes, char* ws, cudaStream_t stream) {
  const Layout l = layout(a);
  auto* states = reinterpret_cast<DecodeState*>(ws + l.states);
  auto* coarse = reinterpret_cast<uint32_t*>(ws + l.coarse);
  auto* hist = reinterpret_cast<uint32_t*>(ws + l.hist);
  auto* selected = reinterpret_cast<uint64_t*>(ws + l.selected);
  auto* bucket = reinterpret_cast<uint64_t*>(ws + l.bucket);
  cudaError_t err = cudaMemsetAsync(ws, 0, l.zeroed, stream);
  if (err != cudaSuccess) return err;

  int device = 0, sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;

  const uint32_t per_image =
      static_cast<uint32_t>(static_cast<size_t>(a.num_anchors) * a.num_classes * a.height * a.width);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(scores) % 16 == 0 && per_image % kVec == 0;
  const long long nvec = vec ? per_image / kVec : per_image;
  // About 8 blocks per SM over the whole batch, fewer for small levels.
  const int blocks = std::max(1, std::min(ceil_div(sms * 8LL, a.batch), ceil_div(nvec, kThreads * 4LL)));
  const dim3 grid(blocks, a.batch);
  for (int pass = 0; pass <= 1; ++pass) {
    if (vec)
      select_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(scores, per_image, a.score_threshold, a.top_n, pass, states,
                                                            coarse, hist, selected, bucket);
    else
      select_kernel<T, 1><<<grid, kThreads, 0, stream>>>(scores, per_image, a.score_threshold, a.top_n, pass, states,
                                                         coarse, hist, selected, bucket);
  }
  if (vec)
    refine_kernel<T, kVec><<<a.batch, kRefineThreads, 0, stream>>>(scores, per_image, a.score_threshold, a.top_n,
                                                                   states, coarse, hist, selected, bucket);
  else
    refine_kernel<T, 1><<<a.batch, kRefineThreads, 0, stream>>>(scores, per_image, a.score_threshold, a.top_n, states,
                                                                coarse, hist, selected, bucket);
  const dim3 emit_grid(ceil_div(static_cast<long long>(a.top_n) + kBucketCapacity, kThreads / kRankSplit), a.batch);
  const LevelGeometry level{a.width, a.height, static_cast<float>(a.stride), a.box_clamp, a.box_offset};
  emit_kernel<Coder, T><<<emit_grid, kThreads, 0, stream>>>(deltas, anchors, a.num_anchors, a.num_classes, level,
                                                            a.top_n, states, selected, bucket, out_scores, out_boxes,
                                                            out_classes);
  return cudaGetLastError();
}

// deltas: values per anchor in box_deltas (4 or 6).
bool valid(const DecodeArgs& a, int deltas) {
  if (a.batch < 0 || a.batch > 65535 || a.num_anchors <= 0 || a.num_classes <= 0 || a.height < 0 || a.width < 0 ||
      a.top_n < 0 || a.stride <= 0 || !(std::isfinite(a.box_offset) && a.box_offset >= 0.f))
    return false;
  const size_t per_image = static_cast<size_t>(a.num_anchors) * a.num_classes * a.height * a.width;
  return per_image < (size_t(1) << 31) &&
         static_cast<size_t>(a.num_anchors) * deltas * a.height * a.width < (size_t(1) << 31);
}

// Rotated boxes have no +1 pixel convention.
bool valid_for(const DecodeArgs& a, AxisCoder) { return valid(a, AxisCoder::kDeltas); }
bool valid_for(const DecodeArgs& a, RotatedCoder) { return valid(a, RotatedCoder::kDeltas) && a.box_offset == 0.f; }

// The entry points of both box kinds: argument checks, then launch<Coder>.
template <class Coder>
cudaError_t run(const DecodeArgs& args, DType dtype, const void* cls_scores, const void* box_deltas,
                const float* anchors, void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace,
                size_t workspace_size, cudaStream_t stream) {
  if (!valid_for(args, Coder{})) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.top_n == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_size < layout(args).total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  return detail::dispatch_float(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return launch<Coder>(args, static_cast<const T*>(cls_scores), static_cast<const T*>(box_deltas), anchors,
                         static_cast<T*>(out_scores), static_cast<T*>(out_boxes), out_classes, ws, stream);
  });
}

}  // namespace

size_t decode_workspace_size(const DecodeArgs& args) { return valid_for(args, AxisCoder{}) ? layout(args).total : 0; }

cudaError_t decode(const DecodeArgs& args, DType dtype, const void* cls_scores, const void* box_deltas,
                   const float* anchors, void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace,
                   size_t workspace_size, cudaStream_t stream) {
  return run<AxisCoder>(args, dtype, cls_scores, box_deltas, anchors, out_scores, out_boxes, out_classes, workspace,
                        workspace_size, stream);
}

size_t decode_rotated_workspace_size(const DecodeArgs& args) {
  return valid_for(args, RotatedCoder{}) ? layout(args).total : 0;
}

cudaError_t decode_rotated(const DecodeArgs& args, DType dtype, const void* cls_scores, const void* box_deltas,
                           const float* anchors, void* out_scores, void* out_boxes, int32_t* out_classes,
                           void* workspace, size_t workspace_size, cudaStream_t stream) {
  return run<RotatedCoder>(args, dtype, cls_scores, box_deltas, anchors, out_scores, out_boxes, out_classes, workspace,
                           workspace_size, stream);
}

}  // namespace retinanet
