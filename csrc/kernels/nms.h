// Greedy class-aware NMS, batched over images: plain CUDA entry points.
//
// Behaviour is ops/reference.py's nms(): per image, candidates with score > 0
// in score order (ties by smaller input position); a candidate is suppressed
// by a kept one of the same class with IoU > iou_threshold; the first
// `detections` survivors are written, the rest is padding. Everything runs on
// `stream`: no host synchronisation, no copies, no allocation (CUDA-graph safe).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/dtype.h"

namespace retinanet {

struct NmsArgs {
  int batch = 0;
  int num_candidates = 0;  // N per image
  float iou_threshold = 0.f;
  int detections = 0;  // D
  // Box width convention: 0 (x2 - x1) or 1 (x2 - x1 + 1, converted ODTK models), in the
  // areas and intersections of the IoU. Any finite value >= 0 is accepted.
  float box_offset = 0.f;
};

// Bytes of device workspace that nms() needs for these arguments.
size_t nms_workspace_size(const NmsArgs& args);

// scores [B, N] and boxes [B, N, 4] (x1, y1, x2, y2) of `dtype`, classes [B, N] int32.
// out_scores [B, D] and out_boxes [B, D, 4] of `dtype`, out_classes [B, D] int32.
// Unused slots: score 0, box 0, class -1.
cudaError_t nms(const NmsArgs& args, DType dtype, const void* scores, const void* boxes, const int32_t* classes,
                void* out_scores, void* out_boxes, int32_t* out_classes, void* workspace, size_t workspace_size,
                cudaStream_t stream);

}  // namespace retinanet
