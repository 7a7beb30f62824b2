#include "plugins/decode_plugin.h"

#include <cmath>
#include <utility>

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

std::vector<FieldRef> DecodeParams::fields() {
  return {{"score_threshold", &score_threshold},
          {"top_n", &top_n},
          {"box_clamp", &box_clamp},
          {"stride", &stride},
          {"anchors", &anchors},
          FieldRef::optional("box_offset", &box_offset)};
}

std::string DecodeParams::check() const {
  if (!(score_threshold >= 0.f && score_threshold < 1.f)) return "score_threshold must be in [0, 1)";
  if (top_n <= 0) return "top_n must be positive";
  if (!(box_clamp > 0.f) || !std::isfinite(box_clamp)) return "box_clamp must be positive";
  if (stride <= 0) return "stride must be positive";
  if (anchors.empty() || anchors.size() % 4 != 0) return "anchors must hold A*4 floats, A > 0";
  if (!(box_offset >= 0.f) || !std::isfinite(box_offset)) return "box_offset must be finite and >= 0 (0 or 1)";
  return {};
}

DecodePlugin::DecodePlugin(DecodeParams params) : PluginBase(std::move(params)) {}

DecodePlugin::~DecodePlugin() {
  if (device_anchors_ != nullptr) cudaFree(device_anchors_);
}

bool DecodePlugin::make_args(nvinfer1::Dims const* inputs, DecodeArgs* args) const {
  nvinfer1::Dims const& scores = inputs[0];
  nvinfer1::Dims const& deltas = inputs[1];
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
  args->box_offset = params_.box_offset;
  return true;
}

int32_t DecodePlugin::prepare() {
  if (device_anchors_ != nullptr) return 0;
  size_t const bytes = params_.anchors.size() * sizeof(float);
  void* memory = nullptr;
  if (cudaMalloc(&memory, bytes) != cudaSuccess) {
    log_error("RetinaNetDecode: cannot allocate the anchor table on the device");
    return -1;
  }
  if (cudaMemcpy(memory, params_.anchors.data(), bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
    cudaFree(memory);
    log_error("RetinaNetDecode: cannot copy the anchor table to the device");
    return -1;
  }
  device_anchors_ = static_cast<float*>(memory);  // only once complete: ready() means usable
  return 0;
}

cudaError_t DecodePlugin::run(DecodeArgs const& args, DType dtype, void const* const* inputs, void* const* outputs,
                              void* workspace, cudaStream_t stream) {
  return decode(args, dtype, inputs[0], inputs[1], device_anchors_, outputs[0], outputs[1],
                static_cast<int32_t*>(outputs[2]), workspace, decode_workspace_size(args), stream);
}

}  // namespace plugins
}  // namespace retinanet
