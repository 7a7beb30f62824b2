// The logic behind libnvdsparsebbox_retinanet.so, callable without DeepStream's runtime: it needs
// only the types of nvdsinfer_custom_impl.h, so tests/deepstream/harness.cpp links it directly.
// The library's exported entry points (NvDsInferParseRetinaNet, NvDsInferInitializeInputLayers)
// call these and print `error` to stderr when they fail.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nvdsinfer_custom_impl.h>

// The parse-bbox-func-name of the config, an NvDsInferParseCustomFunc. (NvDsInferInitializeInputLayers,
// the library's other entry point, is declared by nvdsinfer_custom_impl.h.)
extern "C" bool NvDsInferParseRetinaNet(std::vector<NvDsInferLayerInfo> const& outputLayersInfo,
                                        NvDsInferNetworkInfo const& networkInfo,
                                        NvDsInferParseDetectionParams const& detectionParams,
                                        std::vector<NvDsInferObjectDetectionInfo>& objectList);

namespace retinanet_deepstream {

// The output and input names of an export (retinanet/export/onnx.py).
constexpr char kScores[] = "scores";
constexpr char kBoxes[] = "boxes";
constexpr char kClasses[] = "classes";
constexpr char kImageSizes[] = "image_sizes";

// One frame's outputs, found by name among nvinfer's output layers.
struct Outputs {
  const float* scores = nullptr;     // [D]
  const float* boxes = nullptr;      // [D, 4]: x1, y1, x2, y2 in network-input pixels
  const int32_t* classes = nullptr;  // [D]: class index, -1 in unused slots
  unsigned int detections = 0;       // D
};

// Finds the three outputs by name and checks their data types and that they agree on D.
// False, with one line in `error`, if one is missing, of another type, empty or of another D.
bool find_outputs(const std::vector<NvDsInferLayerInfo>& layers, Outputs& outputs, std::string& error);

// Replaces `objects` with the frame's detections: slots with class >= 0 and below the configured
// class count whose score reaches their class's pre-cluster threshold, boxes clipped to the network
// input (left/top/width/height); boxes with nothing left after clipping are dropped.
bool parse_detections(const std::vector<NvDsInferLayerInfo>& layers, const NvDsInferNetworkInfo& network,
                      const NvDsInferParseDetectionParams& params, std::vector<NvDsInferObjectDetectionInfo>& objects,
                      std::string& error);

// Fills the `image_sizes` input (int32 (height, width) per image) of models that take it with the
// network input's size for every batch slot. False if another or a malformed extra input is given.
bool fill_image_sizes(const std::vector<NvDsInferLayerInfo>& inputs, const NvDsInferNetworkInfo& network,
                      unsigned int max_batch, std::string& error);

}  // namespace retinanet_deepstream
