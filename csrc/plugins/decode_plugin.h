// RetinaNetDecode (version "1"): one FPN level's box decode as an IPluginV3.
//
// Inputs:  0 scores [B, A*C, H, W] (sigmoid applied), 1 deltas [B, A*4, H, W];
//          FP32, FP16 or BF16, both the same type, linear format.
// Outputs: 0 scores [B, top_n], 1 boxes [B, top_n, 4] (input type),
//          2 classes [B, top_n] INT32. Padding: score 0, box 0, class -1.
// Fields:  score_threshold (f32), top_n (i32), box_clamp (f32), stride (i32),
//          anchors (f32 x A*4: the level's anchors centred on (0, 0)),
//          box_offset (f32, optional: 0 when absent; 1 for the +1 pixel box convention).
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
  float box_offset = 0.f;      // optional field: files written before it decode as 0

  int num_anchors() const { return static_cast<int>(anchors.size() / 4); }
  // The plugin fields, in serialization order.
  std::vector<FieldRef> fields();
  // Empty if valid, else what is wrong.
  std::string check() const;
};

class DecodePlugin : public PluginBase<DecodePlugin, DecodeParams> {
 public:
  static constexpr char const* kName = "RetinaNetDecode";
  static constexpr char const* kInputs = "scores [B, A*C, H, W] and deltas [B, A*4, H, W], A = the anchors' count";
  static constexpr int32_t kNbInputs = 2;
  static constexpr int32_t kScoresRank = 4;
  static bool is_int_input(int32_t /*pos*/) { return false; }
  int32_t output_length() const { return params_.top_n; }

  explicit DecodePlugin(DecodeParams params);
  ~DecodePlugin() override;

 private:
  friend class PluginBase<DecodePlugin, DecodeParams>;
  using Args = DecodeArgs;

  bool make_args(nvinfer1::Dims const* inputs, DecodeArgs* args) const;
  static size_t workspace_size(DecodeArgs const& args) { return decode_workspace_size(args); }
  cudaError_t run(DecodeArgs const& args, DType dtype, void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream);
  // Uploads the anchor table once per runtime instance, outside enqueue: enqueue stays copy-free.
  int32_t prepare();
  bool ready() const { return device_anchors_ != nullptr; }

  float* device_anchors_ = nullptr;
};

using DecodePluginCreator = PluginCreatorBase<DecodePlugin, DecodeParams>;

}  // namespace plugins
}  // namespace retinanet
