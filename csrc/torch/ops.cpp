// torch.ops.retinanet.decode / .nms and their rotated forms (decode_rotated, nms_rotated,
// rotated_iou): thin adapters from tensors to csrc/kernels.
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
#include "kernels/rotated.h"

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

// The outputs scores [B, K], boxes [B, K, V] (options' type; V = 4, or 5 for rotated boxes)
// and classes [B, K] int32. SymInt, so that the Meta kernels keep a symbolic batch.
Outputs empty_outputs(const c10::SymInt& batch, int64_t k, const at::TensorOptions& options, int64_t values = 4) {
  return {at::empty_symint({batch, k}, options), at::empty_symint({batch, k, values}, options),
          at::empty_symint({batch, k}, options.dtype(at::kInt))};
}

// Scores and boxes in one element type the kernels take; float32 otherwise
// (the reference computes in float32 anyway, so results do not change).
at::ScalarType work_dtype(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && kernel_dtype(a.scalar_type()) ? a.scalar_type() : at::kFloat;
}

// The two box kinds' shapes: values per anchor (anchor table), per box delta, per output box.
// The kernels' entry points of each kind take the same arguments.
struct BoxKind {
  const char* decode;  // op names, for messages
  const char* nms;
  int64_t anchor_values, deltas, values;
  size_t (*decode_workspace)(const retinanet::DecodeArgs&);
  decltype(&retinanet::decode) decode_kernel;
  size_t (*nms_workspace)(const retinanet::NmsArgs&);
  decltype(&retinanet::nms) nms_kernel;
};
constexpr BoxKind kAxis{"decode",
                        "nms",
                        4,
                        4,
                        4,
                        &retinanet::decode_workspace_size,
                        &retinanet::decode,
                        &retinanet::nms_workspace_size,
                        &retinanet::nms};
constexpr BoxKind kRotated{"decode_rotated",
                           "nms_rotated",
                           5,
                           6,
                           5,
                           &retinanet::decode_rotated_workspace_size,
                           &retinanet::decode_rotated,
                           &retinanet::nms_rotated_workspace_size,
                           &retinanet::nms_rotated};

void check_decode_shapes(const at::Tensor& cls, const at::Tensor& box, const at::Tensor& anchors,
                         const BoxKind& kind = kAxis) {
  const char* op = kind.decode;
  TORCH_CHECK(cls.dim() == 4, "retinanet::", op, ": cls_scores must be [B, A*C, H, W], got ", cls.sizes());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == kind.anchor_values && anchors.size(0) > 0, "retinanet::", op,
              ": anchors must be [A, ", kind.anchor_values, "], got ", anchors.sizes());
  const int64_t a = anchors.size(0);
  TORCH_CHECK(cls.size(1) % a == 0 && cls.size(1) > 0, "retinanet::", op, ": ", cls.size(1),
              " score channels is not a multiple of ", a, " anchors");
  TORCH_CHECK(box.dim() == 4 && box.size(0) == cls.size(0) && box.size(1) == a * kind.deltas &&
                  box.size(2) == cls.size(2) && box.size(3) == cls.size(3),
              "retinanet::", op, ": box_deltas must be [B, A*", kind.deltas, ", H, W] = [", cls.size(0), ", ",
              a * kind.deltas, ", ", cls.size(2), ", ", cls.size(3), "], got ", box.sizes());
  TORCH_CHECK(at::isFloatingType(cls.scalar_type()) && at::isFloatingType(box.scalar_type()), "retinanet::", op,
              ": scores and deltas must be floating point");
}

void check_nms_shapes(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& classes,
                      const BoxKind& kind = kAxis) {
  const char* op = kind.nms;
  TORCH_CHECK(scores.dim() == 2, "retinanet::", op, ": scores must be [B, N], got ", scores.sizes());
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(0) == scores.size(0) && boxes.size(1) == scores.size(1) &&
                  boxes.size(2) == kind.values,
              "retinanet::", op, ": boxes must be [B, N, ", kind.values, "], got ", boxes.sizes());
  TORCH_CHECK(classes.sizes() == scores.sizes(), "retinanet::", op, ": classes must be [B, N], got ", classes.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()) && at::isFloatingType(boxes.scalar_type()), "retinanet::", op,
              ": scores and boxes must be floating point");
  TORCH_CHECK(!at::isFloatingType(classes.scalar_type()) && classes.scalar_type() != at::kBool, "retinanet::", op,
              ": classes must be integers");
}

