#include "plugins/decode_plugin.h"

#include <cmath>
#include <utility>

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

template <class Kind>
std::vector<FieldRef> DecodeParamsT<Kind>::fields() {
  std::vector<FieldRef> out = {{"score_threshold", &score_threshold},
                               {"top_n", &top_n},
                               {"box_clamp", &box_clamp},
                               {"stride", &stride},
                               {"anchors", &anchors}};
  if (Kind::kHasBoxOffset) out.push_back(FieldRef::optional("box_offset", &box_offset));
  return out;
}

template <class Kind>
std::string DecodeParamsT<Kind>::check() const {
  if (!(score_threshold >= 0.f && score_threshold < 1.f)) return "score_threshold must be in [0, 1)";
  if (top_n <= 0) return "top_n must be positive";
  if (!(box_clamp > 0.f) || !std::isfinite(box_clamp)) return "box_clamp must be positive";
  if (stride <= 0) return "stride must be positive";
  if (anchors.empty() || anchors.size() % Kind::kAnchorValues != 0)
    return "anchors must hold A*" + std::to_string(Kind::kAnchorValues) + " floats, A > 0";
  if (!(box_offset >= 0.f) || !std::isfinite(box_offset)) return "box_offset must be finite and >= 0 (0 or 1)";
  return {};
}

template <class Kind>
DecodePluginT<Kind>::DecodePluginT(DecodeParamsT<Kind> params) : Base(std::move(params)) {}

template <class Kind>
DecodePluginT<Kind>::~DecodePluginT() {
  if (device_anchors_ != nullptr) cudaFree(device_anchors_);
}

template <class Kind>
bool DecodePluginT<Kind>::make_args(nvinfer1::Dims const* inputs, DecodeArgs* args) const {
  nvinfer1::Dims const& scores = inputs[0];
  nvinfer1::Dims const& deltas = inputs[1];
  if (scores.nbDims != 4 || deltas.nbDims != 4) return false;
  int64_t const a = this->params_.num_anchors();
  if (scores.d[1] <= 0 || scores.d[1] % a != 0 || deltas.d[1] != a * Kind::kDeltas) return false;
  for (int i : {0, 2, 3}) {
    if (scores.d[i] != deltas.d[i] || scores.d[i] < 0 || scores.d[i] > INT32_MAX) return false;
  }
  args->batch = static_cast<int>(scores.d[0]);
  args->num_anchors = static_cast<int>(a);
  args->num_classes = static_cast<int>(scores.d[1] / a);
  args->height = static_cast<int>(scores.d[2]);
  args->width = static_cast<int>(scores.d[3]);
  args->stride = this->params_.stride;
  args->score_threshold = this->params_.score_threshold;
  args->top_n = this->params_.top_n;
  args->box_clamp = this->params_.box_clamp;
  args->box_offset = this->params_.box_offset;
  return true;
}

template <class Kind>
int32_t DecodePluginT<Kind>::prepare() {
  if (device_anchors_ != nullptr) return 0;
  std::vector<float> const& anchors = this->params_.anchors;
  size_t const bytes = anchors.size() * sizeof(float);
  void* memory = nullptr;
  if (cudaMalloc(&memory, bytes) != cudaSuccess) {
    log_error(std::string(kName) + ": cannot allocate the anchor table on the device");
    return -1;
  }
  if (cudaMemcpy(memory, anchors.data(), bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
    cudaFree(memory);
    log_error(std::string(kName) + ": cannot copy the anchor table to the device");
    return -1;
  }
  device_anchors_ = static_cast<float*>(memory);  // only once complete: ready() means usable
  return 0;
}

template <class Kind>
cudaError_t DecodePluginT<Kind>::run(DecodeArgs const& args, DType dtype, void const* const* inputs,
                                     void* const* outputs, void* workspace, cudaStream_t stream) {
  return Kind::kKernel(args, dtype, inputs[0], inputs[1], device_anchors_, outputs[0], outputs[1],
                       static_cast<int32_t*>(outputs[2]), workspace, Kind::workspace_size(args), stream);
}

template struct DecodeParamsT<AxisDecode>;
template struct DecodeParamsT<RotatedDecode>;
template class DecodePluginT<AxisDecode>;
template class DecodePluginT<RotatedDecode>;

}  // namespace plugins
}  // namespace retinanet
