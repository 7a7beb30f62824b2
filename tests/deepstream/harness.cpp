// DeepStream parser harness: runs extras/deepstream/nvdsparsebbox_retinanet.cpp on synthetic
// nvinfer layers, with no DeepStream runtime (only the types of nvdsinfer_custom_impl.h).
//
//   deepstream_harness < cases.txt > results.txt
//
// tests/test_deepstream.py writes the cases and computes the expected results itself. Input,
// one case after another (floats as C hex floats, exact both ways):
//   case NAME parse|inputs
//   network WIDTH HEIGHT CHANNELS
//   params NUM_CLASSES N T_0 ... T_N-1       (parse: the per-class pre-cluster thresholds)
//   maxbatch M                               (inputs: NvDsInferInitializeInputLayers' batch)
//   layer NAME|- TYPE NUM_DIMS D_0 ... COUNT|null V_0 ... V_COUNT-1
//   end
// TYPE is the NvDsInferDataType value; INT32 values are integers, any other type's are floats
// stored as float32 (the parser refuses other types before reading them). NAME "-" is a null
// layerName, "null" a null buffer. Output per case:
//   case NAME true|false
//   error MESSAGE                            (when false)
//   object CLASS LEFT TOP WIDTH HEIGHT CONFIDENCE   (parse, in the parser's order)
//   buffer NAME V_0 ...                      (inputs: each layer's buffer after the call)
// Each case also goes through the exported entry point (NvDsInferParseRetinaNet or
// NvDsInferInitializeInputLayers), which must give the same result; they print their error
// line on stderr. Exit status 0 unless the input is malformed or the two disagree.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "nvdsparsebbox_retinanet.h"

namespace {

struct Layer {
  std::string name;
  bool null_name = false;
  bool null_buffer = false;
  NvDsInferLayerInfo info{};
  std::vector<float> floats;
  std::vector<int32_t> ints;
};

struct Case {
  std::string name, kind;
  NvDsInferNetworkInfo network{};
  NvDsInferParseDetectionParams params;
  unsigned int max_batch = 0;
  std::vector<Layer> layers;
};

[[noreturn]] void malformed(const std::string& what) {
  std::cerr << "harness: malformed input: " << what << "\n";
  std::exit(2);
}

float read_float(std::istream& in) {
  std::string token;
  if (!(in >> token)) malformed("missing float");
  return std::strtof(token.c_str(), nullptr);  // hex floats and nan/inf
}

Layer read_layer(std::istream& in, bool is_input) {
  Layer layer;
  int type = 0;
  unsigned int num_dims = 0;
  std::string count;
  if (!(in >> layer.name >> type >> num_dims) || num_dims > NVDSINFER_MAX_DIMS) malformed("layer header");
  layer.null_name = layer.name == "-";
  layer.info.dataType = static_cast<NvDsInferDataType>(type);
  layer.info.inferDims.numDims = num_dims;
  layer.info.inferDims.numElements = 1;
  for (unsigned int i = 0; i < num_dims; ++i) {
    if (!(in >> layer.info.inferDims.d[i])) malformed("layer dims");
    layer.info.inferDims.numElements *= layer.info.inferDims.d[i];
  }
  if (!(in >> count)) malformed("layer count");
  layer.null_buffer = count == "null";
  const std::size_t n = layer.null_buffer ? 0 : std::stoul(count);
  for (std::size_t i = 0; i < n; ++i) {
    if (layer.info.dataType == INT32) {
      long value = 0;
      if (!(in >> value)) malformed("int value");
      layer.ints.push_back(static_cast<int32_t>(value));
    } else {
      layer.floats.push_back(read_float(in));
    }
  }
  layer.info.isInput = is_input ? 1 : 0;
  return layer;
}

bool read_case(std::istream& in, Case& c) {
  std::string word;
  if (!(in >> word)) return false;
  if (word != "case" || !(in >> c.name >> c.kind)) malformed("case header");
  while (in >> word && word != "end") {
    if (word == "network") {
      in >> c.network.width >> c.network.height >> c.network.channels;
    } else if (word == "params") {
      std::size_t n = 0;
      in >> c.params.numClassesConfigured >> n;
      for (std::size_t i = 0; i < n; ++i) c.params.perClassPreclusterThreshold.push_back(read_float(in));
    } else if (word == "maxbatch") {
      in >> c.max_batch;
    } else if (word == "layer") {
      c.layers.push_back(read_layer(in, c.kind == "inputs"));
    } else {
      malformed("unknown line " + word);
    }
  }
  if (word != "end") malformed("case " + c.name + " has no end");
  return true;
}

// The layer infos as nvinfer passes them, pointing at the case's own storage.
std::vector<NvDsInferLayerInfo> infos(Case& c) {
  std::vector<NvDsInferLayerInfo> out;
  for (std::size_t i = 0; i < c.layers.size(); ++i) {
    Layer& layer = c.layers[i];
    NvDsInferLayerInfo info = layer.info;
    info.layerName = layer.null_name ? nullptr : layer.name.c_str();
    info.bindingIndex = static_cast<int>(i);
    void* data = layer.info.dataType == INT32 ? static_cast<void*>(layer.ints.data()) : layer.floats.data();
    info.buffer = layer.null_buffer ? nullptr : data;
    out.push_back(info);
  }
  return out;
}

bool same(const std::vector<NvDsInferObjectDetectionInfo>& a, const std::vector<NvDsInferObjectDetectionInfo>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].classId != b[i].classId || a[i].left != b[i].left || a[i].top != b[i].top || a[i].width != b[i].width ||
        a[i].height != b[i].height || a[i].detectionConfidence != b[i].detectionConfidence) {
      return false;
    }
  }
  return true;
}

