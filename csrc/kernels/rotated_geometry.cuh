// Rotated-box geometry of docs/rotated.md for the kernels (CUDA only, not part of the API).
//
// A box is (cx, cy, w, h, θ): the w x h rectangle turned by θ about its centre, its
// corner at offset (dx, dy) lying at (cx + dx·cos θ + dy·sin θ, cy − dx·sin θ + dy·cos θ).
// IoU is the exact area of the convex intersection over the union, float32: the
// corners of each rectangle inside (or on) the other and the crossings of their
// edges, ordered by angle about their mean, summed by the shoelace formula.
// Coordinates are taken relative to the first box's centre, so that boxes far from
// the origin keep float32's precision. A box of zero area has IoU 0 with every box,
// itself included, and no input gives NaN (non-finite inputs give 0).
#pragma once

#include <cfloat>

#include <cuda_runtime.h>

namespace retinanet {
namespace rotated {

// At most 4 + 4 corners and 4 x 4 edge crossings.
constexpr int kMaxPoints = 24;

// A box prepared once for many IoUs: the turn's cosine and sine, its area and the
// radius of its circumscribed circle (for the quick "too far apart" test).
struct Box {
  float cx, cy, w, h;
  float cos_t, sin_t;
  float area, radius;
};

__device__ __forceinline__ Box make_box(float cx, float cy, float w, float h, float theta) {
  Box b;
  b.cx = cx;
  b.cy = cy;
  b.w = w;
  b.h = h;
  sincosf(theta, &b.sin_t, &b.cos_t);
  // Zero, negative or non-finite extents and non-finite angles or centres: no area,
  // which makes every IoU with the box 0 below.
  const bool usable = w > 0.f && h > 0.f && w <= FLT_MAX && h <= FLT_MAX && isfinite(b.cos_t) && isfinite(b.sin_t) &&
                      isfinite(cx) && isfinite(cy);
  b.area = usable ? w * h : 0.f;
  b.radius = 0.5f * sqrtf(w * w + h * h);
  return b;
}

// The corners in the order (−,−), (+,−), (+,+), (−,+), relative to (ox, oy).
__device__ __forceinline__ void corners(const Box& b, float ox, float oy, float2 out[4]) {
  const float x = b.cx - ox, y = b.cy - oy;
  const float hw = 0.5f * b.w, hh = 0.5f * b.h;
  const float sx[4] = {-hw, hw, hw, -hw};
  const float sy[4] = {-hh, -hh, hh, hh};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k].x = x + sx[k] * b.cos_t + sy[k] * b.sin_t;
    out[k].y = y - sx[k] * b.sin_t + sy[k] * b.cos_t;
  }
}

// Whether p (relative to (ox, oy), like the box's centre) lies inside or on the box: its
// offsets along the box's two axes within the half extents. `slack` absorbs the rounding
// of corners that lie exactly on the other box's edges (equal or touching boxes), so that
// such a corner counts as "on" instead of falling out by an ulp.
__device__ __forceinline__ bool contains(const Box& b, float ox, float oy, float2 p, float slack) {
  const float px = p.x - (b.cx - ox), py = p.y - (b.cy - oy);
  const float dx = px * b.cos_t - py * b.sin_t;
  const float dy = px * b.sin_t + py * b.cos_t;
  return fabsf(dx) <= 0.5f * b.w + slack && fabsf(dy) <= 0.5f * b.h + slack;
}

__device__ __forceinline__ float cross(float2 a, float2 b) { return a.x * b.y - a.y * b.x; }

// A monotone stand-in for atan2(y, x) in [0, 4): orders points by angle like atan2 does,
// without its cost. (0, 0), a point at the mean itself, gets 0.
__device__ __forceinline__ float pseudo_angle(float x, float y) {
  const float r = fabsf(x) + fabsf(y);
  if (!(r > 0.f)) return 0.f;
  const float t = y / r;  // in [-1, 1]
  return x >= 0.f ? (y >= 0.f ? t : 4.f + t) : 2.f - t;
}

// Area of the intersection of a and b, with coordinates relative to a's centre.
__device__ __forceinline__ float intersection_area(const Box& a, const Box& b) {
  const float ox = a.cx, oy = a.cy;
  float2 pa[4], pb[4];
  corners(a, ox, oy, pa);
  corners(b, ox, oy, pb);
  const float slack = 1e-5f * (a.radius + b.radius);

  float2 pts[kMaxPoints];
  int n = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (contains(b, ox, oy, pa[k], slack)) pts[n++] = pa[k];
    if (contains(a, ox, oy, pb[k], slack)) pts[n++] = pb[k];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p0 = pa[i], d1 = make_float2(pa[(i + 1) % 4].x - p0.x, pa[(i + 1) % 4].y - p0.y);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 q0 = pb[j], d2 = make_float2(pb[(j + 1) % 4].x - q0.x, pb[(j + 1) % 4].y - q0.y);
      const float den = cross(d1, d2);
      if (den == 0.f) continue;  // parallel: overlapping edges give their ends through contains()
      const float2 w = make_float2(q0.x - p0.x, q0.y - p0.y);
      const float t = cross(w, d2) / den;
      const float s = cross(w, d1) / den;
      if (t >= 0.f && t <= 1.f && s >= 0.f && s <= 1.f) pts[n++] = make_float2(p0.x + t * d1.x, p0.y + t * d1.y);
    }
  }
  if (n < 3) return 0.f;

  float mx = 0.f, my = 0.f;
  for (int k = 0; k < n; ++k) {
    mx += pts[k].x;
    my += pts[k].y;
  }
  mx /= n;
  my /= n;
  // Relative to the mean, then ordered by angle about it (insertion sort: n <= 24).
  float key[kMaxPoints];
  for (int k = 0; k < n; ++k) {
    pts[k].x -= mx;
    pts[k].y -= my;
    key[k] = pseudo_angle(pts[k].x, pts[k].y);
  }
  for (int k = 1; k < n; ++k) {
    const float2 p = pts[k];
    const float kk = key[k];
    int j = k - 1;
    while (j >= 0 && key[j] > kk) {
      pts[j + 1] = pts[j];
      key[j + 1] = key[j];
      --j;
    }
    pts[j + 1] = p;
    key[j + 1] = kk;
  }
  float twice = 0.f;
  for (int k = 0; k < n; ++k) twice += cross(pts[k], pts[(k + 1) % n]);
  return 0.5f * fabsf(twice);
}

// IoU of two prepared boxes; a is "the first box" whose centre is the origin.
__device__ __forceinline__ float iou(const Box& a, const Box& b) {
  if (!(a.area > 0.f) || !(b.area > 0.f)) return 0.f;
  const float dx = b.cx - a.cx, dy = b.cy - a.cy;
  // Circumscribed circles apart (with a margin for rounding): no common point at all.
  const float reach = (a.radius + b.radius) * 1.0001f;
  if (dx * dx + dy * dy > reach * reach) return 0.f;
  const float inter = intersection_area(a, b);
  const float result = inter / fmaxf(a.area + b.area - inter, FLT_MIN);
  // Rounding may take a near-total overlap a hair past 1; NaN (overflowing extents) -> 0.
  return result >= 0.f ? fminf(result, 1.f) : 0.f;
}

}  // namespace rotated
}  // namespace retinanet
