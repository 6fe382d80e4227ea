#pragma once
#include <string>

namespace medvl {
// Number of usable CUDA devices; 0 with `why` filled when there is no driver or no device.
int cuda_device_count(std::string* why);
// "major.minor" compute capability of `device`, or "" with `why` filled.
std::string cuda_device_capability(int device, std::string* why);
}  // namespace medvl
