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

namespace retinanet {
namespace plugins {

struct DecodeParams {
  float score_threshold = 0.f;
  int32_t top_n = 0;
  float box_clamp = 0.f;
  int32_t stride = 0;
  std::vector<float> anchors;  // A*4

  int num_anchors() const { return static_cast<int>(anchors.size() / 4); }
  // Empty if valid, else what is wrong.
  std::string check() const;
};

class DecodePlugin : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit DecodePlugin(DecodeParams params);
  ~DecodePlugin() override;
  DecodePlugin(DecodePlugin const&) = delete;
  DecodePlugin& operator=(DecodePlugin const&) = delete;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  // Kernel arguments for input dims [B, A*C, H, W] (false if they do not fit the fields).
  bool make_args(nvinfer1::Dims const& scores, nvinfer1::Dims const& deltas, DecodeArgs* args) const;

  DecodeParams params_;
  float* device_anchors_ = nullptr;  // uploaded once per runtime instance, before the first enqueue
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection field_collection_{};
};

class DecodePluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  DecodePluginCreator();
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection field_collection_{};
};

}  // namespace plugins
}  // namespace retinanet
