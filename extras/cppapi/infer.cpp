// infer: run an engine on one image and print the detections with the time per run; with --draw,
// also write the image with the detections drawn on it.
//
//   infer ENGINE.plan IMAGE.ppm --plugins libretinanet_plugins.so [--runs N] [--draw OUT.ppm]
//         [--draw-threshold S]
//
// The image is a binary PPM (P6, 8-bit RGB) so the program needs no image library; convert others
// first (e.g. `convert img.jpg img.ppm`). It is placed at the top left of the engine's input and the
// rest is filled with the model's mean colour (the ONNX model normalises pixels itself). Boxes are
// printed in the input's pixels, classes as the model's contiguous class indices. Engines of models
// that take image sizes (GroupNorm heads; converted torchvision models, which clip to the image) have
// a second input, image_sizes int32 [batch, 2]: the image's (height, width) in the input, so that the
// padding is ignored.
//
// --draw OUT.ppm writes the input image with each detection of score >= S (--draw-threshold, default
// 0.3) drawn: an outline in its class's colour and a "CLASS SCORE" label (draw.h). Since the image
// sits at the input's top left at its own size, the input's pixels are the image's: boxes are drawn
// as printed, clipped to the image. Every detection is still printed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include <NvInferRuntime.h>

#include "common.h"
#include "draw.h"

using retinanet_cpp::Detection;
using retinanet_cpp::Image;
using retinanet_cpp::Logger;
using retinanet_cpp::Unique;

namespace {

char const* const kUsage =
    "usage: infer ENGINE.plan IMAGE.ppm --plugins LIB.so [--runs N] [--draw OUT.ppm] [--draw-threshold S]\n";
char const* const kInputName = "images";
char const* const kSizesName = "image_sizes";

struct Options {
  std::string engine, image, plugins, draw;  // draw: empty for no drawing
  int runs = 10;
  float draw_threshold = retinanet_cpp::kDefaultDrawThreshold;
};

// A whole number or a finite float with nothing after it: atoi/atof would take "1O" as 1 silently.
bool parse_number(char const* text, int* out) {
  char* end = nullptr;
  long const v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < 0 || v > 1000000) return false;
  *out = static_cast<int>(v);
  return true;
}

bool parse_number(char const* text, float* out) {
  char* end = nullptr;
  *out = std::strtof(text, &end);
  return end != text && *end == '\0' && std::isfinite(*out);
}

// Options after the two paths, in any order; an error message, or empty when they parse.
std::string parse_options(int argc, char** argv, Options* o) {
  if (argc < 3) return "needs ENGINE.plan and IMAGE.ppm";
  o->engine = argv[1];
  o->image = argv[2];
  for (int i = 3; i < argc; i += 2) {
    std::string const flag = argv[i];
    if (i + 1 >= argc) return flag + " needs a value";
    char const* value = argv[i + 1];
    if (flag == "--plugins") {
      o->plugins = value;
    } else if (flag == "--draw") {
      o->draw = value;
    } else if (flag == "--runs") {
      if (!parse_number(value, &o->runs)) return "--runs wants a whole number >= 0, not " + std::string(value);
    } else if (flag == "--draw-threshold") {
      if (!parse_number(value, &o->draw_threshold)) return "--draw-threshold wants a number, not " + std::string(value);
    } else {
      return "unknown argument " + flag;
    }
  }
  return o->plugins.empty() ? "needs --plugins LIB.so" : "";
}

size_t volume(nvinfer1::Dims const& d) {
  size_t n = 1;
  for (int i = 0; i < d.nbDims; ++i) n *= static_cast<size_t>(d.d[i]);
  return n;
}

// The engine's input: the image at the top left, the mean colour elsewhere (normalised to 0 inside).
std::vector<float> input_tensor(Image const& image, int64_t H, int64_t W) {
  std::vector<float> input(static_cast<size_t>(3 * H * W));
  float const mean[3] = {123.675f, 116.28f, 103.53f};
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        input[(c * H + y) * W + x] =
            (y < image.height && x < image.width) ? image.rgb[(y * image.width + x) * 3 + c] : mean[c];
  return input;
}

// Device buffers for every I/O tensor, the inputs copied in; freed with the object.
struct Buffers {
  std::vector<void*> all;
  void* scores = nullptr;
  void* boxes = nullptr;
  void* classes = nullptr;
  int64_t slots = 0;  // detections per image: the outputs' second dimension
  Buffers() = default;
  Buffers(Buffers const&) = delete;  // one owner frees the device memory
  Buffers& operator=(Buffers const&) = delete;
  ~Buffers() {
    for (void* p : all) cudaFree(p);
  }
};

void bind(nvinfer1::ICudaEngine const& engine, nvinfer1::IExecutionContext* context, std::vector<float> const& input,
          int32_t const (&image_sizes)[2], Buffers* buffers) {
  for (int32_t i = 0; i < engine.getNbIOTensors(); ++i) {
    char const* name = engine.getIOTensorName(i);
    nvinfer1::Dims const d = context->getTensorShape(name);
    size_t const bytes = volume(d) * 4;  // float32 / int32 I/O
    void* p = nullptr;
    cudaMalloc(&p, bytes);
    buffers->all.push_back(p);
    context->setTensorAddress(name, p);
    if (!std::strcmp(name, kInputName)) cudaMemcpy(p, input.data(), bytes, cudaMemcpyHostToDevice);
    if (!std::strcmp(name, kSizesName)) cudaMemcpy(p, image_sizes, sizeof(image_sizes), cudaMemcpyHostToDevice);
    if (!std::strcmp(name, "scores")) {
      buffers->scores = p;
      buffers->slots = d.d[1];
    }
    if (!std::strcmp(name, "boxes")) buffers->boxes = p;
    if (!std::strcmp(name, "classes")) buffers->classes = p;
  }
}

