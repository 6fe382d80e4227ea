#pragma once
// Fused 3D patch embedding: intensity window, patchify, projection, bias and position embedding in
// one pass over the raw volume; the backward passes re-read the raw volume (no im2col buffer and no
// windowed copy of the volume is ever stored). The arithmetic is that of
// medvl/reference/patch_embed3d.py:
//
//   token t = (b, g0, g1, g2), row-major over the grid (grid[i] = ceil(size[i] / patch[i]));
//   column k = (c, q0, q1, q2), row-major: the Conv3d weight layout (E, C, p0, p1, p2) flattened;
//   voxel (b, c, g0*p0 + q0, g1*p1 + q1, g2*p2 + q2); outside the volume (padding) the windowed
//   value is 0;
//   window (has_window):  v = clip(((x - lo) / window_span) * out_span + out_lo, out_lo, out_hi)
//                         (the CPU kernel, PyTorch's expression bit for bit; the CUDA kernel multiplies by
//                         the precomputed slope instead: see patch_embed3d_cuda.cu)
//   without a window:     v = x (converted to float)
//   out[t, e] = sum_k v[t, k] * weight[e, k] + bias[e] + pos_embed[n(t), e]     (fp32 accumulation)
//   grad_weight[e, k] = sum_t grad_out[t, e] * v[t, k]
//   grad_volume[voxel] = dv/dx * sum_e grad_out[t, e] * weight[e, k], dv/dx = (out_hi - out_lo) / (hi - lo)
//                        where the unclipped v lies strictly inside (out_lo, out_hi) (CPU; CUDA: where
//                        lo < x < hi), else 0: 0 on the bounds themselves;
//                        1 without a window. Every voxel belongs to exactly one patch: no accumulation.
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace medvl {

// Element types of the raw volume: the float codes are those of DType, then the integer ones.
enum class VolumeType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt16 = 3, kUInt8 = 4, kUInt16 = 5 };

inline VolumeType volume_type_from_code(int code) {
  if (code < 0 || code > 5) throw std::invalid_argument("medvl: unknown volume dtype code " + std::to_string(code));
  return static_cast<VolumeType>(code);
}

struct PatchEmbed3dArgs {
  const void* volume = nullptr;  // [batch, channels, size0, size1, size2], contiguous, volume_type
  VolumeType volume_type = VolumeType::kFloat32;
  int64_t batch = 0, channels = 0;
  int64_t size[3] = {0, 0, 0};
  int64_t patch[3] = {0, 0, 0};
  int64_t grid[3] = {0, 0, 0};   // ceil(size / patch); tokens per volume = grid0 * grid1 * grid2
  int64_t embed_dim = 0;
  const void* weight = nullptr;  // [embed_dim, channels * p0 * p1 * p2], contiguous, weight_type
  DType weight_type = DType::kFloat32;
  const float* bias = nullptr;       // [embed_dim] fp32, or null
  const float* pos_embed = nullptr;  // [tokens per volume, embed_dim] fp32, or null
  bool has_window = false;
  float window_lo = 0.f, window_hi = 1.f, out_lo = 0.f, out_hi = 1.f;
  // hi - lo and out_hi - out_lo rounded to fp32 from the caller's doubles, as PyTorch rounds a Python
  // scalar expression: fp32 differences of the fp32 bounds can be 1 ulp off.
  float window_span = 1.f, out_span = 1.f;
  void* out = nullptr;               // forward: [batch * tokens, embed_dim], out_type
  DType out_type = DType::kFloat32;
  const void* grad_out = nullptr;    // backward: [batch * tokens, embed_dim], grad_out_type
  DType grad_out_type = DType::kFloat32;
  float* grad_weight = nullptr;      // [embed_dim, K] fp32 (overwritten)
  void* grad_volume = nullptr;       // volume-shaped, volume_type (a float type; overwritten)
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

enum class PatchEmbed3dPass : int { kForward = 0, kGradWeight = 1, kGradVolume = 2 };

// CPU: weight, grad_out and out are fp32 (the caller converts); the volume may be any VolumeType.
size_t patch_embed3d_cpu_workspace_bytes(const PatchEmbed3dArgs& args, int pass, int threads);
void patch_embed3d_cpu(const PatchEmbed3dArgs& args, int pass, int threads);

#ifdef MEDVL_WITH_CUDA
// All pointers are device pointers. weight/out/grad_out may be fp32, fp16 or bf16.
size_t patch_embed3d_cuda_workspace_bytes(const PatchEmbed3dArgs& args, int pass);
void patch_embed3d_cuda(const PatchEmbed3dArgs& args, int pass, void* stream);
#endif

}  // namespace medvl
