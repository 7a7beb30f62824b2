// The library's entry points: TensorRT's plugin registry (IPluginRegistry::loadLibrary,
// trt.get_plugin_registry().load_library, trtexec --dynamicPlugins) looks up
// getCreators() and setLoggerFinder() by name. REGISTER_TENSORRT_PLUGIN adds
// static registration for programs that link this code and libnvinfer
// (RETINANET_STATIC_REGISTRATION; it calls getPluginRegistry() from libnvinfer).
#include <cstdio>
#include <exception>
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
  try {
    std::lock_guard<std::mutex> lock(logger_mutex);
    logger_finder = finder;
  } catch (...) {
    log_exception("setLoggerFinder");
  }
}

void log_error(char const* message) noexcept {
  nvinfer1::ILogger* logger = nullptr;
  try {
    std::lock_guard<std::mutex> lock(logger_mutex);
    if (logger_finder != nullptr) logger = logger_finder->findLogger();
  } catch (...) {  // std::system_error from the mutex: report to stderr
  }
  if (logger != nullptr) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, message);
  } else {
    std::fprintf(stderr, "[retinanet plugins] %s\n", message);
  }
}

void log_exception(char const* where) noexcept {
  char message[512];
  try {
    throw;
  } catch (std::exception const& e) {
    std::snprintf(message, sizeof(message), "%s: %s", where, e.what());
  } catch (...) {
    std::snprintf(message, sizeof(message), "%s: unknown exception", where);
  }
  log_error(message);
}

}  // namespace plugins
}  // namespace retinanet

extern "C" {

// Declared by us, not by TensorRT's headers: the registry resolves these two names in the library.
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { retinanet::plugins::set_logger_finder(finder); }

nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  nbCreators = 0;
  try {  // the creators' constructors allocate their field lists
    static retinanet::plugins::DecodePluginCreator decode_creator;
    static retinanet::plugins::NmsPluginCreator nms_creator;
    static retinanet::plugins::DecodeRotatedPluginCreator decode_rotated_creator;
    static retinanet::plugins::NmsRotatedPluginCreator nms_rotated_creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&decode_creator, &nms_creator,
                                                                  &decode_rotated_creator, &nms_rotated_creator};
    nbCreators = 4;
    return creators;
  } catch (...) {
    retinanet::plugins::log_exception("getCreators");
  }
  return nullptr;
}

}  // extern "C"

#ifdef RETINANET_STATIC_REGISTRATION
namespace {
// The macro pastes its argument into a variable name: plain identifiers only.
using RetinaNetDecodeCreator = retinanet::plugins::DecodePluginCreator;
using RetinaNetNMSCreator = retinanet::plugins::NmsPluginCreator;
using RetinaNetDecodeRotatedCreator = retinanet::plugins::DecodeRotatedPluginCreator;
using RetinaNetNMSRotatedCreator = retinanet::plugins::NmsRotatedPluginCreator;
REGISTER_TENSORRT_PLUGIN(RetinaNetDecodeCreator);
REGISTER_TENSORRT_PLUGIN(RetinaNetNMSCreator);
REGISTER_TENSORRT_PLUGIN(RetinaNetDecodeRotatedCreator);
REGISTER_TENSORRT_PLUGIN(RetinaNetNMSRotatedCreator);
}  // namespace
#endif
