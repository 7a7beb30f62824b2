// Shared helpers of the TensorRT plugins: field parsing, type mapping, logging.
//
// Written against the IPluginV3 interfaces of TensorRT 10.x and 11.x (their
// plugin headers agree). Nothing here needs the TensorRT library itself: the
// plugin classes only implement TensorRT's interfaces, so the plugin sources
// also build into the library-free test harness (tests/plugins/harness.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "kernels/dtype.h"

namespace retinanet {
namespace plugins {

constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

// Errors go to the logger TensorRT hands us through setLoggerFinder(); without one, to stderr.
void log_error(char const* message) noexcept;
inline void log_error(std::string const& message) noexcept { log_error(message.c_str()); }
void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;

// Reports the exception being handled as "where: what()" through log_error, without
// allocating; call it only inside a catch block. TensorRT calls the plugins through
// noexcept methods, where an escaping exception (std::bad_alloc from a std::string or
// std::vector) would end the process: those that can throw catch everything and
// return their failure value instead, as TensorRT's own plugins do.
void log_exception(char const* where) noexcept;

// The kernels' element type for a TensorRT floating-point type (false if none).
inline bool to_kernel_dtype(nvinfer1::DataType t, DType* out) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT:
      *out = DType::kFloat32;
      return true;
    case nvinfer1::DataType::kHALF:
      *out = DType::kFloat16;
      return true;
    case nvinfer1::DataType::kBF16:
      *out = DType::kBFloat16;
      return true;
    default:
      return false;
  }
}

inline bool is_float_type(nvinfer1::DataType t) {
  DType unused;
  return to_kernel_dtype(t, &unused);
}

// Element i of a float field: the ONNX parser passes float attributes as kFLOAT32;
// kFLOAT64 is accepted as well. False for any other type.
inline bool float_at(nvinfer1::PluginField const& f, int32_t i, float* out) {
  if (f.type == nvinfer1::PluginFieldType::kFLOAT32) {
    *out = static_cast<float const*>(f.data)[i];
  } else if (f.type == nvinfer1::PluginFieldType::kFLOAT64) {
    *out = static_cast<float>(static_cast<double const*>(f.data)[i]);
  } else {
    return false;
  }
  return true;
}

inline bool read_float(nvinfer1::PluginField const& f, float* out) {
  return f.data != nullptr && f.length >= 1 && float_at(f, 0, out);
}

// An int field: kINT32 from the ONNX parser, or kINT64 within int32 range.
inline bool read_int(nvinfer1::PluginField const& f, int32_t* out) {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case nvinfer1::PluginFieldType::kINT32:
      *out = static_cast<int32_t const*>(f.data)[0];
      return true;
    case nvinfer1::PluginFieldType::kINT64: {
      int64_t const v = static_cast<int64_t const*>(f.data)[0];
      if (v < INT32_MIN || v > INT32_MAX) return false;
      *out = static_cast<int32_t>(v);
      return true;
    }
    default:
      return false;
  }
}

inline bool read_floats(nvinfer1::PluginField const& f, std::vector<float>* out) {
  if (f.data == nullptr || f.length < 0) return false;
  out->resize(static_cast<size_t>(f.length));
  for (int32_t i = 0; i < f.length; ++i) {
    if (!float_at(f, i, &(*out)[i])) return false;
  }
  return true;
}

inline bool field_is(nvinfer1::PluginField const& f, char const* name) {
  return f.name != nullptr && std::strcmp(f.name, name) == 0;
}

}  // namespace plugins
}  // namespace retinanet
