// RetinaNetDecode (version "1"): one FPN level's box decode as an IPluginV3.
//
// Inputs:  0 scores [B, A*C, H, W] (sigmoid applied), 1 deltas [B, A*4, H, W];
//          FP32, FP16 or BF16, both the same type, linear format.
// Outputs: 0 scores [B, top_n], 1 boxes [B, top_n, 4] (input type),
//          2 classes [B, top_n] INT32. Padding: score 0, box 0, class -1.
// Fields:  score_threshold (f32), top_n (i32), box_clamp (f32), stride (i32),
//          anchors (f32 x A*4: the level's anchors centred on (0, 0)).
// The decode itself is csrc/kernels/decode.h, shared with the torch op.
#pragma once

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "kernels/decode.h"
#include "plugins/plugin_base.h"

namespace retinanet {
namespace plugins {

struct DecodeParams {
  float score_threshold = 0.f;
  int32_t top_n = 0;
  float box_clamp = 0.f;
  int32_t stride = 0;
  std::vector<float> anchors;  // A*4

  int num_anchors() const { return static_cast<int>(anchors.size() / 4); }
  // The plugin fields, in serialization order.
  std::vector<FieldRef> fields();
  // Empty if valid, else what is wrong.
  std::string check() const;
};

class DecodePlugin : public PluginBase<DecodePlugin, DecodeParams> {
 public:
  static constexpr char const* kName = "RetinaNetDecode";
  static constexpr int32_t kNbInputs = 2;  // scores, deltas
  static constexpr int32_t kScoresRank = 4;
  static bool is_int_input(int32_t /*pos*/) { return false; }
  int32_t output_length() const { return params_.top_n; }

  explicit DecodePlugin(DecodeParams params);
  ~DecodePlugin() override;

  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;

 private:
  // Kernel arguments for input dims [B, A*C, H, W] (false if they do not fit the fields).
  bool make_args(nvinfer1::Dims const& scores, nvinfer1::Dims const& deltas, DecodeArgs* args) const;

  float* device_anchors_ = nullptr;  // uploaded once per runtime instance, before the first enqueue
};

using DecodePluginCreator = PluginCreatorBase<DecodePlugin, DecodeParams>;

}  // namespace plugins
}  // namespace retinanet
