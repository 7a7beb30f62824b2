#include "plugins/nms_plugin.h"

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

std::vector<FieldRef> NmsParams::fields() { return {{"nms_iou", &nms_iou}, {"detections", &detections}}; }

std::string NmsParams::check() const {
  if (!(nms_iou >= 0.f && nms_iou <= 1.f)) return "nms_iou must be in [0, 1]";
  if (detections <= 0) return "detections must be positive";
  return {};
}

NmsPlugin::NmsPlugin(NmsParams params) : PluginBase(params) {}

bool NmsPlugin::make_args(nvinfer1::Dims const& scores, nvinfer1::Dims const& boxes, nvinfer1::Dims const& classes,
                          NmsArgs* args) const {
  if (scores.nbDims != 2 || boxes.nbDims != 3 || classes.nbDims != 2) return false;
  if (boxes.d[0] != scores.d[0] || classes.d[0] != scores.d[0] || boxes.d[1] != scores.d[1] ||
      classes.d[1] != scores.d[1] || boxes.d[2] != 4) {
    return false;
  }
  if (scores.d[0] < 0 || scores.d[1] < 0 || scores.d[0] > INT32_MAX || scores.d[1] > INT32_MAX) return false;
  args->batch = static_cast<int>(scores.d[0]);
  args->num_candidates = static_cast<int>(scores.d[1]);
  args->iou_threshold = params_.nms_iou;
  args->detections = params_.detections;
  return true;
}

int32_t NmsPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                   nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  if (!counts_match(nbInputs, nbOutputs)) return -1;
  NmsArgs args;
  if (!make_args(in[0].max, in[1].max, in[2].max, &args)) {
    log_error("RetinaNetNMS: inputs must be scores [B, N], boxes [B, N, 4] and classes [B, N]");
    return -1;
  }
  return 0;
}

size_t NmsPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                   nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                                   int32_t /*nbOutputs*/) const noexcept {
  NmsArgs args;
  if (nbInputs != kNbInputs || !make_args(inputs[0].max, inputs[1].max, inputs[2].max, &args)) return 0;
  return nms_workspace_size(args);  // at the profile's largest batch: enough for every smaller one
}

int32_t NmsPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                 nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  NmsArgs args;
  if (!counts_match(nbInputs, nbOutputs) || !make_args(in[0].dims, in[1].dims, in[2].dims, &args)) {
    log_error("RetinaNetNMS: inputs must be scores [B, N], boxes [B, N, 4] and classes [B, N]");
    return -1;
  }
  return 0;
}

int32_t NmsPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* /*outputDesc*/,
                           void const* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
  NmsArgs args;
  DType dtype;
  if (!make_args(inputDesc[0].dims, inputDesc[1].dims, inputDesc[2].dims, &args) ||
      !to_kernel_dtype(inputDesc[0].type, &dtype)) {
    log_error("RetinaNetNMS: enqueue with unsupported inputs");
    return -1;
  }
  cudaError_t const err = nms(args, dtype, inputs[0], inputs[1], static_cast<int32_t const*>(inputs[2]), outputs[0],
                              outputs[1], static_cast<int32_t*>(outputs[2]), workspace, nms_workspace_size(args),
                              stream);
  if (err != cudaSuccess) {
    log_error(std::string("RetinaNetNMS: ") + cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

}  // namespace plugins
}  // namespace retinanet
