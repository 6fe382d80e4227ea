#pragma once
// Fused triplet mining: per-anchor running extrema over candidate tiles, nothing
// n_anchor x n_candidate ever stored. The rules, ties included, are those of
// medvl/reference/triplet_mining.py:
//
// distance (fp32): squared = max(|a|^2 + |c|^2 - 2 <a, c>, 0); euclidean = sqrt(squared)
//   (mining compares distances, so euclidean and squared_euclidean mine identically);
//   cosine = 1 - <a, c> / (max(|a|, 1e-12) * max(|c|, 1e-12)).
// kBatchHard: positive[i] = argmax distance over candidates j with labels equal (j != i when
//   within); negative[i] = argmin distance over candidates with labels different; -1 when none.
// kSemiHard: pair p (anchor i = the row whose [pair_offsets[i], pair_offsets[i+1]) holds p, positive
//   candidate pair_positive[p]): negative[p] = argmin distance over negatives j with
//   d(i, j) > d(i, pair_positive[p]); if there is none, argmax distance over all negatives;
//   -1 when anchor i has no negative at all. positive[] is not written.
// kEntities: score s_ij = sum_k w_k IoU_k(bits of kind k), IoU of two empty sets = 1; candidates
//   j != i when within. positive[i] = argmax score (ties: argmax distance); negative[i] = argmin
//   score over candidates with lo <= s < hi (ties: argmin distance); negative[i] = -1 when there
//   is none or when its score is not below the positive's score. Scores are exact: the weights and
//   the range arrive as integers (times one denominator), and each score is the key N / D in
//   double, N and D integers (b_k = |a & c|, e_k = |a | c|, both 1 for two empty sets; folding
//   kinds k in order: N <- N e_k + w_k b_k D, D <- D e_k from N = 0, D = 1), divided once with IEEE
//   rounding. Python checks that (sum |w| + 1) D^2 <= 2^52, so equal scores give equal keys and the
//   keys order as the scores do (medvl.reference.triplet_mining.entity_score_keys).
// Every argmin/argmax breaks remaining ties towards the lowest candidate index.
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace medvl {

enum class MiningStrategy : int { kBatchHard = 0, kSemiHard = 1, kEntities = 2 };
enum class MiningDistance : int { kEuclidean = 0, kSquaredEuclidean = 1, kCosine = 2 };

struct TripletMiningArgs {
  const void* anchors = nullptr;     // [n_anchor, dim], row-major, contiguous, `dtype`
  const void* candidates = nullptr;  // [n_candidate, dim]
  int64_t n_anchor = 0;
  int64_t n_candidate = 0;
  int64_t dim = 0;
  DType dtype = DType::kFloat32;
  MiningStrategy strategy = MiningStrategy::kBatchHard;
  MiningDistance distance = MiningDistance::kEuclidean;
  bool within = false;                      // candidates are the anchors: j == i is excluded
  const int64_t* labels = nullptr;          // batch-hard, semi-hard: [n_anchor]
  const int64_t* candidate_labels = nullptr;  // [n_candidate]
  const int32_t* anchor_bits = nullptr;     // entities: [n_anchor, words[0] + words[1] + words[2]]
  const int32_t* candidate_bits = nullptr;  // [n_candidate, same]
  int64_t entity_words[3] = {0, 0, 0};      // int32 words of each entity kind, in order
  double entity_weights[3] = {0.0, 0.0, 0.0};  // integers: w_k x denominator
  double score_low = 0.0;   // integers, x denominator: negatives need score_low <= key < score_high
  double score_high = 0.0;
  const int64_t* pair_offsets = nullptr;   // semi-hard: [n_anchor + 1]
  const int64_t* pair_positive = nullptr;  // semi-hard: [pair_offsets[n_anchor]]
  int64_t* positive = nullptr;             // batch-hard, entities: [n_anchor]
  int64_t* negative = nullptr;             // [n_anchor], or [pairs] for semi-hard
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// max_pairs_per_anchor: semi-hard only (the longest run of pairs of one anchor), else 0.
size_t triplet_mining_cpu_workspace_bytes(int64_t n_anchor, int64_t n_candidate, int64_t dim, int strategy,
                                          int64_t max_pairs_per_anchor, int threads);
void triplet_mining_cpu(const TripletMiningArgs& args, int threads);

#ifdef MEDVL_WITH_CUDA
// All pointers are device pointers; positive/negative are written with -1 where none.
size_t triplet_mining_cuda_workspace_bytes(int64_t n_anchor, int64_t n_candidate, int64_t dim, int strategy,
                                           int64_t max_pairs_per_anchor);
void triplet_mining_cuda(const TripletMiningArgs& args, void* stream);
#endif

}  // namespace medvl