// The kernels refuse any other offset (as float32); checked here too for a message that names it.
void check_box_offset(const char* op, double box_offset) {
  const float value = static_cast<float>(box_offset);
  TORCH_CHECK(std::isfinite(value) && value >= 0.f, "retinanet::", op,
              ": box_offset must be finite and >= 0 (0, or 1 for the +1 pixel box convention), got ", box_offset);
}

Outputs decode_with(const BoxKind& kind, const at::Tensor& cls_scores, const at::Tensor& box_deltas,
                    const at::Tensor& anchors, int64_t stride, double score_threshold, int64_t top_n, double box_clamp,
                    double box_offset) {
  const char* op = kind.decode;
  check_decode_shapes(cls_scores, box_deltas, anchors, kind);
  TORCH_CHECK(cls_scores.is_cuda() && box_deltas.device() == cls_scores.device(), "retinanet::", op,
              ": cls_scores and box_deltas must be on one CUDA device");
  TORCH_CHECK(top_n >= 0 && top_n < (int64_t(1) << 31), "retinanet::", op, ": bad top_n ", top_n);
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

  auto [out_scores, out_boxes, out_classes] = empty_outputs(args.batch, top_n, scores.options(), kind.values);
  const size_t ws_bytes = kind.decode_workspace(args);
  TORCH_CHECK(ws_bytes > 0 || args.batch == 0, "retinanet::", op, ": unsupported sizes ", scores.sizes(),
              " (at most 65535 images and 2^31 scores per image)");
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, scores.options().dtype(at::kByte));
  const cudaError_t err =
      kind.decode_kernel(args, to_dtype(dtype), scores.data_ptr(), deltas.data_ptr(), anchor_table.data_ptr<float>(),
                         out_scores.data_ptr(), out_boxes.data_ptr(), out_classes.data_ptr<int32_t>(),
                         workspace.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "retinanet::", op, ": ", cudaGetErrorString(err));
  if (dtype != out_dtype) return {out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes};
  return {out_scores, out_boxes, out_classes};
}

Outputs nms_with(const BoxKind& kind, const at::Tensor& scores_in, const at::Tensor& boxes_in,
                 const at::Tensor& classes_in, double iou_threshold, int64_t detections, double box_offset) {
  const char* op = kind.nms;
  check_nms_shapes(scores_in, boxes_in, classes_in, kind);
  TORCH_CHECK(
      scores_in.is_cuda() && boxes_in.device() == scores_in.device() && classes_in.device() == scores_in.device(),
      "retinanet::", op, ": scores, boxes and classes must be on one CUDA device");
  TORCH_CHECK(detections >= 0 && detections < (int64_t(1) << 31), "retinanet::", op, ": bad detections ", detections);
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

  auto [out_scores, out_boxes, out_classes] = empty_outputs(args.batch, detections, scores.options(), kind.values);
  const size_t ws_bytes = kind.nms_workspace(args);
  TORCH_CHECK(ws_bytes > 0 || args.batch == 0, "retinanet::", op, ": unsupported sizes ", scores.sizes());
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, scores.options().dtype(at::kByte));
  const cudaError_t err =
      kind.nms_kernel(args, to_dtype(dtype), scores.data_ptr(), boxes.data_ptr(), classes.data_ptr<int32_t>(),
                      out_scores.data_ptr(), out_boxes.data_ptr(), out_classes.data_ptr<int32_t>(),
                      workspace.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "retinanet::", op, ": ", cudaGetErrorString(err));
  if (dtype != out_dtype) return {out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes};
  return {out_scores, out_boxes, out_classes};
}

Outputs decode_cuda(const at::Tensor& cls_scores, const at::Tensor& box_deltas, const at::Tensor& anchors,
                    int64_t stride, double score_threshold, int64_t top_n, double box_clamp, double box_offset) {
  check_box_offset("decode", box_offset);
  return decode_with(kAxis, cls_scores, box_deltas, anchors, stride, score_threshold, top_n, box_clamp, box_offset);
}

Outputs nms_cuda(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& classes, double iou_threshold,
                 int64_t detections, double box_offset) {
  check_box_offset("nms", box_offset);
  return nms_with(kAxis, scores, boxes, classes, iou_threshold, detections, box_offset);
}

