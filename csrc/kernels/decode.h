// Box decode of one FPN level, batched over images: plain CUDA entry points.
//
// Behaviour is ops/reference.py's decode(): per image keep the scores above
// score_threshold, take the top_n of them (score descending, ties by smaller
// flat index), decode their boxes against the anchors and clip to the input
// ([0, W*stride - box_offset] x [0, H*stride - box_offset]).
// Everything runs on `stream`: no host synchronisation, no host<->device
// copies, no allocation, so a call can be captured in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/dtype.h"

namespace retinanet {

struct DecodeArgs {
  int batch = 0;
  int num_anchors = 0;  // A
  int num_classes = 0;  // C
  int height = 0;       // H
  int width = 0;        // W
  int stride = 0;
  float score_threshold = 0.f;
  int top_n = 0;
  float box_clamp = 0.f;  // dw, dh are clamped to this before exp()
  // Box width convention: 0 (x2 - x1) or 1 (x2 - x1 + 1, converted ODTK models). Any
  // finite value >= 0 is accepted; see ops/reference.py for the formulas it enters.
  float box_offset = 0.f;
};

// Bytes of device workspace that decode() needs for these arguments.
size_t decode_workspace_size(const DecodeArgs& args);

// cls_scores:  [B, A*C, H, W] of `dtype`, sigmoid already applied (channel a*C + c).
// box_deltas:  [B, A*4, H, W] of `dtype` (dx, dy, dw, dh per anchor).
// anchors:     [A, 4] float32 on the device: the level's anchors centred on (0, 0).
// out_scores:  [B, top_n] of `dtype`;  out_boxes: [B, top_n, 4] of `dtype`;
// out_classes: [B, top_n] int32. Unused slots: score 0, box 0, class -1.
// All pointers are device pointers; workspace is at least decode_workspace_size().
// Returns cudaErrorInvalidValue for bad arguments, else the launch status.
cudaError_t decode(const DecodeArgs& args, DType dtype, const void* cls_scores, const void* box_deltas,
                   const float* anchors, void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace,
                   size_t workspace_size, cudaStream_t stream);

}  // namespace retinanet
