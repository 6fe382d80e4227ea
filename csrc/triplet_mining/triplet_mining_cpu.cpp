// CPU triplet mining: OpenMP over anchors, running extrema per anchor, nothing n_anchor x n_candidate.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_simd.h"
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

// Entity score key N / D (see triplet_mining.h): integers held exactly in double, one IEEE division.
double entity_key(const TripletMiningArgs& a, int64_t i, int64_t j) {
  const int64_t words = a.entity_words[0] + a.entity_words[1] + a.entity_words[2];
  const int32_t* x = a.anchor_bits + i * words;
  const int32_t* y = a.candidate_bits + j * words;
  double numerator = 0.0, denominator = 1.0;
  int64_t start = 0;
  for (int k = 0; k < 3; ++k) {
    int both = 0, either = 0;
    for (int64_t w = start; w < start + a.entity_words[k]; ++w) {
      const uint32_t u = static_cast<uint32_t>(x[w]), v = static_cast<uint32_t>(y[w]);
      both += __builtin_popcount(u & v);
      either += __builtin_popcount(u | v);
    }
    start += a.entity_words[k];
    if (either == 0) both = either = 1;  // two empty sets: IoU 1
    numerator = numerator * either + a.entity_weights[k] * both * denominator;
    denominator *= either;
  }
  return numerator / denominator;
}

}  // namespace

namespace {
// Anchors are mined in blocks of kAnchorBlock against candidate panels of kPanel (k-major, zero
// padded): a register-blocked dot-product tile, then per-anchor extrema over the block's rows.
constexpr int64_t kAnchorBlock = 16;
constexpr int64_t kPanel = 32;

size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }
int64_t padded_candidates(int64_t n_candidate) { return (n_candidate + kPanel - 1) / kPanel * kPanel; }

size_t shared_bytes(int64_t n_candidate, int64_t dim) {
  // Packed candidate panels, then their squared norms.
  return round_up(static_cast<size_t>(padded_candidates(n_candidate)) * (dim + 1) * sizeof(float));
}

size_t per_thread_bytes(int64_t n_candidate, int64_t dim, bool semi_hard, int64_t longest) {
  size_t bytes = static_cast<size_t>(kAnchorBlock) * (dim + padded_candidates(n_candidate)) * sizeof(float);
  if (semi_hard) bytes += static_cast<size_t>(longest + 1) * 2 * (sizeof(float) + sizeof(int64_t));
  return round_up(bytes);
}

// dots[r][j] = sum_k rows[r][k] * candidate_j[k] for a block of kAnchorBlock rows and every
// candidate, as one chain of fused multiply-adds per (r, j), k ascending from 0. Every instruction
// set computes exactly this chain, so the dot products, and with them every mining decision, carry
// the same bits on every x86 machine (the AVX-512 Xeon, the AVX2-only EPYC, the scalar fallback).
void block_dots_scalar(const float* rows, const float* panels, int64_t n_panels, int64_t dim, float* dots,
                       int64_t ldd) {
  for (int64_t q = 0; q < n_panels; ++q) {
    const float* panel = panels + q * dim * kPanel;
    for (int64_t r = 0; r < kAnchorBlock; ++r) {
      float acc[kPanel] = {};
      for (int64_t k = 0; k < dim; ++k) {
        const float a = rows[r * dim + k];
        for (int64_t c = 0; c < kPanel; ++c) acc[c] = std::fma(a, panel[k * kPanel + c], acc[c]);
      }
      std::copy(acc, acc + kPanel, dots + r * ldd + q * kPanel);
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void block_dots_avx2(const float* rows, const float* panels, int64_t n_panels,
                                                         int64_t dim, float* dots, int64_t ldd) {
  constexpr int kRows = 4;  // 4 rows x 2 vectors of 8 (half a panel): 8 accumulators in registers
  for (int64_t q = 0; q < n_panels; ++q) {
    const float* panel = panels + q * dim * kPanel;
    for (int64_t half = 0; half < kPanel; half += 16) {
      for (int64_t r0 = 0; r0 < kAnchorBlock; r0 += kRows) {
        __m256 acc[kRows][2];
        for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const float* a = rows + r0 * dim;
        for (int64_t k = 0; k < dim; ++k) {
          const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel + half);
          const __m256 b1 = _mm256_loadu_ps(panel + k * kPanel + half + 8);
          for (int r = 0; r < kRows; ++r) {
            const __m256 x = _mm256_set1_ps(a[r * dim + k]);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
          }
        }
        for (int r = 0; r < kRows; ++r) {
          _mm256_storeu_ps(dots + (r0 + r) * ldd + q * kPanel + half, acc[r][0]);
          _mm256_storeu_ps(dots + (r0 + r) * ldd + q * kPanel + half + 8, acc[r][1]);
        }
      }
    }
  }
}

__attribute__((target("avx512f"))) void block_dots_avx512(const float* rows, const float* panels, int64_t n_panels,
                                                          int64_t dim, float* dots, int64_t ldd) {
  constexpr int kRows = 8;  // 8 rows x 2 vectors of 16: 16 accumulators in registers
  for (int64_t q = 0; q < n_panels; ++q) {
    const float* panel = panels + q * dim * kPanel;
    for (int64_t r0 = 0; r0 < kAnchorBlock; r0 += kRows) {
      __m512 acc[kRows][2];
      for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      const float* a = rows + r0 * dim;
      for (int64_t k = 0; k < dim; ++k) {
        const __m512 b0 = _mm512_loadu_ps(panel + k * kPanel);
        const __m512 b1 = _mm512_loadu_ps(panel + k * kPanel + 16);
        for (int r = 0; r < kRows; ++r) {
          const __m512 x = _mm512_set1_ps(a[r * dim + k]);
          acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        _mm512_storeu_ps(dots + (r0 + r) * ldd + q * kPanel, acc[r][0]);
        _mm512_storeu_ps(dots + (r0 + r) * ldd + q * kPanel + 16, acc[r][1]);
      }
    }
  }
}
#endif

using BlockDots = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t);

// The instruction set changes the speed, never the bits (MEDVL_CPU_ISA lowers it for the tests).
BlockDots pick_block_dots() {
#if defined(__x86_64__)
  switch (cpu::selected_isa()) {
    case cpu::Isa::kAvx512: return block_dots_avx512;
    case cpu::Isa::kAvx2: return block_dots_avx2;
    default: break;
  }
#endif
  return block_dots_scalar;
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
  const int64_t n_panels = padded_candidates(a.n_candidate) / kPanel;
  const int64_t ldd = n_panels * kPanel;
  float* panels = static_cast<float*>(a.workspace);
  float* cand_norm = panels + ldd * dim;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t q = 0; q < n_panels; ++q) {
    float* panel = panels + q * dim * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t j = q * kPanel + c;
      float sq = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = j < a.n_candidate ? load(a.candidates, a.dtype, j * dim + d) : 0.f;
        panel[d * kPanel + c] = v;
        sq += v * v;
      }
      cand_norm[j] = sq;
    }
  }
  const BlockDots block_dots = pick_block_dots();
  char* per_thread_base = static_cast<char*>(a.workspace) + shared_bytes(a.n_candidate, dim);
  const size_t per_thread =
      per_thread_bytes(a.n_candidate, dim, a.strategy == MiningStrategy::kSemiHard, longest);
  const int64_t n_blocks = (a.n_anchor + kAnchorBlock - 1) / kAnchorBlock;

