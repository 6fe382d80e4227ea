#pragma once
// The targets y_ij of the sigmoid loss, written once for the CPU and the CUDA kernels (and the same
// rule as medvl/reference/sigmoid_loss.py's sigmoid_loss_targets and kernels/sigmoid_loss.py).
#include <cstdint>

#include "common/host_device.h"
#include "sigmoid_loss/sigmoid_loss.h"

namespace medvl {

MEDVL_HD int count_bits(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __popc(word);
#else
  return __builtin_popcount(word);
#endif
}

// What the targets read, copied out of SigmoidLossArgs (a kernel parameter on the GPU).
struct SigmoidTargets {
  SigmoidTarget target;
  bool diagonal_is_pair;
  const int64_t* image_labels;
  const int64_t* text_labels;
  const int32_t* image_bits;
  const int32_t* text_bits;
  int64_t label_words;
};

inline SigmoidTargets targets_of(const SigmoidLossArgs& a) {
  return {a.target, a.diagonal_is_pair, a.image_labels, a.text_labels, a.image_bits, a.text_bits, a.label_words};
}

// y of image i against text j: the pair (i == j on a rank's own texts), equal class ids, or the
// Jaccard index of two packed label sets (two empty sets: 1; the own pair: 1).
MEDVL_HD float sigmoid_target(const SigmoidTargets& t, int64_t i, int64_t j) {
  const bool own_pair = t.diagonal_is_pair && i == j;
  if (t.target == SigmoidTarget::kPair) return own_pair ? 1.f : 0.f;
  if (t.target == SigmoidTarget::kLabel) return t.image_labels[i] == t.text_labels[j] ? 1.f : 0.f;
  if (own_pair) return 1.f;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(t.image_bits) + i * t.label_words;
  const uint32_t* y = reinterpret_cast<const uint32_t*>(t.text_bits) + j * t.label_words;
  int both = 0, either = 0;
  for (int64_t w = 0; w < t.label_words; ++w) {
    both += count_bits(x[w] & y[w]);
    either += count_bits(x[w] | y[w]);
  }
  return either == 0 ? 1.f : static_cast<float>(both) / static_cast<float>(either);
}

}  // namespace medvl

