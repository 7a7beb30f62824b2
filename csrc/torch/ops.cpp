// torch.ops.retinanet.decode / .nms: thin adapters from tensors to csrc/kernels.
//
// CUDA kernels for CUDA tensors; Meta kernels (shapes only) so that
// torch.compile / torch.export can trace the ops. CPU tensors are handled in
// Python by ops/reference.py, which defines the behaviour.
#include <Python.h>

#include <cmath>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/decode.h"
#include "kernels/nms.h"

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

retinanet::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return retinanet::DType::kFloat16;
    case at::kBFloat16:
      return retinanet::DType::kBFloat16;
    default:
      return retinanet::DType::kFloat32;
  }
}

// The outputs scores [B, K], boxes [B, K, 4] (options' type) and classes [B, K] int32.
// SymInt, so that the Meta kernels keep a symbolic batch.
Outputs empty_outputs(const c10::SymInt& batch, int64_t k, const at::TensorOptions& options) {
  return {at::empty_symint({batch, k}, options), at::empty_symint({batch, k, 4}, options),
          at::empty_symint({batch, k}, options.dtype(at::kInt))};
}

// Scores and boxes in one element type the kernels take; float32 otherwise
// (the reference computes in float32 anyway, so results do not change).
at::ScalarType work_dtype(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && kernel_dtype(a.scalar_type()) ? a.scalar_type() : at::kFloat;
}

void check_decode_shapes(const at::Tensor& cls, const at::Tensor& box, const at::Tensor& anchors) {
  TORCH_CHECK(cls.dim() == 4, "retinanet::decode: cls_scores must be [B, A*C, H, W], got ", cls.sizes());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 4 && anchors.size(0) > 0,
              "retinanet::decode: anchors must be [A, 4], got ", anchors.sizes());
  const int64_t a = anchors.size(0);
  TORCH_CHECK(cls.size(1) % a == 0 && cls.size(1) > 0, "retinanet::decode: ", cls.size(1),
              " score channels is not a multiple of ", a, " anchors");
  TORCH_CHECK(box.dim() == 4 && box.size(0) == cls.size(0) && box.size(1) == a * 4 && box.size(2) == cls.size(2) &&
                  box.size(3) == cls.size(3),
              "retinanet::decode: box_deltas must be [B, A*4, H, W] = [", cls.size(0), ", ", a * 4, ", ", cls.size(2),
              ", ", cls.size(3), "], got ", box.sizes());
  TORCH_CHECK(at::isFloatingType(cls.scalar_type()) && at::isFloatingType(box.scalar_type()),
              "retinanet::decode: scores and deltas must be floating point");
}

void check_nms_shapes(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& classes) {
  TORCH_CHECK(scores.dim() == 2, "retinanet::nms: scores must be [B, N], got ", scores.sizes());
  TORCH_CHECK(
      boxes.dim() == 3 && boxes.size(0) == scores.size(0) && boxes.size(1) == scores.size(1) && boxes.size(2) == 4,
      "retinanet::nms: boxes must be [B, N, 4], got ", boxes.sizes());
  TORCH_CHECK(classes.sizes() == scores.sizes(), "retinanet::nms: classes must be [B, N], got ", classes.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()) && at::isFloatingType(boxes.scalar_type()),
              "retinanet::nms: scores and boxes must be floating point");
  TORCH_CHECK(!at::isFloatingType(classes.scalar_type()) && classes.scalar_type() != at::kBool,
              "retinanet::nms: classes must be integers");
}

// The kernels refuse any other offset (as float32); checked here too for a message that names it.
void check_box_offset(const char* op, double box_offset) {
  const float value = static_cast<float>(box_offset);
  TORCH_CHECK(std::isfinite(value) && value >= 0.f, "retinanet::", op,
              ": box_offset must be finite and >= 0 (0, or 1 for the +1 pixel box convention), got ", box_offset);
}

Outputs decode_cuda(const at::Tensor& cls_scores, const at::Tensor& box_deltas, const at::Tensor& anchors,
                    int64_t stride, double score_threshold, int64_t top_n, double box_clamp, double box_offset) {
  check_decode_shapes(cls_scores, box_deltas, anchors);
  check_box_offset("decode", box_offset);
  TORCH_CHECK(cls_scores.is_cuda() && box_deltas.device() == cls_scores.device(),
              "retinanet::decode: cls_scores and box_deltas must be on one CUDA device");
  TORCH_CHECK(top_n >= 0 && top_n < (int64_t(1) << 31), "retinanet::decode: bad top_n ", top_n);
  c10::cuda::CUDAGuard guard(cls_scores.device());
  const auto out_dtype = cls_scores.scalar_type();
  const auto dtype = work_dtype(cls_scores, box_deltas);
  const at::Tensor scores = cls_scores.to(dtype).contiguous();
  const at::Tensor deltas = box_deltas.to(dtype).contiguous();
  const at::Tensor anchor_table = anchors.to(cls_scores.device(), at::kFloat).contiguous();

  retinanet::DecodeArgs args;
  args.batch = static_cast<int>(scores.size(0));
  args.num_anchors = static_cast<int>(anchor_table.size(0));
  args.num_classes = static_cast<int>(scores.size(1) / anchor_table.size(0));
  args.height = static_cast<int>(scores.size(2));
  args.width = static_cast<int>(scores.size(3));
  args.stride = static_cast<int>(stride);
  args.score_threshold = static_cast<float>(score_threshold);
  args.top_n = static_cast<int>(top_n);
  args.box_clamp = static_cast<float>(box_clamp);
  args.box_offset = static_cast<float>(box_offset);

  auto [out_scores, out_boxes, out_classes] = empty_outputs(args.batch, top_n, scores.options());
  const size_t ws_bytes = retinanet::decode_workspace_size(args);
  TORCH_CHECK(ws_bytes > 0 || args.batch == 0, "retinanet::decode: unsupported sizes ", scores.sizes(),
              " (at most 65535 images and 2^31 scores per image)");
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, scores.options().dtype(at::kByte));
  const cudaError_t err =
      retinanet::decode(args, to_dtype(dtype), scores.data_ptr(), deltas.data_ptr(), anchor_table.data_ptr<float>(),
                        out_scores.data_ptr(), out_boxes.data_ptr(), out_classes.data_ptr<int32_t>(),
                        workspace.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "retinanet::decode: ", cudaGetErrorString(err));
  if (dtype != out_dtype) return {out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes};
  return {out_scores, out_boxes, out_classes};
}

