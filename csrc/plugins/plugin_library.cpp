// The library's entry points: TensorRT's plugin registry (IPluginRegistry::loadLibrary,
// trt.get_plugin_registry().load_library, trtexec --dynamicPlugins) looks up
// getCreators() and setLoggerFinder() by name. REGISTER_TENSORRT_PLUGIN adds
// static registration for programs that link this code and libnvinfer
// (RETINANET_STATIC_REGISTRATION; it calls getPluginRegistry() from libnvinfer).
#include <cstdio>
#include <mutex>

#include <NvInferRuntime.h>

#include "plugins/decode_plugin.h"
#include "plugins/nms_plugin.h"
#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

namespace {

std::mutex logger_mutex;
nvinfer1::ILoggerFinder* logger_finder = nullptr;

}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept {
  std::lock_guard<std::mutex> lock(logger_mutex);
  logger_finder = finder;
}

void log_error(std::string const& message) noexcept {
  nvinfer1::ILogger* logger = nullptr;
  {
    std::lock_guard<std::mutex> lock(logger_mutex);
    if (logger_finder != nullptr) logger = logger_finder->findLogger();
  }
  if (logger != nullptr) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
  } else {
    std::fprintf(stderr, "[retinanet plugins] %s\n", message.c_str());
  }
}

}  // namespace plugins
}  // namespace retinanet

extern "C" {

// Declared by us, not by TensorRT's headers: the registry resolves these two names in the library.
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { retinanet::plugins::set_logger_finder(finder); }

nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static retinanet::plugins::DecodePluginCreator decode_creator;
  static retinanet::plugins::NmsPluginCreator nms_creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&decode_creator, &nms_creator};
  nbCreators = 2;
  return creators;
}

}  // extern "C"

#ifdef RETINANET_STATIC_REGISTRATION
namespace {
// The macro pastes its argument into a variable name: plain identifiers only.
using RetinaNetDecodeCreator = retinanet::plugins::DecodePluginCreator;
using RetinaNetNMSCreator = retinanet::plugins::NmsPluginCreator;
REGISTER_TENSORRT_PLUGIN(RetinaNetDecodeCreator);
REGISTER_TENSORRT_PLUGIN(RetinaNetNMSCreator);
}  // namespace
#endif
