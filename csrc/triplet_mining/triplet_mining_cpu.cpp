// CPU triplet mining: OpenMP over anchors, running extrema per anchor, nothing n_anchor x n_candidate.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "triplet_mining/triplet_mining.h"

namespace medvl {
namespace {

float load(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[index];
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
  return 0.f;
}

// Running argmin/argmax with ties to the lowest index (candidates are visited in ascending order,
// so a strict comparison keeps the first).
struct Best {
  float value;
  int64_t index = -1;
  explicit Best(float start) : value(start) {}
  void take_min(float v, int64_t j) {
    if (index < 0 || v < value) value = v, index = j;
  }
  void take_max(float v, int64_t j) {
    if (index < 0 || v > value) value = v, index = j;
  }
};

float iou_score(const TripletMiningArgs& a, int64_t i, int64_t j) {
  const int64_t words = a.entity_words[0] + a.entity_words[1] + a.entity_words[2];
  const int32_t* x = a.anchor_bits + i * words;
  const int32_t* y = a.candidate_bits + j * words;
  float score = 0.f;
  int64_t start = 0;
  for (int k = 0; k < 3; ++k) {
    int both = 0, either = 0;
    for (int64_t w = start; w < start + a.entity_words[k]; ++w) {
      const uint32_t u = static_cast<uint32_t>(x[w]), v = static_cast<uint32_t>(y[w]);
      both += __builtin_popcount(u & v);
      either += __builtin_popcount(u | v);
    }
    start += a.entity_words[k];
    score += a.entity_weights[k] * (either == 0 ? 1.f : static_cast<float>(both) / static_cast<float>(either));
  }
  return score;
}

}  // namespace

namespace {
size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }

size_t shared_bytes(int64_t n_candidate, int64_t dim) {
  return round_up(static_cast<size_t>(n_candidate) * (dim + 1) * sizeof(float));  // fp32 rows, squared norms
}

size_t per_thread_bytes(int64_t n_candidate, int64_t dim, bool semi_hard, int64_t longest) {
  size_t bytes = static_cast<size_t>(dim + n_candidate) * sizeof(float);
  if (semi_hard) bytes += static_cast<size_t>(longest + 1) * 2 * (sizeof(float) + sizeof(int64_t));
  return round_up(bytes);
}
}  // namespace

size_t triplet_mining_cpu_workspace_bytes(int64_t n_anchor, int64_t n_candidate, int64_t dim, int strategy,
                                          int64_t max_pairs_per_anchor, int threads) {
  (void)n_anchor;
  const bool semi_hard = strategy == static_cast<int>(MiningStrategy::kSemiHard);
  return shared_bytes(n_candidate, dim) +
         per_thread_bytes(n_candidate, dim, semi_hard, max_pairs_per_anchor) * static_cast<size_t>(std::max(threads, 1));
}

void triplet_mining_cpu(const TripletMiningArgs& a, int threads) {
  threads = std::max(threads, 1);
  int64_t longest = 0;
  if (a.strategy == MiningStrategy::kSemiHard)
    for (int64_t i = 0; i < a.n_anchor; ++i) longest = std::max(longest, a.pair_offsets[i + 1] - a.pair_offsets[i]);
  if (a.workspace_bytes <
      triplet_mining_cpu_workspace_bytes(a.n_anchor, a.n_candidate, a.dim, static_cast<int>(a.strategy), longest, threads))
    throw std::invalid_argument("medvl: triplet_mining_cpu workspace too small");
  const int64_t dim = a.dim;
  float* cand = static_cast<float*>(a.workspace);
  float* cand_norm = cand + a.n_candidate * dim;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < a.n_candidate; ++j) {
    float sq = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      const float v = load(a.candidates, a.dtype, j * dim + d);
      cand[j * dim + d] = v;
      sq += v * v;
    }
    cand_norm[j] = sq;
  }
  char* per_thread_base = static_cast<char*>(a.workspace) + shared_bytes(a.n_candidate, dim);
  const size_t per_thread =
      per_thread_bytes(a.n_candidate, dim, a.strategy == MiningStrategy::kSemiHard, longest);

