#include "plugins/nms_plugin.h"

#include <new>

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

namespace {

constexpr char const* kName = "RetinaNetNMS";
constexpr int32_t kNbInputs = 3;
constexpr int32_t kNbOutputs = 3;

}  // namespace

std::string NmsParams::check() const {
  if (!(nms_iou >= 0.f && nms_iou <= 1.f)) return "nms_iou must be in [0, 1]";
  if (detections <= 0) return "detections must be positive";
  return {};
}

NmsPlugin::NmsPlugin(NmsParams params) : params_(params) {}

nvinfer1::IPluginCapability* NmsPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE:
      return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD:
      return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME:
      return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* NmsPlugin::clone() noexcept { return new (std::nothrow) NmsPlugin(params_); }

char const* NmsPlugin::getPluginName() const noexcept { return kName; }
char const* NmsPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* NmsPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

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
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  NmsArgs args;
  if (!make_args(in[0].max, in[1].max, in[2].max, &args)) {
    log_error("RetinaNetNMS: inputs must be scores [B, N], boxes [B, N, 4] and classes [B, N]");
    return -1;
  }
  return 0;
}

int32_t NmsPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                                      nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || !is_float_type(inputTypes[0])) return -1;
  outputTypes[0] = inputTypes[0];
  outputTypes[1] = inputTypes[0];
  outputTypes[2] = nvinfer1::DataType::kINT32;
  return 0;
}

int32_t NmsPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                   nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                   nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                   nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[0].nbDims != 2) return -1;
  nvinfer1::IDimensionExpr const* batch = inputs[0].d[0];
  nvinfer1::IDimensionExpr const* detections = exprBuilder.constant(params_.detections);
  nvinfer1::IDimensionExpr const* four = exprBuilder.constant(4);
  outputs[0].nbDims = 2;
  outputs[0].d[0] = batch;
  outputs[0].d[1] = detections;
  outputs[1].nbDims = 3;
  outputs[1].d[0] = batch;
  outputs[1].d[1] = detections;
  outputs[1].d[2] = four;
  outputs[2].nbDims = 2;
  outputs[2].d[0] = batch;
  outputs[2].d[1] = detections;
  return 0;
}

bool NmsPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                          int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs) return false;
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
  switch (pos) {
    case 0:
      return is_float_type(desc.type);
    case 2:  // classes in
    case 5:  // classes out
      return desc.type == nvinfer1::DataType::kINT32;
    default:  // boxes in, scores and boxes out: the scores' type
      return desc.type == inOut[0].desc.type;
  }
}

int32_t NmsPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

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
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || !make_args(in[0].dims, in[1].dims, in[2].dims, &args)) {
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

nvinfer1::IPluginV3* NmsPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();
}

nvinfer1::PluginFieldCollection const* NmsPlugin::getFieldsToSerialize() noexcept {
  using nvinfer1::PluginField;
  using nvinfer1::PluginFieldType;
  fields_ = {
      PluginField("nms_iou", &params_.nms_iou, PluginFieldType::kFLOAT32, 1),
      PluginField("detections", &params_.detections, PluginFieldType::kINT32, 1),
  };
  field_collection_.nbFields = static_cast<int32_t>(fields_.size());
  field_collection_.fields = fields_.data();
  return &field_collection_;
}

NmsPluginCreator::NmsPluginCreator() {
  using nvinfer1::PluginField;
  using nvinfer1::PluginFieldType;
  fields_ = {
      PluginField("nms_iou", nullptr, PluginFieldType::kFLOAT32, 1),
      PluginField("detections", nullptr, PluginFieldType::kINT32, 1),
  };
  field_collection_.nbFields = static_cast<int32_t>(fields_.size());
  field_collection_.fields = fields_.data();
}

nvinfer1::IPluginV3* NmsPluginCreator::createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
                                                    nvinfer1::TensorRTPhase /*phase*/) noexcept {
  if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr)) return nullptr;
  NmsParams params;
  int found = 0;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    nvinfer1::PluginField const& f = fc->fields[i];
    bool ok = true;
    if (field_is(f, "nms_iou")) {
      ok = read_float(f, &params.nms_iou);
    } else if (field_is(f, "detections")) {
      ok = read_int(f, &params.detections);
    } else {
      continue;  // e.g. attributes the ONNX parser passes through; not ours
    }
    if (!ok) {
      log_error(std::string("RetinaNetNMS: field ") + f.name + " has the wrong type or length");
      return nullptr;
    }
    ++found;
  }
  std::string const problem = found == 2 ? params.check() : "needs nms_iou and detections";
  if (!problem.empty()) {
    log_error("RetinaNetNMS: " + problem);
    return nullptr;
  }
  return new (std::nothrow) NmsPlugin(params);
}

nvinfer1::PluginFieldCollection const* NmsPluginCreator::getFieldNames() noexcept { return &field_collection_; }
char const* NmsPluginCreator::getPluginName() const noexcept { return kName; }
char const* NmsPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* NmsPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace plugins
}  // namespace retinanet
