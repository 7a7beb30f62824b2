// Plugin harness: drives RetinaNetDecode / RetinaNetNMS and their rotated forms
// (RetinaNetDecodeRotated / RetinaNetNMSRotated) through TensorRT's plugin interfaces
// the way the builder and runtime do, with no TensorRT library.
//
//   plugin_harness CASE_DIR OUT_DIR
//
// CASE_DIR/cases.txt has one case per line:
//   NAME decode         f32|f16 B A C H W stride score_threshold top_n box_clamp [box_offset]
//   NAME nms            f32|f16 B N nms_iou detections [box_offset]
//   NAME decode_rotated f32|f16 B A C H W stride score_threshold top_n box_clamp
//   NAME nms_rotated    f32|f16 B N nms_iou detections
// box_offset is an optional field of the axis-aligned plugins: a line without it creates
// the plugin without the field, as from an ONNX file or engine written before the field
// existed. The rotated plugins have no such field.
// Inputs are raw little-endian files CASE_DIR/NAME.<tensor>.bin (decode: scores,
// deltas in the case's type, anchors f32; nms: scores, boxes in the case's type,
// classes i32). Outputs go to OUT_DIR/NAME.{scores,boxes,classes}.bin.
// Per case: creator lookup via getCreators(), createPlugin from PluginFields (each
// required field missing: refused; box_offset missing: 0; box_offset bad: refused),
// interface checks (getNbOutputs, getOutputDataTypes, getOutputShapes through a
// stand-in expression builder, supportsFormatCombination, configurePlugin,
// getWorkspaceSize), getFieldsToSerialize -> createPlugin(kRUNTIME) with the
// fields compared, attachToContext, onShapeChange, enqueue on device buffers.
// tests/plugins/compare.py writes the cases and checks the outputs against
// retinanet.ops.reference. Exit status 0 only if every check passed.
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include <NvInferRuntime.h>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

int failures = 0;

void check(bool ok, std::string const& what) {
  if (!ok) {
    ++failures;
    std::cout << "  FAIL " << what << "\n";
  }
}

// ---------------------------------------------------------------- a stand-in IExprBuilder (constants only)

class ConstantImpl : public nvinfer1::apiv::VDimensionExpr {
 public:
  explicit ConstantImpl(int64_t v) : value_(v) {}
  bool isConstant() const override { return value_ >= 0; }
  int64_t getConstantValue() const override { return value_; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t value_;
};

class Dimension : public nvinfer1::IDimensionExpr {
 public:
  explicit Dimension(int64_t v) : impl_(v) { mImpl = &impl_; }
  ~Dimension() noexcept override = default;

 private:
  ConstantImpl impl_;
};

class BuilderImpl : public nvinfer1::apiv::VExprBuilder {
 public:
  nvinfer1::IDimensionExpr const* constant(int64_t value) override {
    dims_.push_back(std::make_unique<Dimension>(value));
    return dims_.back().get();
  }
  nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation, nvinfer1::IDimensionExpr const&,
                                            nvinfer1::IDimensionExpr const&) override {
    return constant(-1);  // the plugins build no expressions
  }
  nvinfer1::IDimensionExpr const* declareSizeTensor(int32_t, nvinfer1::IDimensionExpr const&,
                                                    nvinfer1::IDimensionExpr const&) override {
    return constant(-1);
  }

 private:
  std::vector<std::unique_ptr<Dimension>> dims_;
};

class ExprBuilder : public nvinfer1::IExprBuilder {
 public:
  ExprBuilder() { mImpl = &impl_; }
  ~ExprBuilder() noexcept override = default;

 private:
  BuilderImpl impl_;
};

// ---------------------------------------------------------------- helpers

nvinfer1::Dims dims(std::vector<int64_t> const& v) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

