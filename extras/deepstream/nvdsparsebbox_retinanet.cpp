// DeepStream (Gst-nvinfer) custom bounding-box parser for retinanet engines.
//
// An export of `retinanet export` ends in decode and class-aware NMS, so its outputs are final
// detections, D slots per image, best first:
//   scores  float32 [D]     boxes float32 [D, 4] (x1, y1, x2, y2 in network-input pixels)
//   classes int32 [D]       contiguous class index; unused slots have score 0, box 0, class -1
// nvinfer calls the parser once per frame with host copies of that frame's outputs, so this file
// only filters and converts. Nothing is decoded or suppressed here, and the config turns nvinfer's
// own clustering off (cluster-mode=4): a second NMS would only remove detections the model kept.
// nvinfer maps the returned boxes from network-input pixels back to the frame itself.
#include "nvdsparsebbox_retinanet.h"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace retinanet_deepstream {
namespace {

const NvDsInferLayerInfo* find_layer(const std::vector<NvDsInferLayerInfo>& layers, const char* name) {
  for (const NvDsInferLayerInfo& layer : layers) {
    if (layer.layerName != nullptr && std::strcmp(layer.layerName, name) == 0) return &layer;
  }
  return nullptr;
}

const char* type_name(NvDsInferDataType type) {
  switch (type) {
    case FLOAT:
      return "FLOAT";
    case HALF:
      return "HALF";
    case INT8:
      return "INT8";
    case INT32:
      return "INT32";
    case INT64:
      return "INT64";
    case UINT8:
      return "UINT8";
  }
  return "an unknown type";
}

std::string quoted(const char* name) { return std::string("\"") + name + "\""; }

std::string dims_text(const NvDsInferDims& dims) {
  std::string text = "[";
  for (unsigned int i = 0; i < dims.numDims && i < NVDSINFER_MAX_DIMS; ++i) {
    text += (i > 0 ? ", " : "") + std::to_string(dims.d[i]);
  }
  return text + "]";
}

// The size of the axis `from_end` places before the last one, 0 if there is none. nvinfer's dims
// of an output leave the batch axis out; reading from the end does not depend on that.
unsigned int axis_from_end(const NvDsInferDims& dims, unsigned int from_end) {
  if (dims.numDims > NVDSINFER_MAX_DIMS || dims.numDims <= from_end) return 0;
  return dims.d[dims.numDims - 1 - from_end];
}

bool check_layer(const NvDsInferLayerInfo* layer, const char* name, NvDsInferDataType type, std::string& error) {
  if (layer == nullptr) {
    error = "no output layer " + quoted(name) + " (a retinanet export has outputs scores, boxes and classes)";
  } else if (layer->dataType != type) {
    error = "output " + quoted(name) + " is " + type_name(layer->dataType) + ", expected " + type_name(type);
  } else if (layer->buffer == nullptr) {
    error = "output " + quoted(name) + " has no buffer";
  } else {
    return true;
  }
  return false;
}

// Into [0, limit]; NaN becomes 0.
float clip(float value, float limit) { return value > 0.0f ? (value < limit ? value : limit) : 0.0f; }

}  // namespace

bool find_outputs(const std::vector<NvDsInferLayerInfo>& layers, Outputs& outputs, std::string& error) {
  // By name: nvinfer lists the outputs in the engine's binding order, which nothing here fixes.
  const NvDsInferLayerInfo* scores = find_layer(layers, kScores);
  const NvDsInferLayerInfo* boxes = find_layer(layers, kBoxes);
  const NvDsInferLayerInfo* classes = find_layer(layers, kClasses);
  if (!check_layer(scores, kScores, FLOAT, error) || !check_layer(boxes, kBoxes, FLOAT, error) ||
      !check_layer(classes, kClasses, INT32, error)) {
    return false;
  }
  const unsigned int d = axis_from_end(scores->inferDims, 0);
  const std::string expected = "(" + quoted(kScores) + " has dims " + dims_text(scores->inferDims) + ")";
  if (d == 0) {
    error = "output " + quoted(kScores) + " has dims " + dims_text(scores->inferDims) + ", expected [D], D >= 1";
  } else if (axis_from_end(classes->inferDims, 0) != d) {
    error = "output " + quoted(kClasses) + " has dims " + dims_text(classes->inferDims) + ", expected [" +
            std::to_string(d) + "] " + expected;
  } else if (axis_from_end(boxes->inferDims, 1) != d || axis_from_end(boxes->inferDims, 0) != 4) {
    error = "output " + quoted(kBoxes) + " has dims " + dims_text(boxes->inferDims) + ", expected [" +
            std::to_string(d) + ", 4] " + expected;
  } else {
    outputs.scores = static_cast<const float*>(scores->buffer);
    outputs.boxes = static_cast<const float*>(boxes->buffer);
    outputs.classes = static_cast<const int32_t*>(classes->buffer);
    outputs.detections = d;
    return true;
  }
  return false;
}

