#include "plugins/decode_plugin.h"

#include <cmath>
#include <new>
#include <utility>

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

namespace {

constexpr char const* kName = "RetinaNetDecode";
constexpr int32_t kNbInputs = 2;
constexpr int32_t kNbOutputs = 3;

}  // namespace

std::string DecodeParams::check() const {
  if (!(score_threshold >= 0.f && score_threshold < 1.f)) return "score_threshold must be in [0, 1)";
  if (top_n <= 0) return "top_n must be positive";
  if (!(box_clamp > 0.f) || !std::isfinite(box_clamp)) return "box_clamp must be positive";
  if (stride <= 0) return "stride must be positive";
  if (anchors.empty() || anchors.size() % 4 != 0) return "anchors must hold A*4 floats, A > 0";
  return {};
}

DecodePlugin::DecodePlugin(DecodeParams params) : params_(std::move(params)) {}

DecodePlugin::~DecodePlugin() {
  if (device_anchors_ != nullptr) cudaFree(device_anchors_);
}

nvinfer1::IPluginCapability* DecodePlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
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

nvinfer1::IPluginV3* DecodePlugin::clone() noexcept { return new (std::nothrow) DecodePlugin(params_); }

char const* DecodePlugin::getPluginName() const noexcept { return kName; }
char const* DecodePlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* DecodePlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

bool DecodePlugin::make_args(nvinfer1::Dims const& scores, nvinfer1::Dims const& deltas, DecodeArgs* args) const {
  if (scores.nbDims != 4 || deltas.nbDims != 4) return false;
  int64_t const a = params_.num_anchors();
  if (scores.d[1] <= 0 || scores.d[1] % a != 0 || deltas.d[1] != a * 4) return false;
  for (int i : {0, 2, 3}) {
    if (scores.d[i] != deltas.d[i] || scores.d[i] < 0 || scores.d[i] > INT32_MAX) return false;
  }
  args->batch = static_cast<int>(scores.d[0]);
  args->num_anchors = static_cast<int>(a);
  args->num_classes = static_cast<int>(scores.d[1] / a);
  args->height = static_cast<int>(scores.d[2]);
  args->width = static_cast<int>(scores.d[3]);
  args->stride = params_.stride;
  args->score_threshold = params_.score_threshold;
  args->top_n = params_.top_n;
  args->box_clamp = params_.box_clamp;
  return true;
}

int32_t DecodePlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                      nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  DecodeArgs args;
  if (!make_args(in[0].max, in[1].max, &args)) {
    log_error("RetinaNetDecode: inputs must be scores [B, A*C, H, W] and deltas [B, A*4, H, W] with A = " +
              std::to_string(params_.num_anchors()) + " anchors");
    return -1;
  }
  return 0;
}

int32_t DecodePlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                                         nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || !is_float_type(inputTypes[0])) return -1;
  outputTypes[0] = inputTypes[0];
  outputTypes[1] = inputTypes[0];
  outputTypes[2] = nvinfer1::DataType::kINT32;
  return 0;
}

int32_t DecodePlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                      nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                      nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                      nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[0].nbDims != 4) return -1;
  nvinfer1::IDimensionExpr const* batch = inputs[0].d[0];
  nvinfer1::IDimensionExpr const* top_n = exprBuilder.constant(params_.top_n);
  nvinfer1::IDimensionExpr const* four = exprBuilder.constant(4);
  outputs[0].nbDims = 2;
  outputs[0].d[0] = batch;
  outputs[0].d[1] = top_n;
  outputs[1].nbDims = 3;
  outputs[1].d[0] = batch;
  outputs[1].d[1] = top_n;
  outputs[1].d[2] = four;
  outputs[2].nbDims = 2;
  outputs[2].d[0] = batch;
  outputs[2].d[1] = top_n;
  return 0;
}

bool DecodePlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                             int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs) return false;
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
  switch (pos) {
    case 0:
      return is_float_type(desc.type);
    case 4:  // classes
      return desc.type == nvinfer1::DataType::kINT32;
    default:  // deltas, scores, boxes: the scores' type
      return desc.type == inOut[0].desc.type;
  }
}

int32_t DecodePlugin::getNbOutputs() const noexcept { return kNbOutputs; }

size_t DecodePlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                      nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                                      int32_t /*nbOutputs*/) const noexcept {
  DecodeArgs args;
  if (nbInputs != kNbInputs || !make_args(inputs[0].max, inputs[1].max, &args)) return 0;
  return decode_workspace_size(args);  // at the profile's largest batch: enough for every smaller one
}

