// Shared bits of the C++ export/infer programs: a logger and smart pointers for TensorRT objects.
#pragma once

#include <iostream>
#include <memory>

#include <NvInfer.h>

namespace retinanet_cpp {

class Logger : public nvinfer1::ILogger {
 public:
  explicit Logger(bool verbose = false) : verbose_(verbose) {}
  void log(Severity severity, char const* msg) noexcept override {
    if (severity <= Severity::kWARNING || verbose_) std::cerr << "[TensorRT] " << msg << "\n";
  }

 private:
  bool verbose_;
};

// TensorRT 10+ objects are destroyed with delete.
template <typename T>
using Unique = std::unique_ptr<T>;

}  // namespace retinanet_cpp