Outputs nms_cuda(const at::Tensor& scores_in, const at::Tensor& boxes_in, const at::Tensor& classes_in,
                 double iou_threshold, int64_t detections, double box_offset) {
  check_nms_shapes(scores_in, boxes_in, classes_in);
  check_box_offset("nms", box_offset);
  TORCH_CHECK(
      scores_in.is_cuda() && boxes_in.device() == scores_in.device() && classes_in.device() == scores_in.device(),
      "retinanet::nms: scores, boxes and classes must be on one CUDA device");
  TORCH_CHECK(detections >= 0 && detections < (int64_t(1) << 31), "retinanet::nms: bad detections ", detections);
  c10::cuda::CUDAGuard guard(scores_in.device());
  const auto out_dtype = scores_in.scalar_type();
  const auto dtype = work_dtype(scores_in, boxes_in);
  const at::Tensor scores = scores_in.to(dtype).contiguous();
  const at::Tensor boxes = boxes_in.to(dtype).contiguous();
  const at::Tensor classes = classes_in.to(at::kInt).contiguous();

  retinanet::NmsArgs args;
  args.batch = static_cast<int>(scores.size(0));
  args.num_candidates = static_cast<int>(scores.size(1));
  args.iou_threshold = static_cast<float>(iou_threshold);
  args.detections = static_cast<int>(detections);
  args.box_offset = static_cast<float>(box_offset);

  auto [out_scores, out_boxes, out_classes] = empty_outputs(args.batch, detections, scores.options());
  const size_t ws_bytes = retinanet::nms_workspace_size(args);
  TORCH_CHECK(ws_bytes > 0 || args.batch == 0, "retinanet::nms: unsupported sizes ", scores.sizes());
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, scores.options().dtype(at::kByte));
  const cudaError_t err =
      retinanet::nms(args, to_dtype(dtype), scores.data_ptr(), boxes.data_ptr(), classes.data_ptr<int32_t>(),
                     out_scores.data_ptr(), out_boxes.data_ptr(), out_classes.data_ptr<int32_t>(), workspace.data_ptr(),
                     ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "retinanet::nms: ", cudaGetErrorString(err));
  if (dtype != out_dtype) return {out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes};
  return {out_scores, out_boxes, out_classes};
}

// Shapes only, for FakeTensor tracing (torch.compile, torch.export).
Outputs decode_meta(const at::Tensor& cls_scores, const at::Tensor& box_deltas, const at::Tensor& anchors,
                    int64_t /*stride*/, double /*score_threshold*/, int64_t top_n, double /*box_clamp*/,
                    double /*box_offset*/) {
  TORCH_CHECK(cls_scores.dim() == 4 && box_deltas.dim() == 4 && anchors.dim() == 2,
              "retinanet::decode: expected [B, A*C, H, W], [B, A*4, H, W] and [A, 4]");
  return empty_outputs(cls_scores.sym_size(0), top_n, cls_scores.options());
}

Outputs nms_meta(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& classes, double /*iou_threshold*/,
                 int64_t detections, double /*box_offset*/) {
  TORCH_CHECK(scores.dim() == 2 && boxes.dim() == 3 && classes.dim() == 2,
              "retinanet::nms: expected [B, N], [B, N, 4] and [B, N]");
  return empty_outputs(scores.sym_size(0), detections, scores.options());
}

}  // namespace

// box_offset last, with a default: callers written before it keep today's convention.
TORCH_LIBRARY(retinanet, m) {
  m.def(
      "decode(Tensor cls_scores, Tensor box_deltas, Tensor anchors, int stride, float score_threshold, "
      "int top_n, float box_clamp, float box_offset=0.0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "nms(Tensor scores, Tensor boxes, Tensor classes, float iou_threshold, int detections, "
      "float box_offset=0.0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(retinanet, CUDA, m) {
  m.impl("decode", &decode_cuda);
  m.impl("nms", &nms_cuda);
}

TORCH_LIBRARY_IMPL(retinanet, Meta, m) {
  m.impl("decode", &decode_meta);
  m.impl("nms", &nms_meta);
}

// `import retinanet._C` loads the library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "retinanet CUDA custom operators", -1, nullptr};
  return PyModule_Create(&module);
}
