// RetinaNetNMS (version "1"): greedy class-aware NMS over all levels' candidates as an IPluginV3.
//
// Inputs:  0 scores [B, N], 1 boxes [B, N, 4] (FP32, FP16 or BF16, one type), 2 classes [B, N] INT32.
// Outputs: 0 scores [B, D], 1 boxes [B, D, 4] (input type), 2 classes [B, D] INT32; D = detections.
//          Padding: score 0, box 0, class -1.
// Fields:  nms_iou (f32), detections (i32),
//          box_offset (f32, optional: 0 when absent; 1 for the +1 pixel box convention).
// The NMS itself is csrc/kernels/nms.h, shared with the torch op.
#pragma once

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "kernels/nms.h"
#include "plugins/plugin_base.h"

namespace retinanet {
namespace plugins {

struct NmsParams {
  float nms_iou = 0.f;
  int32_t detections = 0;
  float box_offset = 0.f;  // optional field: files written before it measure IoU with 0

  // The plugin fields, in serialization order.
  std::vector<FieldRef> fields();
  // Empty if valid, else what is wrong.
  std::string check() const;
};

class NmsPlugin : public PluginBase<NmsPlugin, NmsParams> {
 public:
  static constexpr char const* kName = "RetinaNetNMS";
  static constexpr char const* kInputs = "scores [B, N], boxes [B, N, 4] and classes [B, N]";
  static constexpr int32_t kNbInputs = 3;
  static constexpr int32_t kScoresRank = 2;
  static bool is_int_input(int32_t pos) { return pos == 2; }  // classes
  int32_t output_length() const { return params_.detections; }

  explicit NmsPlugin(NmsParams params);

 private:
  friend class PluginBase<NmsPlugin, NmsParams>;
  using Args = NmsArgs;

  bool make_args(nvinfer1::Dims const* inputs, NmsArgs* args) const;
  static size_t workspace_size(NmsArgs const& args) { return nms_workspace_size(args); }
  cudaError_t run(NmsArgs const& args, DType dtype, void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream);
};

using NmsPluginCreator = PluginCreatorBase<NmsPlugin, NmsParams>;

}  // namespace plugins
}  // namespace retinanet
