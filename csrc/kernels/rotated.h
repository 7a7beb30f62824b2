// Rotated boxes (docs/rotated.md): pairwise IoU, decode of one FPN level and greedy
// class-aware NMS, as plain CUDA entry points.
//
// A box is (cx, cy, w, h, θ), θ in radians, positive turning anti-clockwise on screen.
// Decode and NMS select, order and pad exactly as decode() and nms() do (decode.h,
// nms.h: the same kernels, only the box arithmetic differs), with 5 values per box.
// Everything runs on `stream`: no host synchronisation, no copies, no allocation,
// so a call can be captured in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/decode.h"
#include "kernels/dtype.h"
#include "kernels/nms.h"

namespace retinanet {

// out[i, j] = IoU(a[i], b[j]) for a [n, 5] and b [m, 5] float32, out [n, m] float32,
// all on the device. The exact area of the convex intersection over the union, in
// float32 with coordinates relative to a[i]'s centre; a box of zero area has IoU 0
// with everything, and no input gives NaN. Needs no workspace.
cudaError_t rotated_iou(int64_t n, int64_t m, const float* a, const float* b, float* out, cudaStream_t stream);

// Decode of one level. args as for decode(), except that box_offset must be 0 (rotated
// boxes have no +1 pixel convention).
// cls_scores:  [B, A*C, H, W] of `dtype`, sigmoid applied (channel a*C + c).
// box_deltas:  [B, A*6, H, W] of `dtype` (tx, ty, tw, th, ts, tc per anchor).
// anchors:     [A, 5] float32 on the device: (0, 0, w, h, α) relative to the cell centre.
// out_scores [B, top_n] and out_boxes [B, top_n, 5] of `dtype`, out_classes [B, top_n] int32.
// Boxes: cx = acx + tx·aw, cy = acy + ty·ah, w = aw·exp(min(tw, box_clamp)),
// h = ah·exp(min(th, box_clamp)), θ = wrap_half_turn(α + atan2(ts, tc) / 2) in (−π/2, π/2];
// not clipped. Unused slots: score 0, box 0, class -1.
size_t decode_rotated_workspace_size(const DecodeArgs& args);
cudaError_t decode_rotated(const DecodeArgs& args, DType dtype, const void* cls_scores, const void* box_deltas,
                           const float* anchors, void* out_scores, void* out_boxes, int32_t* out_classes,
                           void* workspace, size_t workspace_size, cudaStream_t stream);

// NMS as nms(), boxes [B, N, 5] and out_boxes [B, D, 5]: a candidate is suppressed by a
// kept one of its class with rotated IoU (the kept box first) > iou_threshold.
// args.box_offset must be 0.
size_t nms_rotated_workspace_size(const NmsArgs& args);
cudaError_t nms_rotated(const NmsArgs& args, DType dtype, const void* scores, const void* boxes, const int32_t* classes,
                        void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace, size_t workspace_size,
                        cudaStream_t stream);

}  // namespace retinanet
