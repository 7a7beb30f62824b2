// What RetinaNetDecode, RetinaNetNMS and their rotated forms share as IPluginV3 classes,
// written once.
//
// All plugins output (scores [B, K], boxes [B, K, V], classes [B, K] INT32) in the
// scores' floating-point type, expose the three V3One capabilities, are configured
// only by scalar / float-list fields, keep no per-context state, and turn their
// input shapes into one kernel-argument struct that sizes the workspace and drives
// the kernel. That plumbing is here; each plugin supplies, as Derived (CRTP):
//
//   static constexpr char const* kName;        plugin name
//   static constexpr char const* kInputs;      the inputs it takes, for error messages
//   static constexpr int32_t kNbInputs;        number of inputs
//   static constexpr int32_t kScoresRank;      rank of input 0 (scores)
//   static constexpr int32_t kBoxValues;       V: 4 (x1, y1, x2, y2) or 5 (cx, cy, w, h, θ)
//   static bool is_int_input(int32_t pos);     inputs that must be INT32
//   int32_t output_length() const;             K
//   using Args;                                the kernel's argument struct
//   bool make_args(Dims const* inputs, Args*) const;   false if the shapes do not fit
//   static size_t workspace_size(Args const&);
//   cudaError_t run(Args const&, DType, inputs, outputs, workspace, stream);
//   optionally int32_t prepare() (once per shape change, outside enqueue) and
//   bool ready() const (prepare has succeeded).
//
// Params has `std::vector<FieldRef> fields()` (its fields in serialization order,
// pointing into the object) and `std::string check() const`. Every field is required
// unless marked FieldRef::optional: an absent optional field keeps the Params default.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <NvInferRuntime.h>

#include "plugins/plugin_common.h"

namespace retinanet {
namespace plugins {

// One plugin field bound to a Params member: exactly one of the pointers is set.
struct FieldRef {
  FieldRef(char const* n, float* value) : name(n), scalar_float(value) {}
  FieldRef(char const* n, int32_t* value) : name(n), scalar_int(value) {}
  FieldRef(char const* n, std::vector<float>* values) : name(n), float_list(values) {}

  // A field that createPlugin may go without, keeping the member's default. Only for
  // fields added to a plugin version after it shipped: ONNX files and serialised
  // engines written before do not have them, and must keep loading as they did.
  static FieldRef optional(char const* n, float* value) {
    FieldRef ref(n, value);
    ref.required = false;
    return ref;
  }

  char const* name;
  float* scalar_float = nullptr;
  int32_t* scalar_int = nullptr;
  std::vector<float>* float_list = nullptr;
  bool required = true;

  nvinfer1::PluginField describe(bool with_data) const {
    using nvinfer1::PluginFieldType;
    if (scalar_float != nullptr)
      return nvinfer1::PluginField(name, with_data ? scalar_float : nullptr, PluginFieldType::kFLOAT32, 1);
    if (scalar_int != nullptr)
      return nvinfer1::PluginField(name, with_data ? scalar_int : nullptr, PluginFieldType::kINT32, 1);
    // A list's length is only known per instance: the creator advertises 0 (any).
    return nvinfer1::PluginField(name, with_data ? float_list->data() : nullptr, PluginFieldType::kFLOAT32,
                                 with_data ? static_cast<int32_t>(float_list->size()) : 0);
  }

  bool read(nvinfer1::PluginField const& f) const {
    if (scalar_float != nullptr) return read_float(f, scalar_float);
    if (scalar_int != nullptr) return read_int(f, scalar_int);
    return read_floats(f, float_list);
  }
};

// Points `collection` at `fields` (which must outlive it).
inline nvinfer1::PluginFieldCollection const* collect(std::vector<nvinfer1::PluginField> const& fields,
                                                      nvinfer1::PluginFieldCollection* collection) {
  collection->nbFields = static_cast<int32_t>(fields.size());
  collection->fields = fields.data();
  return collection;
}

template <class Derived, class Params>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  static constexpr int32_t kNbOutputs = 3;  // scores, boxes, classes

