#include "plugins/nms_plugin.h"

#include <cmath>
#include <utility>

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

template <class Kind>
std::vector<FieldRef> NmsParamsT<Kind>::fields() {
  std::vector<FieldRef> out = {{"nms_iou", &nms_iou}, {"detections", &detections}};
  if (Kind::kHasBoxOffset) out.push_back(FieldRef::optional("box_offset", &box_offset));
  return out;
}

template <class Kind>
std::string NmsParamsT<Kind>::check() const {
  if (!(nms_iou >= 0.f && nms_iou <= 1.f)) return "nms_iou must be in [0, 1]";
  if (detections <= 0) return "detections must be positive";
  if (!(box_offset >= 0.f) || !std::isfinite(box_offset)) return "box_offset must be finite and >= 0 (0 or 1)";
  return {};
}

template <class Kind>
NmsPluginT<Kind>::NmsPluginT(NmsParamsT<Kind> params) : Base(std::move(params)) {}

template <class Kind>
bool NmsPluginT<Kind>::make_args(nvinfer1::Dims const* inputs, NmsArgs* args) const {
  nvinfer1::Dims const& scores = inputs[0];
  nvinfer1::Dims const& boxes = inputs[1];
  nvinfer1::Dims const& classes = inputs[2];
  if (scores.nbDims != 2 || boxes.nbDims != 3 || classes.nbDims != 2) return false;
  if (boxes.d[0] != scores.d[0] || classes.d[0] != scores.d[0] || boxes.d[1] != scores.d[1] ||
      classes.d[1] != scores.d[1] || boxes.d[2] != Kind::kBoxValues) {
    return false;
  }
  if (scores.d[0] < 0 || scores.d[1] < 0 || scores.d[0] > INT32_MAX || scores.d[1] > INT32_MAX) return false;
  args->batch = static_cast<int>(scores.d[0]);
  args->num_candidates = static_cast<int>(scores.d[1]);
  args->iou_threshold = this->params_.nms_iou;
  args->detections = this->params_.detections;
  args->box_offset = this->params_.box_offset;
  return true;
}

template <class Kind>
cudaError_t NmsPluginT<Kind>::run(NmsArgs const& args, DType dtype, void const* const* inputs, void* const* outputs,
                                  void* workspace, cudaStream_t stream) {
  return Kind::kKernel(args, dtype, inputs[0], inputs[1], static_cast<int32_t const*>(inputs[2]), outputs[0],
                       outputs[1], static_cast<int32_t*>(outputs[2]), workspace, Kind::workspace_size(args), stream);
}

template struct NmsParamsT<AxisNms>;
template struct NmsParamsT<RotatedNms>;
template class NmsPluginT<AxisNms>;
template class NmsPluginT<RotatedNms>;

}  // namespace plugins
}  // namespace retinanet