nvinfer1::DynamicPluginTensorDesc dyn(std::vector<int64_t> const& shape, DataType t, int64_t min_batch,
                                      nvinfer1::TensorFormat f = nvinfer1::TensorFormat::kLINEAR) {
  nvinfer1::DynamicPluginTensorDesc d{};
  std::vector<int64_t> s = shape, lo = shape;
  s[0] = -1;
  lo[0] = min_batch;
  d.desc.dims = dims(s);
  d.desc.type = t;
  d.desc.format = f;
  d.desc.scale = 1.f;
  d.min = dims(lo);
  d.opt = dims(shape);
  d.max = dims(shape);
  return d;
}

nvinfer1::PluginTensorDesc desc(std::vector<int64_t> const& shape, DataType t) {
  nvinfer1::PluginTensorDesc d{};
  d.dims = dims(shape);
  d.type = t;
  d.format = nvinfer1::TensorFormat::kLINEAR;
  d.scale = 1.f;
  return d;
}

size_t element_size(DataType t) { return t == DataType::kHALF ? 2 : 4; }

size_t volume(std::vector<int64_t> const& s) {
  size_t n = 1;
  for (int64_t v : s) n *= static_cast<size_t>(v);
  return n;
}

std::vector<char> read_file(std::string const& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(std::string const& path, std::vector<char> const& data) {
  std::ofstream f(path, std::ios::binary);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

#define CUDA_OK(call)                                                                                  \
  do {                                                                                                 \
    cudaError_t e_ = (call);                                                                           \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#call ": ") + cudaGetErrorString(e_)); \
  } while (0)

nvinfer1::IPluginCreatorV3One* find_creator(char const* name) {
  int32_t n = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = getCreators(n);
  for (int32_t i = 0; i < n; ++i) {
    nvinfer1::InterfaceInfo const info = creators[i]->getInterfaceInfo();
    if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
    auto* c = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
    if (std::strcmp(c->getPluginName(), name) == 0 && std::strcmp(c->getPluginVersion(), "1") == 0 &&
        std::strcmp(c->getPluginNamespace(), "") == 0) {
      return c;
    }
  }
  return nullptr;
}

// Fields as comparable bytes: name, type, length, data.
std::string field_bytes(nvinfer1::PluginFieldCollection const* fc) {
  std::string s;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    size_t const size = f.type == PluginFieldType::kFLOAT32 || f.type == PluginFieldType::kINT32 ? 4 : 0;
    s += std::string(f.name) + ":" + std::to_string(static_cast<int>(f.type)) + ":" + std::to_string(f.length) + ":";
    s += std::string(static_cast<char const*>(f.data), size * static_cast<size_t>(f.length));
  }
  return s;
}

struct Tensor {
  std::vector<int64_t> shape;
  DataType type;
};

// Fields added to plugin version "1" after it shipped: createPlugin must take files without them.
char const* const kOptionalField = "box_offset";

using PluginPtr = std::unique_ptr<nvinfer1::IPluginV3>;

PluginPtr create(nvinfer1::IPluginCreatorV3One* creator, char const* plugin, std::vector<PluginField> const& fields,
                 nvinfer1::TensorRTPhase phase = nvinfer1::TensorRTPhase::kBUILD) {
  nvinfer1::PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
  return PluginPtr(creator->createPlugin(plugin, &fc, phase));
}

std::vector<PluginField> without(std::vector<PluginField> const& fields, std::string const& name) {
  std::vector<PluginField> out;
  for (PluginField const& f : fields) {
    if (name != f.name) out.push_back(f);
  }
  return out;
}

nvinfer1::IPluginV3OneRuntime* runtime_of(nvinfer1::IPluginV3* plugin) {
  return static_cast<nvinfer1::IPluginV3OneRuntime*>(
      plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
}

// The serialised single float field `name`; NaN when it is not there as one kFLOAT32.
float serialized_float(nvinfer1::IPluginV3* plugin, char const* name) {
  nvinfer1::PluginFieldCollection const* fc = runtime_of(plugin)->getFieldsToSerialize();
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (std::strcmp(f.name, name) == 0 && f.type == PluginFieldType::kFLOAT32 && f.length == 1) {
      return *static_cast<float const*>(f.data);
    }
  }
  return std::nanf("");
}

// The creator's fields: their names in order, each required one refused when missing; the
// optional one (if the plugin has it) taken when absent (as 0, serialised like the others)
// and refused when bad.
void check_fields(nvinfer1::IPluginCreatorV3One* creator, char const* plugin, std::vector<PluginField> const& fields,
                  std::vector<std::string> const& expected_fields, bool has_optional) {
  nvinfer1::PluginFieldCollection const* names = creator->getFieldNames();
  check(names->nbFields == static_cast<int32_t>(expected_fields.size()), "getFieldNames count");
  for (int32_t i = 0; i < names->nbFields && i < static_cast<int32_t>(expected_fields.size()); ++i) {
    check(expected_fields[i] == names->fields[i].name, "field name " + expected_fields[i]);
  }
  for (std::string const& name : expected_fields) {
    if (name == kOptionalField) continue;
    check(create(creator, plugin, without(fields, name)) == nullptr, "createPlugin refuses missing field " + name);
  }
  if (!has_optional) {
    PluginPtr const plain = create(creator, plugin, fields);
    check(plain != nullptr && std::isnan(serialized_float(plain.get(), kOptionalField)),
          std::string("no ") + kOptionalField + " field serialised");
    return;
  }
  std::vector<PluginField> const legacy = without(fields, kOptionalField);
  PluginPtr const plain = create(creator, plugin, legacy);
  check(plain != nullptr, std::string("createPlugin without the optional ") + kOptionalField);
  if (plain) check(serialized_float(plain.get(), kOptionalField) == 0.f, "an absent box_offset serialises as 0");
  for (float bad : {-1.f, std::nanf(""), INFINITY}) {
    std::vector<PluginField> with_bad = legacy;
    with_bad.emplace_back(kOptionalField, &bad, PluginFieldType::kFLOAT32, 1);
    check(create(creator, plugin, with_bad) == nullptr, "createPlugin refuses box_offset " + std::to_string(bad));
  }
}

// Output types and shapes: the scores' type, batch passed through, the rest constants.
void check_outputs(nvinfer1::IPluginV3OneBuild* build, std::vector<Tensor> const& ins,
                   std::vector<Tensor> const& outs) {
  int32_t const nin = static_cast<int32_t>(ins.size()), nout = static_cast<int32_t>(outs.size());
  check(build->getNbOutputs() == nout, "getNbOutputs");
  std::vector<DataType> in_types, out_types(nout);
  for (auto const& t : ins) in_types.push_back(t.type);
  check(build->getOutputDataTypes(out_types.data(), nout, in_types.data(), nin) == 0, "getOutputDataTypes");
  for (int32_t i = 0; i < nout; ++i) check(out_types[i] == outs[i].type, "output type " + std::to_string(i));
  std::vector<DataType> int_types(in_types.size(), DataType::kINT32);
  check(build->getOutputDataTypes(out_types.data(), nout, int_types.data(), nin) != 0,
        "getOutputDataTypes refuses INT32 scores");

  ExprBuilder exprs;
  std::vector<std::unique_ptr<Dimension>> in_dims;
  std::vector<nvinfer1::DimsExprs> in_exprs(nin), out_exprs(nout);
  for (int32_t i = 0; i < nin; ++i) {
    in_exprs[i].nbDims = static_cast<int32_t>(ins[i].shape.size());
    for (size_t k = 0; k < ins[i].shape.size(); ++k) {
      in_dims.push_back(std::make_unique<Dimension>(k == 0 ? -1 : ins[i].shape[k]));
      in_exprs[i].d[k] = in_dims.back().get();
    }
  }
  check(build->getOutputShapes(in_exprs.data(), nin, nullptr, 0, out_exprs.data(), nout, exprs) == 0,
        "getOutputShapes");
  for (int32_t i = 0; i < nout; ++i) {
    bool ok =
        out_exprs[i].nbDims == static_cast<int32_t>(outs[i].shape.size()) && out_exprs[i].d[0] == in_exprs[0].d[0];
    for (size_t k = 1; ok && k < outs[i].shape.size(); ++k) {
      ok = out_exprs[i].d[k]->isConstant() && out_exprs[i].d[k]->getConstantValue() == outs[i].shape[k];
    }
    check(ok, "output shape " + std::to_string(i));
  }
}

// Format combinations: the case's types pass; INT32 scores, mixed types and non-linear formats
// do not. Then configurePlugin and the workspace; returns the workspace size.
size_t check_formats(nvinfer1::IPluginV3OneBuild* build, std::vector<Tensor> const& ins,
                     std::vector<Tensor> const& outs) {
  int32_t const nin = static_cast<int32_t>(ins.size()), nout = static_cast<int32_t>(outs.size());
  int64_t const batch = ins[0].shape[0];
  std::vector<nvinfer1::DynamicPluginTensorDesc> io;
  for (auto const& t : ins) io.push_back(dyn(t.shape, t.type, 1));
  for (auto const& t : outs) io.push_back(dyn(t.shape, t.type, 1));
  for (int32_t pos = 0; pos < nin + nout; ++pos) {
    check(build->supportsFormatCombination(pos, io.data(), nin, nout),
          "supportsFormatCombination pos " + std::to_string(pos));
  }
  for (DataType other : {DataType::kFLOAT, DataType::kHALF}) {
    auto alt = io;
    for (size_t i = 0; i < alt.size(); ++i) {
      if (alt[i].desc.type != DataType::kINT32) alt[i].desc.type = other;
    }
    bool all = true;
    for (int32_t pos = 0; pos < nin + nout; ++pos)
      all = all && build->supportsFormatCombination(pos, alt.data(), nin, nout);
    check(all, "supportsFormatCombination accepts FP32 and FP16 I/O");
  }
  {
    auto alt = io;
    alt[0].desc.type = DataType::kINT32;
    check(!build->supportsFormatCombination(0, alt.data(), nin, nout), "refuses INT32 scores");
    alt = io;
    alt[1].desc.type = io[0].desc.type == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
    check(!build->supportsFormatCombination(1, alt.data(), nin, nout), "refuses mixed float types");
    alt = io;
    alt[0].desc.format = nvinfer1::TensorFormat::kCHW32;
    check(!build->supportsFormatCombination(0, alt.data(), nin, nout), "refuses a non-linear format");
    alt = io;
    alt[nin + 2].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(nin + 2, alt.data(), nin, nout), "refuses float classes output");
  }
  check(build->configurePlugin(io.data(), nin, io.data() + nin, nout) == 0, "configurePlugin");
  size_t const workspace = build->getWorkspaceSize(io.data(), nin, io.data() + nin, nout);
  check(workspace > 0, "getWorkspaceSize > 0");
  if (batch > 1) {  // the size at the profile's max batch covers smaller batches
    auto smaller = io;
    for (auto& d : smaller) d.max.d[0] = batch - 1;
    check(build->getWorkspaceSize(smaller.data(), nin, smaller.data() + nin, nout) <= workspace,
          "workspace grows with batch");
  }
  return workspace;
}