bool parse_detections(const std::vector<NvDsInferLayerInfo>& layers, const NvDsInferNetworkInfo& network,
                      const NvDsInferParseDetectionParams& params, std::vector<NvDsInferObjectDetectionInfo>& objects,
                      std::string& error) {
  objects.clear();
  Outputs out;
  if (!find_outputs(layers, out, error)) return false;

  // nvinfer indexes its per-class settings by class id without a bounds check, so a class beyond
  // num-detected-classes (or one without a threshold) must not reach it: such slots are skipped.
  const std::size_t known_classes =
      std::min<std::size_t>(params.numClassesConfigured, params.perClassPreclusterThreshold.size());
  const float width = static_cast<float>(network.width);
  const float height = static_cast<float>(network.height);
  for (unsigned int i = 0; i < out.detections; ++i) {
    const int32_t class_id = out.classes[i];
    if (class_id < 0 || static_cast<std::size_t>(class_id) >= known_classes) continue;  // -1: an unused slot
    const float score = out.scores[i];
    if (!(score >= params.perClassPreclusterThreshold[class_id])) continue;  // a NaN score fails too

    // The model clips boxes to the input's extent on each pyramid level, which on P6/P7 may reach
    // past the input by up to a stride: clip to the network input nvinfer maps back from.
    const float* box = out.boxes + 4 * static_cast<std::size_t>(i);
    const float left = clip(box[0], width), top = clip(box[1], height);
    const float right = clip(box[2], width), bottom = clip(box[3], height);
    if (!(right > left && bottom > top)) continue;  // nothing of it is inside the input

    NvDsInferObjectDetectionInfo object{};  // zeroes the fields of other DeepStream versions (rotation_angle)
    object.classId = static_cast<unsigned int>(class_id);
    object.left = left;
    object.top = top;
    object.width = right - left;
    object.height = bottom - top;
    object.detectionConfidence = score;
    objects.push_back(object);
  }
  return true;
}

bool fill_image_sizes(const std::vector<NvDsInferLayerInfo>& inputs, const NvDsInferNetworkInfo& network,
                      unsigned int max_batch, std::string& error) {
  for (const NvDsInferLayerInfo& layer : inputs) {
    const char* name = layer.layerName != nullptr ? layer.layerName : "(unnamed)";
    if (std::strcmp(name, kImageSizes) != 0) {
      error = "unexpected input " + quoted(name) + " (a retinanet export takes images and, some, image_sizes)";
    } else if (layer.dataType != INT32) {
      error = "input " + quoted(name) + " is " + type_name(layer.dataType) + ", expected INT32";
    } else if (layer.inferDims.numElements != 2) {
      error = "input " + quoted(name) + " has dims " + dims_text(layer.inferDims) + ", expected [2]";
    } else if (layer.buffer == nullptr) {
      error = "input " + quoted(name) + " has no buffer";
    } else {
      // nvinfer calls this once, before the first frame, so the size of the frame inside the input
      // is unknown: the whole input counts as the image (DeepStream's padding included).
      int32_t* sizes = static_cast<int32_t*>(layer.buffer);
      for (unsigned int b = 0; b < max_batch; ++b) {
        sizes[2 * static_cast<std::size_t>(b)] = static_cast<int32_t>(network.height);
        sizes[2 * static_cast<std::size_t>(b) + 1] = static_cast<int32_t>(network.width);
      }
      continue;
    }
    return false;
  }
  return true;
}

}  // namespace retinanet_deepstream

// The entry points nvinfer looks up by name (parse-bbox-func-name, and NvDsInferInitializeInputLayers
// for models with a second input). Errors are one line on stderr; nothing may throw into nvinfer.
extern "C" bool NvDsInferParseRetinaNet(std::vector<NvDsInferLayerInfo> const& outputLayersInfo,
                                        NvDsInferNetworkInfo const& networkInfo,
                                        NvDsInferParseDetectionParams const& detectionParams,
                                        std::vector<NvDsInferObjectDetectionInfo>& objectList) {
  std::string error;
  try {
    if (retinanet_deepstream::parse_detections(outputLayersInfo, networkInfo, detectionParams, objectList, error)) {
      return true;
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::fprintf(stderr, "NvDsInferParseRetinaNet: %s\n", error.c_str());
  return false;
}
CHECK_CUSTOM_PARSE_FUNC_PROTOTYPE(NvDsInferParseRetinaNet);

extern "C" bool NvDsInferInitializeInputLayers(std::vector<NvDsInferLayerInfo> const& inputLayersInfo,
                                               NvDsInferNetworkInfo const& networkInfo, unsigned int maxBatchSize) {
  std::string error;
  try {
    if (retinanet_deepstream::fill_image_sizes(inputLayersInfo, networkInfo, maxBatchSize, error)) return true;
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::fprintf(stderr, "NvDsInferInitializeInputLayers: %s\n", error.c_str());
  return false;
}