#pragma omp parallel num_threads(threads)
  {
    // int64 arrays first, so they stay 8-byte aligned.
    int64_t* order = reinterpret_cast<int64_t*>(per_thread_base + per_thread * omp_get_thread_num());
    int64_t* bucket_j = order + (longest + 1);
    float* rows = reinterpret_cast<float*>(a.strategy == MiningStrategy::kSemiHard ? bucket_j + (longest + 1) : order);
    float* dots = rows + kAnchorBlock * dim;            // [kAnchorBlock][ldd]
    float* sorted_d = dots + kAnchorBlock * ldd;        // semi-hard: positive distances, ascending
    float* bucket_d = sorted_d + (longest + 1);
#pragma omp for schedule(dynamic, 4)
    for (int64_t block = 0; block < n_blocks; ++block) {
      const int64_t i0 = block * kAnchorBlock;
      const int64_t rows_here = std::min(kAnchorBlock, a.n_anchor - i0);
      float row_sq[kAnchorBlock];
      for (int64_t r = 0; r < kAnchorBlock; ++r) {
        row_sq[r] = 0.f;
        for (int64_t d = 0; d < dim; ++d) {
          const float v = r < rows_here ? load(a.anchors, a.dtype, (i0 + r) * dim + d) : 0.f;
          rows[r * dim + d] = v;
          row_sq[r] += v * v;
        }
      }
      block_dots(rows, panels, n_panels, dim, dots, ldd);
      for (int64_t r = 0; r < rows_here; ++r) {
        const int64_t i = i0 + r;
        float* dist = dots + r * ldd;
        const float row_norm = std::max(std::sqrt(row_sq[r]), 1e-12f);
        for (int64_t j = 0; j < a.n_candidate; ++j) {
          const float dot = dist[j];
          if (a.distance == MiningDistance::kCosine) {
            dist[j] = 1.f - dot / (row_norm * std::max(std::sqrt(cand_norm[j]), 1e-12f));
          } else {
            // Mining only compares distances: the square root changes no order.
            dist[j] = std::max(row_sq[r] + cand_norm[j] - 2.f * dot, 0.f);
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
          double top_key = 0.0, low_key = 0.0;
          int64_t top_index = -1, low_index = -1;
          float top_dist = 0.f, low_dist = 0.f;
          for (int64_t j = 0; j < a.n_candidate; ++j) {
            if (a.within && j == i) continue;
            const double s = entity_key(a, i, j);
            if (top_index < 0 || s > top_key || (s == top_key && dist[j] > top_dist)) {
              top_key = s, top_index = j, top_dist = dist[j];
            }
            if (s >= a.score_low && s < a.score_high &&
                (low_index < 0 || s < low_key || (s == low_key && dist[j] < low_dist))) {
              low_key = s, low_index = j, low_dist = dist[j];
            }
          }
          a.positive[i] = top_index;
          a.negative[i] = (low_index >= 0 && top_index >= 0 && low_key < top_key) ? low_index : -1;
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
}

}  // namespace medvl