// Rotated boxes have no +1 pixel convention: the kernels run with offset 0.
Outputs decode_rotated_cuda(const at::Tensor& cls_scores, const at::Tensor& box_deltas, const at::Tensor& anchors,
                            int64_t stride, double score_threshold, int64_t top_n, double box_clamp) {
  return decode_with(kRotated, cls_scores, box_deltas, anchors, stride, score_threshold, top_n, box_clamp, 0.0);
}

Outputs nms_rotated_cuda(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& classes,
                         double iou_threshold, int64_t detections) {
  return nms_with(kRotated, scores, boxes, classes, iou_threshold, detections, 0.0);
}

void check_iou_shapes(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && a.size(1) == 5 && b.dim() == 2 && b.size(1) == 5,
              "retinanet::rotated_iou: boxes must be [N, 5] and [M, 5], got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && at::isFloatingType(b.scalar_type()),
              "retinanet::rotated_iou: boxes must be floating point");
}

// The IoU is computed and returned in float32, whatever the boxes' type (as the reference).
at::Tensor rotated_iou_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_iou_shapes(a_in, b_in);
  TORCH_CHECK(a_in.is_cuda() && b_in.device() == a_in.device(),
              "retinanet::rotated_iou: both box sets must be on one CUDA device");
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.to(at::kFloat).contiguous();
  const at::Tensor b = b_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  const cudaError_t err = retinanet::rotated_iou(a.size(0), b.size(0), a.data_ptr<float>(), b.data_ptr<float>(),
                                                 out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "retinanet::rotated_iou: ", cudaGetErrorString(err));
  return out;
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

Outputs decode_rotated_meta(const at::Tensor& cls_scores, const at::Tensor& box_deltas, const at::Tensor& anchors,
                            int64_t /*stride*/, double /*score_threshold*/, int64_t top_n, double /*box_clamp*/) {
  TORCH_CHECK(cls_scores.dim() == 4 && box_deltas.dim() == 4 && anchors.dim() == 2,
              "retinanet::decode_rotated: expected [B, A*C, H, W], [B, A*6, H, W] and [A, 5]");
  return empty_outputs(cls_scores.sym_size(0), top_n, cls_scores.options(), 5);
}

Outputs nms_rotated_meta(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& classes,
                         double /*iou_threshold*/, int64_t detections) {
  TORCH_CHECK(scores.dim() == 2 && boxes.dim() == 3 && classes.dim() == 2,
              "retinanet::nms_rotated: expected [B, N], [B, N, 5] and [B, N]");
  return empty_outputs(scores.sym_size(0), detections, scores.options(), 5);
}

at::Tensor rotated_iou_meta(const at::Tensor& a, const at::Tensor& b) {
  check_iou_shapes(a, b);
  return at::empty_symint({a.sym_size(0), b.sym_size(0)}, a.options().dtype(at::kFloat));
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
  // Rotated boxes (docs/rotated.md): 5 values per box, no box_offset.
  m.def("rotated_iou(Tensor a, Tensor b) -> Tensor");
  m.def(
      "decode_rotated(Tensor cls_scores, Tensor box_deltas, Tensor anchors, int stride, float score_threshold, "
      "int top_n, float box_clamp) -> (Tensor, Tensor, Tensor)");
  m.def(
      "nms_rotated(Tensor scores, Tensor boxes, Tensor classes, float iou_threshold, int detections) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(retinanet, CUDA, m) {
  m.impl("decode", &decode_cuda);
  m.impl("nms", &nms_cuda);
  m.impl("rotated_iou", &rotated_iou_cuda);
  m.impl("decode_rotated", &decode_rotated_cuda);
  m.impl("nms_rotated", &nms_rotated_cuda);
}

TORCH_LIBRARY_IMPL(retinanet, Meta, m) {
  m.impl("decode", &decode_meta);
  m.impl("nms", &nms_meta);
  m.impl("rotated_iou", &rotated_iou_meta);
  m.impl("decode_rotated", &decode_rotated_meta);
  m.impl("nms_rotated", &nms_rotated_meta);
}

// `import retinanet._C` loads the library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "retinanet CUDA custom operators", -1, nullptr};
  return PyModule_Create(&module);
}