  explicit PluginBase(Params params) : params_(std::move(params)) {}
  PluginBase(PluginBase const&) = delete;
  PluginBase& operator=(PluginBase const&) = delete;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE:
        return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD:
        return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME:
        return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  // A fresh instance from the fields alone: device state is rebuilt in onShapeChange.
  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      return new Derived(params_);
    } catch (...) {
      log_exception(Derived::kName);
    }
    return nullptr;
  }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return Derived::kName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return kNbOutputs; }

  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (!counts_match(nbInputs, nbOutputs) || !is_float_type(inputTypes[0])) return -1;
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = inputTypes[0];
    outputTypes[2] = nvinfer1::DataType::kINT32;
    return 0;
  }

  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                          nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override {
    if (!counts_match(nbInputs, nbOutputs) || inputs[0].nbDims != Derived::kScoresRank) return -1;
    nvinfer1::IDimensionExpr const* batch = inputs[0].d[0];
    nvinfer1::IDimensionExpr const* length = exprBuilder.constant(derived().output_length());
    outputs[0].nbDims = 2;  // scores [B, K]
    outputs[0].d[0] = batch;
    outputs[0].d[1] = length;
    outputs[1].nbDims = 3;  // boxes [B, K, V]
    outputs[1].d[0] = batch;
    outputs[1].d[1] = length;
    outputs[1].d[2] = exprBuilder.constant(Derived::kBoxValues);
    outputs[2] = outputs[0];  // classes [B, K]
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (!counts_match(nbInputs, nbOutputs) || pos < 0 || pos >= Derived::kNbInputs + kNbOutputs) return false;
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
    if (pos == 0) return is_float_type(desc.type);
    if (pos == Derived::kNbInputs + 2 || (pos < Derived::kNbInputs && Derived::is_int_input(pos))) {
      return desc.type == nvinfer1::DataType::kINT32;  // classes
    }
    return desc.type == inOut[0].desc.type;  // every other float tensor: the scores' type
  }

  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override {
    try {
      typename Derived::Args args;
      if (!counts_match(nbInputs, nbOutputs)) return -1;
      if (!args_for(in, &args)) return shape_error();
      return 0;
    } catch (...) {
      log_exception(Derived::kName);
    }
    return -1;
  }

  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                          int32_t nbOutputs) const noexcept override {
    typename Derived::Args args;
    if (!counts_match(nbInputs, nbOutputs) || !args_for(inputs, &args)) return 0;
    return Derived::workspace_size(args);  // at the profile's largest batch: enough for every smaller one
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                        nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override {
    try {
      typename Derived::Args args;
      if (!counts_match(nbInputs, nbOutputs) || !args_for(in, &args)) return shape_error();
      return derived().prepare();
    } catch (...) {
      log_exception(Derived::kName);
    }
    return -1;
  }

  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* /*outputDesc*/,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override {
    try {
      typename Derived::Args args;
      DType dtype;
      if (!derived().ready() || !args_for(inputDesc, &args) || !to_kernel_dtype(inputDesc[0].type, &dtype)) {
        log_error(std::string(Derived::kName) + ": enqueue before onShapeChange or with unsupported inputs");
        return -1;
      }
      cudaError_t const err = derived().run(args, dtype, inputs, outputs, workspace, stream);
      if (err != cudaSuccess) {
        log_error(std::string(Derived::kName) + ": " + cudaGetErrorString(err));
        return -1;
      }
      return 0;
    } catch (...) {
      log_exception(Derived::kName);
    }
    return -1;
  }

  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
    return clone();
  }

  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    try {
      serialized_.clear();
      for (FieldRef const& ref : params_.fields()) serialized_.push_back(ref.describe(true));
      return collect(serialized_, &serialized_collection_);
    } catch (...) {
      log_exception(Derived::kName);
    }
    return nullptr;
  }

 protected:
  // Defaults for plugins with nothing to set up per shape.
  int32_t prepare() { return 0; }
  bool ready() const { return true; }

  Params params_;

 private:
  static bool counts_match(int32_t nbInputs, int32_t nbOutputs) {
    return nbInputs == Derived::kNbInputs && nbOutputs == kNbOutputs;
  }
  static int32_t shape_error() {
    log_error(std::string(Derived::kName) + ": inputs must be " + Derived::kInputs);
    return -1;
  }
  // Kernel arguments from the build-time (profile maximum) or the runtime input shapes.
  static nvinfer1::Dims shape_of(nvinfer1::DynamicPluginTensorDesc const& desc) { return desc.max; }
  static nvinfer1::Dims shape_of(nvinfer1::PluginTensorDesc const& desc) { return desc.dims; }
  template <class Desc, class Args>
  bool args_for(Desc const* in, Args* args) const {
    nvinfer1::Dims dims[Derived::kNbInputs];
    for (int32_t i = 0; i < Derived::kNbInputs; ++i) dims[i] = shape_of(in[i]);
    return derived().make_args(dims, args);
  }

  Derived& derived() { return static_cast<Derived&>(*this); }
  Derived const& derived() const { return static_cast<Derived const&>(*this); }

  std::vector<nvinfer1::PluginField> serialized_;
  nvinfer1::PluginFieldCollection serialized_collection_{};
};

// The creator: advertises Params' fields, and builds a plugin once every required field
// is present, every field present has the right type and Params::check() passes (else
// logs why, returns null).
// Its constructor allocates: getCreators() builds the creators inside a try block.
template <class Plugin, class Params>
class PluginCreatorBase : public nvinfer1::IPluginCreatorV3One {
 public:
  PluginCreatorBase() {
    Params defaults;
    for (FieldRef const& ref : defaults.fields()) names_.push_back(ref.describe(false));
  }

  nvinfer1::IPluginV3* createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase /*phase*/) noexcept override {
    try {
      if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr)) return nullptr;
      Params params;
      std::vector<FieldRef> const refs = params.fields();
      std::vector<bool> seen(refs.size(), false);
      for (int32_t i = 0; i < fc->nbFields; ++i) {
        nvinfer1::PluginField const& f = fc->fields[i];
        // Fields with other names (attributes the ONNX parser passes through) are not ours.
        for (size_t k = 0; k < refs.size(); ++k) {
          if (!field_is(f, refs[k].name)) continue;
          if (!refs[k].read(f)) {
            log_error(std::string(Plugin::kName) + ": field " + refs[k].name + " has the wrong type or length");
            return nullptr;
          }
          seen[k] = true;
        }
      }
      std::string problem;
      for (size_t k = 0; k < refs.size(); ++k) {
        if (!seen[k] && refs[k].required)
          problem += (problem.empty() ? "needs field " : ", ") + std::string(refs[k].name);
      }
      if (problem.empty()) problem = params.check();
      if (!problem.empty()) {
        log_error(std::string(Plugin::kName) + ": " + problem);
        return nullptr;
      }
      return new Plugin(std::move(params));
    } catch (...) {
      log_exception(Plugin::kName);
    }
    return nullptr;
  }

  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override {
    return collect(names_, &names_collection_);
  }
  char const* getPluginName() const noexcept override { return Plugin::kName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<nvinfer1::PluginField> names_;
  nvinfer1::PluginFieldCollection names_collection_{};
};

}  // namespace plugins
}  // namespace retinanet
