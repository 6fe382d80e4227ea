#pragma once
// How every CUDA entry point reports a problem: "medvl: <entry>: <what>", as std::invalid_argument
// for a broken precondition and std::runtime_error for a CUDA error; pybind11 raises them in Python
// as ValueError and RuntimeError.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace medvl {

inline void require(bool ok, const char* entry, const std::string& message) {
  if (!ok) throw std::invalid_argument(std::string("medvl: ") + entry + ": " + message);
}

inline void check_cuda(cudaError_t status, const char* entry, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("medvl: ") + entry + ": " + what + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
}

// fn(T()) with T the CUDA element type of `dtype`: float, __half or __nv_bfloat16.
template <typename Fn>
void with_cuda_type(DType dtype, const char* entry, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float()); return;
    case DType::kFloat16: fn(__half()); return;
    case DType::kBFloat16: fn(__nv_bfloat16()); return;
  }
  require(false, entry, "unknown dtype");
}

}  // namespace medvl
