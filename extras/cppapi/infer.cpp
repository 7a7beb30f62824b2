// infer: run an engine on one image and print the detections with the time per run.
//
//   infer ENGINE.plan IMAGE.ppm --plugins libretinanet_plugins.so [--runs N]
//
// The image is a binary PPM (P6, 8-bit RGB) so the program needs no image
// library; convert others first (e.g. `convert img.jpg img.ppm`). It is placed
// at the top left of the engine's input and the rest is filled with the model's
// mean colour (the ONNX model normalises pixels itself). Boxes are printed in
// the input's pixels, classes as the model's contiguous class indices. Engines of
// models that take image sizes (GroupNorm heads; converted torchvision models,
// which clip to the image) have a second input, image_sizes int32 [batch, 2]:
// the image's (height, width) in the input, so that the padding is ignored.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include <NvInferRuntime.h>

#include "common.h"

using retinanet_cpp::Logger;
using retinanet_cpp::Unique;

namespace {

bool read_ppm(std::string const& path, int* width, int* height, std::vector<unsigned char>* rgb) {
  std::ifstream f(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  if (!(f >> magic >> *width >> *height >> maxval) || magic != "P6" || maxval != 255) return false;
  f.get();
  rgb->resize(static_cast<size_t>(*width) * static_cast<size_t>(*height) * 3);
  return static_cast<bool>(f.read(reinterpret_cast<char*>(rgb->data()), static_cast<std::streamsize>(rgb->size())));
}

size_t volume(nvinfer1::Dims const& d) {
  size_t n = 1;
  for (int i = 0; i < d.nbDims; ++i) n *= static_cast<size_t>(d.d[i]);
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || std::strcmp(argv[3], "--plugins") != 0) {
    std::cerr << "usage: infer ENGINE.plan IMAGE.ppm --plugins LIB.so [--runs N]\n";
    return 2;
  }
  int runs = argc >= 7 && !std::strcmp(argv[5], "--runs") ? std::atoi(argv[6]) : 10;
  Logger logger;
  Unique<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime || runtime->getPluginRegistry().loadLibrary(argv[4]) == nullptr) {
    std::cerr << "infer: cannot load the plugin library " << argv[4] << "\n";
    return 1;
  }
  std::ifstream plan_file(argv[1], std::ios::binary);
  std::vector<char> plan((std::istreambuf_iterator<char>(plan_file)), std::istreambuf_iterator<char>());
  Unique<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) {
    std::cerr << "infer: " << argv[1] << " does not deserialise (another TensorRT version or GPU?)\n";
    return 1;
  }
  Unique<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  int width = 0, height = 0;
  std::vector<unsigned char> rgb;
  if (!read_ppm(argv[2], &width, &height, &rgb)) {
    std::cerr << "infer: " << argv[2] << " is not a binary 8-bit PPM\n";
    return 1;
  }
  char const* const input_name = "images";
  char const* const sizes_name = "image_sizes";
  bool has_sizes = false;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    has_sizes = has_sizes || !std::strcmp(engine->getIOTensorName(i), sizes_name);
  }
  nvinfer1::Dims in_dims = engine->getTensorShape(input_name);  // [-1, 3, H, W]
  in_dims.d[0] = 1;
  int64_t const H = in_dims.d[2], W = in_dims.d[3];
  if (height > H || width > W) {
    std::cerr << "infer: image " << width << "x" << height << " is larger than the engine input " << W << "x" << H
              << "\n";
    return 1;
  }
  context->setInputShape(input_name, in_dims);
  // The image is used at its own size, so its valid region is all of it.
  int32_t const image_sizes[2] = {height, width};
  if (has_sizes) context->setInputShape(sizes_name, nvinfer1::Dims2{1, 2});
  std::vector<float> input(volume(in_dims));
  float const mean[3] = {123.675f, 116.28f, 103.53f};
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        input[(c * H + y) * W + x] = (y < height && x < width) ? rgb[(y * width + x) * 3 + c] : mean[c];

  std::vector<void*> buffers;
  void* scores = nullptr;
  void* boxes = nullptr;
  void* classes = nullptr;
  nvinfer1::Dims out_dims{};
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    char const* name = engine->getIOTensorName(i);
    nvinfer1::Dims const d = context->getTensorShape(name);
    size_t const bytes = volume(d) * 4;  // float32 / int32 I/O
    void* p = nullptr;
    cudaMalloc(&p, bytes);
    buffers.push_back(p);
    context->setTensorAddress(name, p);
    if (!std::strcmp(name, input_name)) cudaMemcpy(p, input.data(), bytes, cudaMemcpyHostToDevice);
    if (!std::strcmp(name, sizes_name)) cudaMemcpy(p, image_sizes, sizeof(image_sizes), cudaMemcpyHostToDevice);
    if (!std::strcmp(name, "scores")) {
      scores = p;
      out_dims = d;
    }
    if (!std::strcmp(name, "boxes")) boxes = p;
    if (!std::strcmp(name, "classes")) classes = p;
  }
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  context->enqueueV3(stream);  // warm-up
  cudaStreamSynchronize(stream);
  auto const start = std::chrono::steady_clock::now();
  for (int r = 0; r < runs; ++r) context->enqueueV3(stream);
  cudaStreamSynchronize(stream);
  double const ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
                    (runs > 0 ? runs : 1);
  int64_t const D = out_dims.d[1];
  std::vector<float> s(static_cast<size_t>(D)), b(static_cast<size_t>(D) * 4);
  std::vector<int32_t> c(static_cast<size_t>(D));
  cudaMemcpy(s.data(), scores, s.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(b.data(), boxes, b.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(c.data(), classes, c.size() * 4, cudaMemcpyDeviceToHost);
  for (int64_t i = 0; i < D && s[i] > 0.f; ++i) {
    std::cout << "class " << c[i] << " score " << s[i] << " box " << b[i * 4] << " " << b[i * 4 + 1] << " "
              << b[i * 4 + 2] << " " << b[i * 4 + 3] << "\n";
  }
  std::cout << "inference: " << ms << " ms per image (" << runs << " runs)\n";
  for (void* p : buffers) cudaFree(p);
  cudaStreamDestroy(stream);
  return 0;
}