// onShapeChange and enqueue on device buffers; writes the outputs to OUT_PREFIX.<output>.bin.
void run_on_device(nvinfer1::IPluginV3OneRuntime* rt, std::vector<Tensor> const& ins, std::vector<Tensor> const& outs,
                   std::vector<std::vector<char>> const& host_inputs, size_t workspace, std::string const& out_prefix) {
  int32_t const nin = static_cast<int32_t>(ins.size()), nout = static_cast<int32_t>(outs.size());
  std::vector<nvinfer1::PluginTensorDesc> in_desc, out_desc;
  for (auto const& t : ins) in_desc.push_back(desc(t.shape, t.type));
  for (auto const& t : outs) out_desc.push_back(desc(t.shape, t.type));
  check(rt->onShapeChange(in_desc.data(), nin, out_desc.data(), nout) == 0, "onShapeChange");

  std::vector<void*> d_in(nin), d_out(nout);
  for (int32_t i = 0; i < nin; ++i) {
    size_t const bytes = volume(ins[i].shape) * element_size(ins[i].type);
    check(host_inputs[i].size() == bytes, "input file size " + std::to_string(i));
    if (host_inputs[i].size() != bytes) return;
    CUDA_OK(cudaMalloc(&d_in[i], bytes));
    CUDA_OK(cudaMemcpy(d_in[i], host_inputs[i].data(), bytes, cudaMemcpyHostToDevice));
  }
  for (int32_t i = 0; i < nout; ++i) {
    size_t const bytes = volume(outs[i].shape) * element_size(outs[i].type);
    CUDA_OK(cudaMalloc(&d_out[i], bytes));
    CUDA_OK(cudaMemset(d_out[i], 0x7f, bytes));  // garbage: the plugin must write every slot
  }
  void* d_workspace = nullptr;
  CUDA_OK(cudaMalloc(&d_workspace, workspace));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  check(rt->enqueue(in_desc.data(), out_desc.data(), d_in.data(), d_out.data(), d_workspace, stream) == 0, "enqueue");
  CUDA_OK(cudaStreamSynchronize(stream));
  static char const* const out_names[] = {"scores", "boxes", "classes"};
  for (int32_t i = 0; i < nout; ++i) {
    std::vector<char> host(volume(outs[i].shape) * element_size(outs[i].type));
    CUDA_OK(cudaMemcpy(host.data(), d_out[i], host.size(), cudaMemcpyDeviceToHost));
    write_file(out_prefix + "." + out_names[i] + ".bin", host);
  }
  for (void* p : d_in) cudaFree(p);
  for (void* p : d_out) cudaFree(p);
  cudaFree(d_workspace);
  cudaStreamDestroy(stream);
}

