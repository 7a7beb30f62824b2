// RetinaNetDecode and RetinaNetDecodeRotated (version "1"): one FPN level's box decode
// as an IPluginV3.
//
// Inputs:  0 scores [B, A*C, H, W] (sigmoid applied), 1 deltas [B, A*D, H, W];
//          FP32, FP16 or BF16, both the same type, linear format.
// Outputs: 0 scores [B, top_n], 1 boxes [B, top_n, V] (input type),
//          2 classes [B, top_n] INT32. Padding: score 0, box 0, class -1.
// Fields:  score_threshold (f32), top_n (i32), box_clamp (f32), stride (i32),
//          anchors (f32 x A*P), and for axis-aligned boxes only
//          box_offset (f32, optional: 0 when absent; 1 for the +1 pixel box convention).
//   RetinaNetDecode:        D = 4 (dx, dy, dw, dh), V = 4 (x1, y1, x2, y2), P = 4: the
//                           level's anchors centred on (0, 0); boxes clipped to the level.
//   RetinaNetDecodeRotated: D = 6 (tx, ty, tw, th, ts, tc), V = 5 (cx, cy, w, h, θ),
//                           P = 5: (0, 0, w, h, α) relative to the cell centre; not clipped.
// The decode itself is csrc/kernels/decode.h and rotated.h, shared with the torch ops.
#pragma once

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "kernels/decode.h"
#include "kernels/rotated.h"
#include "plugins/plugin_base.h"

namespace retinanet {
namespace plugins {

// What differs between the two decode plugins: names, sizes and the kernel.
struct AxisDecode {
  static constexpr char const* kName = "RetinaNetDecode";
  static constexpr char const* kInputs = "scores [B, A*C, H, W] and deltas [B, A*4, H, W], A = the anchors' count";
  static constexpr int kAnchorValues = 4;
  static constexpr int kDeltas = 4;
  static constexpr int32_t kBoxValues = 4;
  static constexpr bool kHasBoxOffset = true;
  static size_t workspace_size(DecodeArgs const& args) { return decode_workspace_size(args); }
  static constexpr auto kKernel = &decode;
};

struct RotatedDecode {
  static constexpr char const* kName = "RetinaNetDecodeRotated";
  static constexpr char const* kInputs = "scores [B, A*C, H, W] and deltas [B, A*6, H, W], A = the anchors' count";
  static constexpr int kAnchorValues = 5;
  static constexpr int kDeltas = 6;
  static constexpr int32_t kBoxValues = 5;
  static constexpr bool kHasBoxOffset = false;  // rotated boxes have no +1 pixel convention
  static size_t workspace_size(DecodeArgs const& args) { return decode_rotated_workspace_size(args); }
  static constexpr auto kKernel = &decode_rotated;
};

template <class Kind>
struct DecodeParamsT {
  float score_threshold = 0.f;
  int32_t top_n = 0;
  float box_clamp = 0.f;
  int32_t stride = 0;
  std::vector<float> anchors;  // A * Kind::kAnchorValues
  float box_offset = 0.f;      // axis only, optional field: files written before it decode as 0

  int num_anchors() const { return static_cast<int>(anchors.size() / Kind::kAnchorValues); }
  // The plugin fields, in serialization order.
  std::vector<FieldRef> fields();
  // Empty if valid, else what is wrong.
  std::string check() const;
};

template <class Kind>
class DecodePluginT : public PluginBase<DecodePluginT<Kind>, DecodeParamsT<Kind>> {
  using Base = PluginBase<DecodePluginT<Kind>, DecodeParamsT<Kind>>;

 public:
  static constexpr char const* kName = Kind::kName;
  static constexpr char const* kInputs = Kind::kInputs;
  static constexpr int32_t kNbInputs = 2;
  static constexpr int32_t kScoresRank = 4;
  static constexpr int32_t kBoxValues = Kind::kBoxValues;
  static bool is_int_input(int32_t /*pos*/) { return false; }
  int32_t output_length() const { return this->params_.top_n; }

  explicit DecodePluginT(DecodeParamsT<Kind> params);
  ~DecodePluginT() override;

 private:
  friend Base;
  using Args = DecodeArgs;

  bool make_args(nvinfer1::Dims const* inputs, DecodeArgs* args) const;
  static size_t workspace_size(DecodeArgs const& args) { return Kind::workspace_size(args); }
  cudaError_t run(DecodeArgs const& args, DType dtype, void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream);
  // Uploads the anchor table once per runtime instance, outside enqueue: enqueue stays copy-free.
  int32_t prepare();
  bool ready() const { return device_anchors_ != nullptr; }

  float* device_anchors_ = nullptr;
};

// Both are compiled once, in decode_plugin.cpp.
extern template struct DecodeParamsT<AxisDecode>;
extern template struct DecodeParamsT<RotatedDecode>;
extern template class DecodePluginT<AxisDecode>;
extern template class DecodePluginT<RotatedDecode>;

using DecodeParams = DecodeParamsT<AxisDecode>;
using DecodePlugin = DecodePluginT<AxisDecode>;
using DecodePluginCreator = PluginCreatorBase<DecodePlugin, DecodeParams>;

using DecodeRotatedParams = DecodeParamsT<RotatedDecode>;
using DecodeRotatedPlugin = DecodePluginT<RotatedDecode>;
using DecodeRotatedPluginCreator = PluginCreatorBase<DecodeRotatedPlugin, DecodeRotatedParams>;

}  // namespace plugins
}  // namespace retinanet
