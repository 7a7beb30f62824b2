// Stand-ins for the TensorRT and CUDA runtime entry points that extras/cppapi/infer.cpp calls, so that
// tests/test_cppapi.py can link and run infer's option and image checks with the headers only (no
// TensorRT library is installed on this project's machines). The runtime factory returns null, so infer
// stops with "cannot create the TensorRT runtime" once those checks pass; the CUDA functions come after
// it and are never reached (they fail if they are). The headers are included so that each signature
// must match its declaration.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include <NvInferRuntime.h>

extern "C" void* createInferRuntime_INTERNAL(void*, int32_t) noexcept { return nullptr; }

cudaError_t cudaMalloc(void**, size_t) { return cudaErrorNotSupported; }
cudaError_t cudaFree(void*) { return cudaErrorNotSupported; }
cudaError_t cudaMemcpy(void*, void const*, size_t, cudaMemcpyKind) { return cudaErrorNotSupported; }
cudaError_t cudaStreamCreate(cudaStream_t*) { return cudaErrorNotSupported; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaErrorNotSupported; }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaErrorNotSupported; }