// Runs one plugin case end to end. `expected_fields` are the creator's field names in order;
// `box_offset` is the value the case's fields give (0 when they leave it out), NaN for the
// rotated plugins, which have no such field.
void run_case(std::string const& name, char const* plugin, std::vector<PluginField> const& fields,
              std::vector<std::string> const& expected_fields, float box_offset, std::vector<Tensor> const& ins,
              std::vector<Tensor> const& outs, std::vector<std::vector<char>> const& host_inputs,
              std::string const& out_prefix) {
  nvinfer1::IPluginCreatorV3One* creator = find_creator(plugin);
  check(creator != nullptr, std::string("creator ") + plugin + " from getCreators()");
  if (creator == nullptr) return;
  bool const has_optional = !std::isnan(box_offset);
  check_fields(creator, plugin, fields, expected_fields, has_optional);

  PluginPtr const built = create(creator, plugin, fields);
  check(built != nullptr, "createPlugin(kBUILD)");
  if (!built) return;
  if (has_optional) check(serialized_float(built.get(), kOptionalField) == box_offset, "box_offset field as given");
  auto* core =
      static_cast<nvinfer1::IPluginV3OneCore*>(built->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
  auto* build =
      static_cast<nvinfer1::IPluginV3OneBuild*>(built->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  auto* runtime = runtime_of(built.get());
  check(std::strcmp(core->getPluginName(), plugin) == 0 && std::strcmp(core->getPluginVersion(), "1") == 0,
        "core name/version");
  check(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build capability kind");
  check(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0, "runtime capability kind");
  check_outputs(build, ins, outs);
  size_t const workspace = check_formats(build, ins, outs);

  // Serialise and recreate, as an engine does when it is deserialised.
  std::string const serialized = field_bytes(runtime->getFieldsToSerialize());
  PluginPtr const restored(
      creator->createPlugin(plugin, runtime->getFieldsToSerialize(), nvinfer1::TensorRTPhase::kRUNTIME));
  check(restored != nullptr, "createPlugin(kRUNTIME) from getFieldsToSerialize");
  if (!restored) return;
  check(field_bytes(runtime_of(restored.get())->getFieldsToSerialize()) == serialized, "serialised fields round-trip");
  PluginPtr const context_plugin(runtime_of(restored.get())->attachToContext(nullptr));
  check(context_plugin != nullptr, "attachToContext");
  if (!context_plugin) return;
  run_on_device(runtime_of(context_plugin.get()), ins, outs, host_inputs, workspace, out_prefix);
  std::cout << "  " << name << ": workspace " << workspace << " bytes\n";
}

DataType parse_type(std::string const& s) {
  if (s == "f32") return DataType::kFLOAT;
  if (s == "f16") return DataType::kHALF;
  throw std::runtime_error("unknown type " + s);
}

// The case line's optional last value: box_offset, passed as a field when the line has
// it; lines without it stand for files written before the field existed.
void read_box_offset(std::istringstream& in, float* offset, std::vector<PluginField>* fields) {
  *offset = 0.f;
  float value;
  if (!(in >> value)) return;
  *offset = value;
  fields->emplace_back(kOptionalField, offset, PluginFieldType::kFLOAT32, 1);
}

void decode_case(std::istringstream& in, std::string const& name, DataType t, std::string const& prefix,
                 std::string const& out_dir) {
  int64_t b, a, c, h, w;
  int32_t stride, top_n;
  float threshold, clamp, offset;
  in >> b >> a >> c >> h >> w >> stride >> threshold >> top_n >> clamp;
  std::vector<char> anchors = read_file(prefix + ".anchors.bin");
  std::vector<PluginField> fields = {
      PluginField("score_threshold", &threshold, PluginFieldType::kFLOAT32, 1),
      PluginField("top_n", &top_n, PluginFieldType::kINT32, 1),
      PluginField("box_clamp", &clamp, PluginFieldType::kFLOAT32, 1),
      PluginField("stride", &stride, PluginFieldType::kINT32, 1),
      PluginField("plugin_version", "1", PluginFieldType::kCHAR, 1),  // the parser may pass it: ignored
      PluginField("anchors", anchors.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(a * 4)),
  };
  read_box_offset(in, &offset, &fields);
  run_case(name, "RetinaNetDecode", fields,
           {"score_threshold", "top_n", "box_clamp", "stride", "anchors", kOptionalField}, offset,
           {{{b, a * c, h, w}, t}, {{b, a * 4, h, w}, t}},
           {{{b, top_n}, t}, {{b, top_n, 4}, t}, {{b, top_n}, DataType::kINT32}},
           {read_file(prefix + ".scores.bin"), read_file(prefix + ".deltas.bin")}, out_dir + "/" + name);
}

void nms_case(std::istringstream& in, std::string const& name, DataType t, std::string const& prefix,
              std::string const& out_dir) {
  int64_t b, n;
  float iou, offset;
  int32_t detections;
  in >> b >> n >> iou >> detections;
  std::vector<PluginField> fields = {
      PluginField("nms_iou", &iou, PluginFieldType::kFLOAT32, 1),
      PluginField("detections", &detections, PluginFieldType::kINT32, 1),
  };
  read_box_offset(in, &offset, &fields);
  run_case(name, "RetinaNetNMS", fields, {"nms_iou", "detections", kOptionalField}, offset,
           {{{b, n}, t}, {{b, n, 4}, t}, {{b, n}, DataType::kINT32}},
           {{{b, detections}, t}, {{b, detections, 4}, t}, {{b, detections}, DataType::kINT32}},
           {read_file(prefix + ".scores.bin"), read_file(prefix + ".boxes.bin"), read_file(prefix + ".classes.bin")},
           out_dir + "/" + name);
}

// The rotated plugins: 5 anchor values, 6 deltas and 5 box values; no box_offset field.
void decode_rotated_case(std::istringstream& in, std::string const& name, DataType t, std::string const& prefix,
                         std::string const& out_dir) {
  int64_t b, a, c, h, w;
  int32_t stride, top_n;
  float threshold, clamp;
  in >> b >> a >> c >> h >> w >> stride >> threshold >> top_n >> clamp;
  std::vector<char> anchors = read_file(prefix + ".anchors.bin");
  std::vector<PluginField> const fields = {
      PluginField("score_threshold", &threshold, PluginFieldType::kFLOAT32, 1),
      PluginField("top_n", &top_n, PluginFieldType::kINT32, 1),
      PluginField("box_clamp", &clamp, PluginFieldType::kFLOAT32, 1),
      PluginField("stride", &stride, PluginFieldType::kINT32, 1),
      PluginField("plugin_version", "1", PluginFieldType::kCHAR, 1),  // the parser may pass it: ignored
      PluginField("anchors", anchors.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(a * 5)),
  };
  char const* const plugin = "RetinaNetDecodeRotated";
  if (nvinfer1::IPluginCreatorV3One* creator = find_creator(plugin)) {  // a table of A*4 floats is not A*5
    std::vector<PluginField> four = without(fields, "anchors");
    four.emplace_back("anchors", anchors.data(), PluginFieldType::kFLOAT32, 4);
    check(create(creator, plugin, four) == nullptr, "createPlugin refuses 4 anchor floats");
  }
  run_case(name, plugin, fields, {"score_threshold", "top_n", "box_clamp", "stride", "anchors"}, std::nanf(""),
           {{{b, a * c, h, w}, t}, {{b, a * 6, h, w}, t}},
           {{{b, top_n}, t}, {{b, top_n, 5}, t}, {{b, top_n}, DataType::kINT32}},
           {read_file(prefix + ".scores.bin"), read_file(prefix + ".deltas.bin")}, out_dir + "/" + name);
}

void nms_rotated_case(std::istringstream& in, std::string const& name, DataType t, std::string const& prefix,
                      std::string const& out_dir) {
  int64_t b, n;
  float iou;
  int32_t detections;
  in >> b >> n >> iou >> detections;
  std::vector<PluginField> const fields = {
      PluginField("nms_iou", &iou, PluginFieldType::kFLOAT32, 1),
      PluginField("detections", &detections, PluginFieldType::kINT32, 1),
  };
  run_case(name, "RetinaNetNMSRotated", fields, {"nms_iou", "detections"}, std::nanf(""),
           {{{b, n}, t}, {{b, n, 5}, t}, {{b, n}, DataType::kINT32}},
           {{{b, detections}, t}, {{b, detections, 5}, t}, {{b, detections}, DataType::kINT32}},
           {read_file(prefix + ".scores.bin"), read_file(prefix + ".boxes.bin"), read_file(prefix + ".classes.bin")},
           out_dir + "/" + name);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: plugin_harness CASE_DIR OUT_DIR\n";
    return 2;
  }
  std::string const cases = argv[1], out_dir = argv[2];
  std::ifstream list(cases + "/cases.txt");
  if (!list) {
    std::cerr << "cannot read " << cases << "/cases.txt\n";
    return 2;
  }
  std::string line;
  int count = 0;
  try {
    while (std::getline(list, line)) {
      std::istringstream in(line);
      std::string name, kind, type_name;
      if (!(in >> name >> kind >> type_name)) continue;
      DataType const t = parse_type(type_name);
      std::string const prefix = cases + "/" + name;
      std::cout << name << " (" << kind << ", " << type_name << ")\n";
      int const failures_before = failures;
      if (kind == "decode") {
        decode_case(in, name, t, prefix, out_dir);
      } else if (kind == "nms") {
        nms_case(in, name, t, prefix, out_dir);
      } else if (kind == "decode_rotated") {
        decode_rotated_case(in, name, t, prefix, out_dir);
      } else if (kind == "nms_rotated") {
        nms_rotated_case(in, name, t, prefix, out_dir);
      } else {
        throw std::runtime_error("unknown kind " + kind);
      }
      std::cout << "  " << (failures == failures_before ? "ok" : "FAILED") << "\n";
      ++count;
    }
  } catch (std::exception const& e) {
    std::cerr << "plugin_harness: " << e.what() << "\n";
    return 1;
  }
  std::cout << count << " cases, " << failures << " failed checks\n";
  return failures == 0 && count > 0 ? 0 : 1;
}