int32_t DecodePlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                    nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  DecodeArgs args;
  if (!make_args(in[0].dims, in[1].dims, &args)) {
    log_error("RetinaNetDecode: input shapes do not match the plugin's anchors");
    return -1;
  }
  if (device_anchors_ == nullptr) {
    // Once per runtime instance, outside enqueue: enqueue stays copy-free (CUDA-graph safe).
    size_t const bytes = params_.anchors.size() * sizeof(float);
    void* memory = nullptr;
    if (cudaMalloc(&memory, bytes) != cudaSuccess) {
      log_error("RetinaNetDecode: cannot allocate the anchor table on the device");
      return -1;
    }
    device_anchors_ = static_cast<float*>(memory);
    if (cudaMemcpy(device_anchors_, params_.anchors.data(), bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
      log_error("RetinaNetDecode: cannot copy the anchor table to the device");
      return -1;
    }
  }
  return 0;
}

int32_t DecodePlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
                              nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs,
                              void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  DecodeArgs args;
  DType dtype;
  if (device_anchors_ == nullptr || !make_args(inputDesc[0].dims, inputDesc[1].dims, &args) ||
      !to_kernel_dtype(inputDesc[0].type, &dtype)) {
    log_error("RetinaNetDecode: enqueue before onShapeChange or with unsupported inputs");
    return -1;
  }
  cudaError_t const err = decode(args, dtype, inputs[0], inputs[1], device_anchors_, outputs[0], outputs[1],
                                 static_cast<int32_t*>(outputs[2]), workspace, decode_workspace_size(args), stream);
  if (err != cudaSuccess) {
    log_error(std::string("RetinaNetDecode: ") + cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

nvinfer1::IPluginV3* DecodePlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();
}

nvinfer1::PluginFieldCollection const* DecodePlugin::getFieldsToSerialize() noexcept {
  using nvinfer1::PluginField;
  using nvinfer1::PluginFieldType;
  fields_ = {
      PluginField("score_threshold", &params_.score_threshold, PluginFieldType::kFLOAT32, 1),
      PluginField("top_n", &params_.top_n, PluginFieldType::kINT32, 1),
      PluginField("box_clamp", &params_.box_clamp, PluginFieldType::kFLOAT32, 1),
      PluginField("stride", &params_.stride, PluginFieldType::kINT32, 1),
      PluginField("anchors", params_.anchors.data(), PluginFieldType::kFLOAT32,
                  static_cast<int32_t>(params_.anchors.size())),
  };
  field_collection_.nbFields = static_cast<int32_t>(fields_.size());
  field_collection_.fields = fields_.data();
  return &field_collection_;
}

DecodePluginCreator::DecodePluginCreator() {
  using nvinfer1::PluginField;
  using nvinfer1::PluginFieldType;
  fields_ = {
      PluginField("score_threshold", nullptr, PluginFieldType::kFLOAT32, 1),
      PluginField("top_n", nullptr, PluginFieldType::kINT32, 1),
      PluginField("box_clamp", nullptr, PluginFieldType::kFLOAT32, 1),
      PluginField("stride", nullptr, PluginFieldType::kINT32, 1),
      PluginField("anchors", nullptr, PluginFieldType::kFLOAT32, 0),
  };
  field_collection_.nbFields = static_cast<int32_t>(fields_.size());
  field_collection_.fields = fields_.data();
}

nvinfer1::IPluginV3* DecodePluginCreator::createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
                                                       nvinfer1::TensorRTPhase /*phase*/) noexcept {
  if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr)) return nullptr;
  DecodeParams params;
  int found = 0;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    nvinfer1::PluginField const& f = fc->fields[i];
    bool ok = true;
    if (field_is(f, "score_threshold")) {
      ok = read_float(f, &params.score_threshold);
    } else if (field_is(f, "top_n")) {
      ok = read_int(f, &params.top_n);
    } else if (field_is(f, "box_clamp")) {
      ok = read_float(f, &params.box_clamp);
    } else if (field_is(f, "stride")) {
      ok = read_int(f, &params.stride);
    } else if (field_is(f, "anchors")) {
      ok = read_floats(f, &params.anchors);
    } else {
      continue;  // e.g. attributes the ONNX parser passes through; not ours
    }
    if (!ok) {
      log_error(std::string("RetinaNetDecode: field ") + f.name + " has the wrong type or length");
      return nullptr;
    }
    ++found;
  }
  std::string const problem = found == 5 ? params.check() : "needs score_threshold, top_n, box_clamp, stride, anchors";
  if (!problem.empty()) {
    log_error("RetinaNetDecode: " + problem);
    return nullptr;
  }
  return new (std::nothrow) DecodePlugin(std::move(params));
}

nvinfer1::PluginFieldCollection const* DecodePluginCreator::getFieldNames() noexcept { return &field_collection_; }
char const* DecodePluginCreator::getPluginName() const noexcept { return kName; }
char const* DecodePluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* DecodePluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace plugins
}  // namespace retinanet
