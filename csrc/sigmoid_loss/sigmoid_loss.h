#pragma once
// Fused sigmoid contrastive (SigLIP) loss over one block of images against one chunk of texts.
//
//   z_ij = logit_scale * <image_i, text_j> + logit_bias
//   loss_ij = softplus(z_ij) - y_ij * z_ij          (binary cross-entropy with logits)
//   g_ij = sigmoid(z_ij) - y_ij                     (d loss_ij / d z_ij)
//
// Outputs, all float32, never anything of size n_image x n_text:
//   row_loss[i]   = sum_j loss_ij
//   row_gsum[i]   = sum_j g_ij                      (only when compute_grad)
//   grad_image[i] = sum_j g_ij * text_j             (only when compute_grad; not scaled by logit_scale)
//   grad_text[j]  = sum_i g_ij * image_i            (only when compute_grad; not scaled by logit_scale)
// The caller turns these into the gradients of the reduced loss: d/d image = s * grad_image,
// d/d text = s * grad_text, d/d logit_scale = sum_i <image_i, grad_image_i>, d/d logit_bias = sum_i row_gsum_i.
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace medvl {

// Target codes, shared with medvl/ops/sigmoid_loss.py.
enum class SigmoidTarget : int {
  kPair = 0,     // y_ij = 1 iff i == j and diagonal_is_pair
  kLabel = 1,    // y_ij = 1 iff image_labels[i] == text_labels[j]
  kJaccard = 2,  // y_ij = |a_i & b_j| / |a_i | b_j| over bit sets; two empty sets give 1;
                 // i == j gives 1 when diagonal_is_pair
};

struct SigmoidLossArgs {
  const void* image = nullptr;  // [n_image, dim], row-major, contiguous, `dtype`
  const void* text = nullptr;   // [n_text, dim]
  int64_t n_image = 0;
  int64_t n_text = 0;
  int64_t dim = 0;
  DType dtype = DType::kFloat32;
  const float* logit_scale = nullptr;  // one float, on the same device as the features
  const float* logit_bias = nullptr;
  SigmoidTarget target = SigmoidTarget::kPair;
  bool diagonal_is_pair = true;  // false for a text chunk owned by another rank
  const int64_t* image_labels = nullptr;  // kLabel: [n_image]
  const int64_t* text_labels = nullptr;   // kLabel: [n_text]
  const int32_t* image_bits = nullptr;    // kJaccard: [n_image, label_words] packed multi-hot
  const int32_t* text_bits = nullptr;     // kJaccard: [n_text, label_words]
  int64_t label_words = 0;
  bool compute_grad = false;
  float* row_loss = nullptr;    // [n_image]
  float* row_gsum = nullptr;    // [n_image]
  float* grad_image = nullptr;  // [n_image, dim]
  float* grad_text = nullptr;   // [n_text, dim]
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Bytes of scratch the CPU kernel needs for these sizes with `threads` OpenMP threads.
size_t sigmoid_loss_cpu_workspace_bytes(int64_t n_image, int64_t n_text, int64_t dim, bool compute_grad,
                                        int threads);
void sigmoid_loss_cpu(const SigmoidLossArgs& args, int threads);

#ifdef MEDVL_WITH_CUDA
// 0 for every size today (the D-chunked grid keeps its partial sums in registers); kept so that both
// compiled backends share one calling convention, and a future split-K design can ask for scratch.
size_t sigmoid_loss_cuda_workspace_bytes(int64_t n_image, int64_t n_text, int64_t dim, bool compute_grad);
void sigmoid_loss_cuda(const SigmoidLossArgs& args, void* stream);
#endif

}  // namespace medvl