// Runs one case; false if the pure function and the exported entry point disagree.
bool run(Case& c) {
  std::string error;
  bool ok = false, agree = false;
  std::ostringstream lines;
  if (c.kind == "parse") {
    std::vector<NvDsInferObjectDetectionInfo> objects, exported = {NvDsInferObjectDetectionInfo{}};
    ok = retinanet_deepstream::parse_detections(infos(c), c.network, c.params, objects, error);
    agree = NvDsInferParseRetinaNet(infos(c), c.network, c.params, exported) == ok && same(objects, exported);
    char line[256];
    for (const NvDsInferObjectDetectionInfo& o : objects) {
      std::snprintf(line, sizeof(line), "object %u %a %a %a %a %a\n", o.classId, static_cast<double>(o.left),
                    static_cast<double>(o.top), static_cast<double>(o.width), static_cast<double>(o.height),
                    static_cast<double>(o.detectionConfidence));
      lines << line;
    }
  } else if (c.kind == "inputs") {
    Case twin = c;  // the exported entry point fills its own copy of the buffers
    ok = retinanet_deepstream::fill_image_sizes(infos(c), c.network, c.max_batch, error);
    agree = NvDsInferInitializeInputLayers(infos(twin), twin.network, twin.max_batch) == ok;
    for (std::size_t i = 0; i < c.layers.size(); ++i) {
      agree = agree && c.layers[i].ints == twin.layers[i].ints;
      lines << "buffer " << c.layers[i].name;
      for (int32_t v : c.layers[i].ints) lines << " " << v;
      lines << "\n";
    }
  } else {
    malformed("unknown case kind " + c.kind);
  }
  std::cout << "case " << c.name << (ok ? " true\n" : " false\n");
  if (!ok) std::cout << "error " << error << "\n";
  std::cout << lines.str();
  if (!agree) std::cout << "mismatch " << c.name << ": the exported entry point gave another result\n";
  return agree;
}

}  // namespace

int main() {
  int mismatches = 0;
  while (true) {
    Case c;  // one per case: NvDsInferParseDetectionParams holds a reference, so it is never reassigned
    if (!read_case(std::cin, c)) break;
    if (!run(c)) ++mismatches;
  }
  std::cout.flush();
  return mismatches == 0 ? 0 : 1;
}
