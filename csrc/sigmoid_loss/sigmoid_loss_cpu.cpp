// CPU sigmoid loss: tiled, OpenMP over image row blocks, gradients fused into the loss pass.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "sigmoid_loss/sigmoid_loss.h"

namespace medvl {
namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 64;

float load(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[index];
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
  return 0.f;
}

void to_float(const void* base, DType dtype, int64_t first_row, int64_t rows, int64_t dim, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = load(base, dtype, (first_row + r) * dim + d);
}

float target_of(const SigmoidLossArgs& a, int64_t i, int64_t j) {
  switch (a.target) {
    case SigmoidTarget::kPair: return (a.diagonal_is_pair && i == j) ? 1.f : 0.f;
    case SigmoidTarget::kLabel: return a.image_labels[i] == a.text_labels[j] ? 1.f : 0.f;
    case SigmoidTarget::kJaccard: {
      if (a.diagonal_is_pair && i == j) return 1.f;
      int both = 0, either = 0;
      for (int64_t w = 0; w < a.label_words; ++w) {
        const uint32_t x = static_cast<uint32_t>(a.image_bits[i * a.label_words + w]);
        const uint32_t y = static_cast<uint32_t>(a.text_bits[j * a.label_words + w]);
        both += __builtin_popcount(x & y);
        either += __builtin_popcount(x | y);
      }
      return either == 0 ? 1.f : static_cast<float>(both) / static_cast<float>(either);
    }
  }
  return 0.f;
}

}  // namespace

size_t sigmoid_loss_cpu_workspace_bytes(int64_t n_image, int64_t n_text, int64_t dim, bool compute_grad,
                                        int threads) {
  (void)n_image;
  const size_t per_thread_tiles = static_cast<size_t>(kRowBlock + kColBlock) * dim + kRowBlock * kColBlock;
  const size_t per_thread_grad_text = compute_grad ? static_cast<size_t>(n_text) * dim : 0;
  return sizeof(float) * static_cast<size_t>(std::max(threads, 1)) * (per_thread_tiles + per_thread_grad_text);
}

void sigmoid_loss_cpu(const SigmoidLossArgs& a, int threads) {
  threads = std::max(threads, 1);
  if (a.workspace_bytes < sigmoid_loss_cpu_workspace_bytes(a.n_image, a.n_text, a.dim, a.compute_grad, threads))
    throw std::invalid_argument("medvl: sigmoid_loss_cpu workspace too small");
  const float scale = *a.logit_scale;
  const float bias = *a.logit_bias;
  const int64_t dim = a.dim;
  const size_t per_thread = static_cast<size_t>(kRowBlock + kColBlock) * dim + kRowBlock * kColBlock +
                            (a.compute_grad ? static_cast<size_t>(a.n_text) * dim : 0);
  float* workspace = static_cast<float*>(a.workspace);
  const int64_t row_blocks = (a.n_image + kRowBlock - 1) / kRowBlock;

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* x_tile = workspace + tid * per_thread;
    float* t_tile = x_tile + kRowBlock * dim;
    float* g_tile = t_tile + kColBlock * dim;
    float* my_grad_text = g_tile + kRowBlock * kColBlock;
    if (a.compute_grad) std::fill(my_grad_text, my_grad_text + a.n_text * dim, 0.f);

#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t i0 = rb * kRowBlock, ni = std::min(kRowBlock, a.n_image - i0);
      to_float(a.image, a.dtype, i0, ni, dim, x_tile);
      for (int64_t i = 0; i < ni; ++i) {
        a.row_loss[i0 + i] = 0.f;
        if (a.compute_grad) {
          a.row_gsum[i0 + i] = 0.f;
          std::fill(a.grad_image + (i0 + i) * dim, a.grad_image + (i0 + i + 1) * dim, 0.f);
        }
      }
      for (int64_t j0 = 0; j0 < a.n_text; j0 += kColBlock) {
        const int64_t nj = std::min(kColBlock, a.n_text - j0);
        to_float(a.text, a.dtype, j0, nj, dim, t_tile);
        for (int64_t i = 0; i < ni; ++i) {
          float loss = 0.f, gsum = 0.f;
          for (int64_t j = 0; j < nj; ++j) {
            float dot = 0.f;
            for (int64_t d = 0; d < dim; ++d) dot += x_tile[i * dim + d] * t_tile[j * dim + d];
            const float z = scale * dot + bias;
            const float y = target_of(a, i0 + i, j0 + j);
            loss += std::max(z, 0.f) + std::log1p(std::exp(-std::fabs(z))) - y * z;
            const float g = 1.f / (1.f + std::exp(-z)) - y;
            g_tile[i * kColBlock + j] = g;
            gsum += g;
          }
          a.row_loss[i0 + i] += loss;
          if (a.compute_grad) a.row_gsum[i0 + i] += gsum;
        }
        if (!a.compute_grad) continue;
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < nj; ++j) {
            const float g = g_tile[i * kColBlock + j];
            float* gi = a.grad_image + (i0 + i) * dim;
            float* gt = my_grad_text + (j0 + j) * dim;
            for (int64_t d = 0; d < dim; ++d) {
              gi[d] += g * t_tile[j * dim + d];
              gt[d] += g * x_tile[i * dim + d];
            }
          }
      }
    }
  }
  if (!a.compute_grad) return;
  // Per-thread partials summed in thread order: the result does not depend on scheduling.
  const int64_t total = a.n_text * dim;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < total; ++k) {
    float sum = 0.f;
    for (int t = 0; t < threads; ++t) sum += workspace[t * per_thread + (kRowBlock + kColBlock) * dim + kRowBlock * kColBlock + k];
    a.grad_text[k] = sum;
  }
}

}  // namespace medvl
