// Element types shared by the decode/NMS entry points and their callers.
// Plain C++: included by the torch adapter and the TensorRT plugins alike.
#pragma once

namespace retinanet {

// Values are stable: the TensorRT plugins serialise them.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

}  // namespace retinanet