// Milliseconds per run, after one warm-up run.
double time_runs(nvinfer1::IExecutionContext* context, int runs) {
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  context->enqueueV3(stream);
  cudaStreamSynchronize(stream);
  auto const start = std::chrono::steady_clock::now();
  for (int r = 0; r < runs; ++r) context->enqueueV3(stream);
  cudaStreamSynchronize(stream);
  double const ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
                    (runs > 0 ? runs : 1);
  cudaStreamDestroy(stream);
  return ms;
}

// The slots before the first of score 0 (the outputs are sorted by score; the padding has score 0).
std::vector<Detection> read_detections(Buffers const& buffers) {
  size_t const n = static_cast<size_t>(buffers.slots);
  std::vector<float> s(n), b(n * 4);
  std::vector<int32_t> c(n);
  cudaMemcpy(s.data(), buffers.scores, s.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(b.data(), buffers.boxes, b.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(c.data(), buffers.classes, c.size() * 4, cudaMemcpyDeviceToHost);
  std::vector<Detection> out;
  for (size_t i = 0; i < n && s[i] > 0.f; ++i)
    out.push_back({b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3], c[i], s[i]});
  return out;
}

Unique<nvinfer1::ICudaEngine> load_engine(nvinfer1::IRuntime* runtime, Options const& o) {
  if (runtime->getPluginRegistry().loadLibrary(o.plugins.c_str()) == nullptr) {
    std::cerr << "infer: cannot load the plugin library " << o.plugins << "\n";
    return nullptr;
  }
  std::ifstream plan_file(o.engine, std::ios::binary);
  std::vector<char> plan((std::istreambuf_iterator<char>(plan_file)), std::istreambuf_iterator<char>());
  Unique<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) std::cerr << "infer: " << o.engine << " does not deserialise (another TensorRT version or GPU?)\n";
  return engine;
}

// Runs the engine on the image; false (with a message) when the image does not fit its input.
bool run(nvinfer1::ICudaEngine& engine, Image const& image, int runs, std::vector<Detection>* found, double* ms) {
  Unique<nvinfer1::IExecutionContext> context(engine.createExecutionContext());
  bool has_sizes = false;
  for (int32_t i = 0; i < engine.getNbIOTensors(); ++i) {
    has_sizes = has_sizes || !std::strcmp(engine.getIOTensorName(i), kSizesName);
  }
  nvinfer1::Dims in_dims = engine.getTensorShape(kInputName);  // [-1, 3, H, W]
  in_dims.d[0] = 1;
  int64_t const H = in_dims.d[2], W = in_dims.d[3];
  if (image.height > H || image.width > W) {
    std::cerr << "infer: image " << image.width << "x" << image.height << " is larger than the engine input " << W
              << "x" << H << "\n";
    return false;
  }
  context->setInputShape(kInputName, in_dims);
  // The image is used at its own size, so its valid region is all of it.
  int32_t const image_sizes[2] = {image.height, image.width};
  if (has_sizes) context->setInputShape(kSizesName, nvinfer1::Dims2{1, 2});
  Buffers buffers;
  bind(engine, context.get(), input_tensor(image, H, W), image_sizes, &buffers);
  *ms = time_runs(context.get(), runs);
  *found = read_detections(buffers);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  std::string const error = parse_options(argc, argv, &o);
  if (!error.empty()) {
    std::cerr << "infer: " << error << "\n" << kUsage;
    return 2;
  }
  Image image;
  if (!retinanet_cpp::read_ppm(o.image, &image)) {
    std::cerr << "infer: " << o.image << " is not a binary 8-bit PPM\n";
    return 1;
  }
  Logger logger;
  Unique<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime) {
    std::cerr << "infer: cannot create the TensorRT runtime\n";
    return 1;
  }
  Unique<nvinfer1::ICudaEngine> engine = load_engine(runtime.get(), o);
  std::vector<Detection> found;
  double ms = 0;
  if (!engine || !run(*engine, image, o.runs, &found, &ms)) return 1;
  for (Detection const& d : found) {
    std::cout << "class " << d.cls << " score " << d.score << " box " << d.x1 << " " << d.y1 << " " << d.x2 << " "
              << d.y2 << "\n";
  }
  std::cout << "inference: " << ms << " ms per image (" << o.runs << " runs)\n";
  if (o.draw.empty()) return 0;
  retinanet_cpp::draw_detections(&image, found, o.draw_threshold);
  if (!retinanet_cpp::write_ppm(o.draw, image)) {
    std::cerr << "infer: cannot write " << o.draw << "\n";
    return 1;
  }
  auto const drawn =
      std::count_if(found.begin(), found.end(), [&o](Detection const& d) { return d.score >= o.draw_threshold; });
  std::cout << "drawn: " << drawn << " of " << found.size() << " detections (score >= " << o.draw_threshold << ") on "
            << o.draw << "\n";
  return 0;
}