#pragma omp parallel num_threads(threads)
  {
    // int64 arrays first, so they stay 8-byte aligned.
    int64_t* order = reinterpret_cast<int64_t*>(per_thread_base + per_thread * omp_get_thread_num());
    int64_t* bucket_j = order + (longest + 1);
    float* row = reinterpret_cast<float*>(a.strategy == MiningStrategy::kSemiHard ? bucket_j + (longest + 1) : order);
    float* dist = row + dim;
    float* sorted_d = dist + a.n_candidate;  // semi-hard: positive distances, ascending
    float* bucket_d = sorted_d + (longest + 1);
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < a.n_anchor; ++i) {
      float row_sq = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        row[d] = load(a.anchors, a.dtype, i * dim + d);
        row_sq += row[d] * row[d];
      }
      const float row_norm = std::max(std::sqrt(row_sq), 1e-12f);
      for (int64_t j = 0; j < a.n_candidate; ++j) {
        float dot = 0.f;
        const float* c = cand + j * dim;
        for (int64_t d = 0; d < dim; ++d) dot += row[d] * c[d];
        if (a.distance == MiningDistance::kCosine) {
          dist[j] = 1.f - dot / (row_norm * std::max(std::sqrt(cand_norm[j]), 1e-12f));
        } else {
          // Mining only compares distances: the square root changes no order.
          dist[j] = std::max(row_sq + cand_norm[j] - 2.f * dot, 0.f);
        }
      }
      if (a.strategy == MiningStrategy::kBatchHard) {
        Best pos(0.f), neg(0.f);
        for (int64_t j = 0; j < a.n_candidate; ++j) {
          if (a.within && j == i) continue;
          if (a.labels[i] == a.candidate_labels[j]) pos.take_max(dist[j], j);
          else neg.take_min(dist[j], j);
        }
        a.positive[i] = pos.index;
        a.negative[i] = neg.index;
      } else if (a.strategy == MiningStrategy::kEntities) {
        Best top(0.f), low(0.f);
        float top_dist = 0.f, low_dist = 0.f;
        for (int64_t j = 0; j < a.n_candidate; ++j) {
          if (a.within && j == i) continue;
          const float s = iou_score(a, i, j);
          if (top.index < 0 || s > top.value || (s == top.value && dist[j] > top_dist)) {
            top.value = s, top.index = j, top_dist = dist[j];
          }
          if (s >= a.score_low && s < a.score_high &&
              (low.index < 0 || s < low.value || (s == low.value && dist[j] < low_dist))) {
            low.value = s, low.index = j, low_dist = dist[j];
          }
        }
        a.positive[i] = top.index;
        a.negative[i] = (low.index >= 0 && top.index >= 0 && low.value < top.value) ? low.index : -1;
      } else {
        const int64_t first = a.pair_offsets[i], count = a.pair_offsets[i + 1] - first;
        std::iota(order, order + count, int64_t{0});
        std::stable_sort(order, order + count, [&](int64_t p, int64_t q) {
          return dist[a.pair_positive[first + p]] < dist[a.pair_positive[first + q]];
        });
        for (int64_t q = 0; q < count; ++q) sorted_d[q] = dist[a.pair_positive[first + order[q]]];
        std::fill(bucket_j, bucket_j + count + 1, int64_t{-1});
        Best farthest(0.f);
        for (int64_t j = 0; j < a.n_candidate; ++j) {
          if ((a.within && j == i) || a.labels[i] == a.candidate_labels[j]) continue;
          farthest.take_max(dist[j], j);
          // The negative is beyond exactly the positives with distance < dist[j]: the first k sorted.
          const int64_t k = std::lower_bound(sorted_d, sorted_d + count, dist[j]) - sorted_d;
          if (bucket_j[k] < 0 || dist[j] < bucket_d[k]) bucket_d[k] = dist[j], bucket_j[k] = j;
        }
        // Sorted positive q takes the best negative from buckets k > q: a suffix minimum.
        float best_d = 0.f;
        int64_t best_j = -1;
        for (int64_t q = count - 1; q >= 0; --q) {
          const int64_t k = q + 1;
          if (bucket_j[k] >= 0 &&
              (best_j < 0 || bucket_d[k] < best_d || (bucket_d[k] == best_d && bucket_j[k] < best_j)))
            best_d = bucket_d[k], best_j = bucket_j[k];
          a.negative[first + order[q]] = best_j >= 0 ? best_j : farthest.index;
        }
      }
    }
  }
}

}  // namespace medvl
