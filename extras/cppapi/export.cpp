// export: a fixed-size TensorRT-form ONNX model (`retinanet export model.pth model.onnx --plugin-form
// --size H W`) plus the plugin library -> a serialised engine. The profile below spans the batch
// only, so a model exported without --size (dynamic height and width) is not for this tool.
//
//   export MODEL.onnx ENGINE.plan --plugins libretinanet_plugins.so [--batch MIN OPT MAX] [--workspace MiB]
//
// Precision is carried by the ONNX graph (FP16 weights, or INT8 Q/DQ): the network is
// strongly typed, so no precision flags are set (TensorRT 11 has none).
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>

#include <NvInfer.h>
#include <NvOnnxParser.h>

#include "common.h"

using retinanet_cpp::Logger;
using retinanet_cpp::Unique;

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: export MODEL.onnx ENGINE.plan --plugins LIB.so [--batch MIN OPT MAX] [--workspace MiB] "
                 "[--verbose]\n";
    return 2;
  }
  std::string const onnx_path = argv[1], plan_path = argv[2];
  std::string plugins;
  int64_t batch[3] = {1, 8, 16};
  size_t workspace_mib = 4096;
  bool verbose = false;
  for (int i = 3; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--plugins") && i + 1 < argc) {
      plugins = argv[++i];
    } else if (!std::strcmp(argv[i], "--batch") && i + 3 < argc) {
      for (int64_t& b : batch) b = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--workspace") && i + 1 < argc) {
      workspace_mib = static_cast<size_t>(std::atoll(argv[++i]));
    } else if (!std::strcmp(argv[i], "--verbose")) {
      verbose = true;
    } else {
      std::cerr << "export: unknown argument " << argv[i] << "\n";
      return 2;
    }
  }
  if (plugins.empty() || batch[0] < 1 || batch[0] > batch[1] || batch[1] > batch[2]) {
    std::cerr << "export: need --plugins and 1 <= MIN <= OPT <= MAX\n";
    return 2;
  }
  Logger logger(verbose);
  Unique<nvinfer1::IBuilder> builder(nvinfer1::createInferBuilder(logger));
  if (!builder || builder->getPluginRegistry().loadLibrary(plugins.c_str()) == nullptr) {
    std::cerr << "export: cannot load the plugin library " << plugins << "\n";
    return 1;
  }
#if NV_TENSORRT_MAJOR < 11
  auto const flags = 1U << static_cast<uint32_t>(nvinfer1::NetworkDefinitionCreationFlag::kSTRONGLY_TYPED);
#else
  nvinfer1::NetworkDefinitionCreationFlags const flags = 0;  // strongly typed is the only mode
#endif
  Unique<nvinfer1::INetworkDefinition> network(builder->createNetworkV2(flags));
  Unique<nvonnxparser::IParser> parser(nvonnxparser::createParser(*network, logger));
  if (!parser->parseFromFile(onnx_path.c_str(), static_cast<int>(nvinfer1::ILogger::Severity::kWARNING))) {
    for (int i = 0; i < parser->getNbErrors(); ++i) {
      nvonnxparser::IParserError const* e = parser->getError(i);
      std::cerr << onnx_path << ": node " << e->node() << " (" << e->nodeName() << ", " << e->nodeOperator()
                << "): " << e->desc() << "\n";
    }
    return 1;
  }
  Unique<nvinfer1::IBuilderConfig> config(builder->createBuilderConfig());
  config->setMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE, workspace_mib << 20);
  nvinfer1::IOptimizationProfile* profile = builder->createOptimizationProfile();
  nvinfer1::OptProfileSelector const selectors[3] = {
      nvinfer1::OptProfileSelector::kMIN, nvinfer1::OptProfileSelector::kOPT, nvinfer1::OptProfileSelector::kMAX};
  // images [-1, 3, H, W], and for models that take image sizes image_sizes [-1, 2]: only the batch varies.
  for (int32_t i = 0; i < network->getNbInputs(); ++i) {
    nvinfer1::ITensor* input = network->getInput(i);
    nvinfer1::Dims const dims = input->getDimensions();
    for (int k = 0; k < 3; ++k) {
      nvinfer1::Dims d = dims;
      d.d[0] = batch[k];
      profile->setDimensions(input->getName(), selectors[k], d);
    }
  }
  config->addOptimizationProfile(profile);
  Unique<nvinfer1::IHostMemory> plan(builder->buildSerializedNetwork(*network, *config));
  if (!plan) {
    std::cerr << "export: engine build failed\n";
    return 1;
  }
  std::ofstream out(plan_path, std::ios::binary);
  out.write(static_cast<char const*>(plan->data()), static_cast<std::streamsize>(plan->size()));
  if (!out) {
    std::cerr << "export: cannot write " << plan_path << "\n";
    return 1;
  }
  std::cout << plan_path << ": " << plan->size() << " bytes\n";
  return 0;
}
