// RetinaNetNMS and RetinaNetNMSRotated (version "1"): greedy class-aware NMS over all
// levels' candidates as an IPluginV3.
//
// Inputs:  0 scores [B, N], 1 boxes [B, N, V] (FP32, FP16 or BF16, one type), 2 classes [B, N] INT32.
// Outputs: 0 scores [B, D], 1 boxes [B, D, V] (input type), 2 classes [B, D] INT32; D = detections.
//          Padding: score 0, box 0, class -1.
// Fields:  nms_iou (f32), detections (i32), and for axis-aligned boxes only
//          box_offset (f32, optional: 0 when absent; 1 for the +1 pixel box convention).
//   RetinaNetNMS:        V = 4 (x1, y1, x2, y2), axis-aligned IoU.
//   RetinaNetNMSRotated: V = 5 (cx, cy, w, h, θ), the rotated IoU of docs/rotated.md.
// The NMS itself is csrc/kernels/nms.h and rotated.h, shared with the torch ops.
#pragma once

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "kernels/nms.h"
#include "kernels/rotated.h"
#include "plugins/plugin_base.h"

namespace retinanet {
namespace plugins {

// What differs between the two NMS plugins: names, box size and the kernel.
struct AxisNms {
  static constexpr char const* kName = "RetinaNetNMS";
  static constexpr char const* kInputs = "scores [B, N], boxes [B, N, 4] and classes [B, N]";
  static constexpr int32_t kBoxValues = 4;
  static constexpr bool kHasBoxOffset = true;
  static size_t workspace_size(NmsArgs const& args) { return nms_workspace_size(args); }
  static constexpr auto kKernel = &nms;
};

struct RotatedNms {
  static constexpr char const* kName = "RetinaNetNMSRotated";
  static constexpr char const* kInputs = "scores [B, N], boxes [B, N, 5] and classes [B, N]";
  static constexpr int32_t kBoxValues = 5;
  static constexpr bool kHasBoxOffset = false;  // rotated boxes have no +1 pixel convention
  static size_t workspace_size(NmsArgs const& args) { return nms_rotated_workspace_size(args); }
  static constexpr auto kKernel = &nms_rotated;
};

template <class Kind>
struct NmsParamsT {
  float nms_iou = 0.f;
  int32_t detections = 0;
  float box_offset = 0.f;  // axis only, optional field: files written before it measure IoU with 0

  // The plugin fields, in serialization order.
  std::vector<FieldRef> fields();
  // Empty if valid, else what is wrong.
  std::string check() const;
};

template <class Kind>
class NmsPluginT : public PluginBase<NmsPluginT<Kind>, NmsParamsT<Kind>> {
  using Base = PluginBase<NmsPluginT<Kind>, NmsParamsT<Kind>>;

 public:
  static constexpr char const* kName = Kind::kName;
  static constexpr char const* kInputs = Kind::kInputs;
  static constexpr int32_t kNbInputs = 3;
  static constexpr int32_t kScoresRank = 2;
  static constexpr int32_t kBoxValues = Kind::kBoxValues;
  static bool is_int_input(int32_t pos) { return pos == 2; }  // classes
  int32_t output_length() const { return this->params_.detections; }

  explicit NmsPluginT(NmsParamsT<Kind> params);

 private:
  friend Base;
  using Args = NmsArgs;

  bool make_args(nvinfer1::Dims const* inputs, NmsArgs* args) const;
  static size_t workspace_size(NmsArgs const& args) { return Kind::workspace_size(args); }
  cudaError_t run(NmsArgs const& args, DType dtype, void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream);
};

// Both are compiled once, in nms_plugin.cpp.
extern template struct NmsParamsT<AxisNms>;
extern template struct NmsParamsT<RotatedNms>;
extern template class NmsPluginT<AxisNms>;
extern template class NmsPluginT<RotatedNms>;

using NmsParams = NmsParamsT<AxisNms>;
using NmsPlugin = NmsPluginT<AxisNms>;
using NmsPluginCreator = PluginCreatorBase<NmsPlugin, NmsParams>;

using NmsRotatedParams = NmsParamsT<RotatedNms>;
using NmsRotatedPlugin = NmsPluginT<RotatedNms>;
using NmsRotatedPluginCreator = PluginCreatorBase<NmsRotatedPlugin, NmsRotatedParams>;

}  // namespace plugins
}  // namespace retinanet
