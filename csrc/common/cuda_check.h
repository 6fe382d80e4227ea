#pragma once
// How every CUDA entry point reports a problem: "medvl: <entry>: <what>", as std::invalid_argument
// for a broken precondition and std::runtime_error for a CUDA error; pybind11 raises them in Python
// as ValueError and RuntimeError.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace medvl {

inline void require(bool ok, const char* entry, const std::string& message) {
  if (!ok) throw std::invalid_argument(std::string("medvl: ") + entry + ": " + message);
}

inline void check_cuda(cudaError_t status, const char* entry, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("medvl: ") + entry + ": " + what + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
}

}  // namespace medvl
