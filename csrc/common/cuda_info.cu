#include <cuda_runtime.h>

#include "common/cuda_info.h"

namespace medvl {

int cuda_device_count(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    // With no driver (a CPU-only machine) this is the normal answer, not a failure.
    if (why) *why = cudaGetErrorString(status);
    cudaGetLastError();
    return 0;
  }
  if (count == 0 && why) *why = "the CUDA driver reports no device";
  return count;
}

std::string cuda_device_capability(int device, std::string* why) {
  int major = 0, minor = 0;
  cudaError_t status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (status != cudaSuccess) {
    if (why) *why = cudaGetErrorString(status);
    cudaGetLastError();
    return "";
  }
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace medvl
