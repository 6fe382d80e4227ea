#pragma once
// Mining arithmetic and the semi-hard tile algorithm, written once for the CUDA kernels
// (triplet_mining_cuda.cu) and for a host emulation of a thread block (semi_hard_emulation.cpp, which
// tests/ops/test_triplet_mining.py compiles with g++ and checks against the reference on a machine
// without a GPU). Everything here is plain C++ outside nvcc, and __host__ __device__ inside it.
//
// Semi-hard, one block per tile of kRows anchors (rules in triplet_mining.h):
//   The tile's pairs are contiguous in the CSR (pair_offsets[a0] .. pair_offsets[a0 + kRows]); they are
//   taken in chunks of kCap, and per chunk:
//   1. sweep 1 over the candidate tiles: each tile S (kRows x kCols distances' dot products, computed
//      by the caller: tensor cores on the GPU) gives the d(i, p) of the chunk's pairs whose positive
//      lies in it, with the same arithmetic as every other distance of the tile; the first chunk's
//      sweep also keeps every thread's farthest negative (the fallback).
//   2. a bitonic sort of the keys (row, d(i, p), pair): the rows' pair ranges are contiguous, so each
//      row's positives end up sorted in place, in the segment its pairs already occupied.
//   3. sweep 2: every negative (i, j) of a tile falls into bucket k = #{positives of i nearer than
//      d(i, j)} of its row's segment (a binary search in the sorted distances) and leaves its key
//      (ordered bits of d(i, j), j) there with an atomic minimum: the minimum does not depend on the
//      order of the updates, and the key order is "nearer, then lower index", so the result is
//      deterministic.
//   4. a suffix minimum per segment: the sorted positive q takes the best key of buckets >= q (the
//      negatives strictly beyond it); without one, its anchor's farthest negative.
//   Tiles are computed twice per chunk (once for most tiles: kCap pairs of 64 anchors is 16 each).
//   Shared state is kCap keys, buckets, pair distances and positives, plus small per-row and
//   per-thread arrays; every phase runs between two barriers and keeps no per-thread state in
//   registers across them, so the host emulation runs each phase thread by thread.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace medvl {
namespace mining {

constexpr int kThreads = 256;            // threads per block; the mappings below assume it
constexpr int kRows = 64;                // anchors per tile
constexpr int kCols = 64;                // candidates per tile
constexpr int kLDS = kCols + 4;          // row stride (floats) of the fp32 tile S
constexpr int kLanesPerRow = kThreads / kRows;          // 4: thread t owns row t / 4 ...
constexpr int kColsPerThread = kCols / kLanesPerRow;    // ... and columns t % 4 + 4 k, k < 16
constexpr int kCapBits = 10;
constexpr int kCap = 1 << kCapBits;      // pairs per chunk (the sort key keeps kCapBits of the pair)
constexpr int kRowShift = 32 + kCapBits; // sort key: row | ordered distance | pair
constexpr unsigned long long kNoKey = ~0ull;
static_assert(kRows * kLanesPerRow == kThreads && kColsPerThread * kLanesPerRow == kCols, "thread mapping");
static_assert(kRowShift + 7 <= 64, "the sort key must hold the row");

// ------------------------------------------------------------------------------------------------
// Arithmetic pinned to round-to-nearest, one operation at a time (no FMA contraction, IEEE division):
// on inputs whose dot products are exact, every backend agrees bit for bit, ties included.
// ------------------------------------------------------------------------------------------------

MEDVL_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MEDVL_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
MEDVL_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MEDVL_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The distance from a tile's dot product and the stored norms (squared norms, or clamped norms for
// cosine): squared = max((|a|^2 + |c|^2) - 2 dot, 0); cosine = 1 - dot / (|a| |c|).
MEDVL_HD float distance(int kind, float dot, float na, float nc) {
  if (kind == 2) return sub_rn(1.f, div_rn(dot, mul_rn(na, nc)));
  const float sq = sub_rn(add_rn(na, nc), mul_rn(2.f, dot));
  return sq < 0.f ? 0.f : sq;  // the CPU's std::max(sq, 0.f), NaN included
}

// Monotone map of floats to unsigned keys (-0 folded onto +0 first, so equal floats give equal keys).
MEDVL_HD unsigned ordered_bits(float v) {
  const float folded = add_rn(v, 0.f);
  unsigned b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(folded);
#else
  std::memcpy(&b, &folded, sizeof(b));
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Bucket key of a negative: nearer first, then the lower candidate index (j < 2^31).
MEDVL_HD unsigned long long negative_key(float d, int64_t j) {
  return (static_cast<unsigned long long>(ordered_bits(d)) << 32) | static_cast<unsigned long long>(j);
}

MEDVL_HD int64_t key_index(unsigned long long key) { return static_cast<int64_t>(key & 0xffffffffull); }

// Number of the n ascending values below d (strictly): the positives a negative at distance d lies beyond.
MEDVL_HD int count_below(const float* sorted, int n, float d) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (sorted[mid] < d) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Does extremum (value, index) replace the running (best_value, best_index) (index < 0: none)? The
// larger (largest) or smaller value, then the lower index: a total order, so any combining order of
// partial extrema gives the same winner.
MEDVL_HD bool beats(float value, int64_t index, float best_value, int64_t best_index, bool largest) {
  if (index < 0) return false;
  if (best_index < 0) return true;
  if (value != best_value) return largest ? value > best_value : value < best_value;
  return index < best_index;
}

MEDVL_HD void atomic_min_key(unsigned long long* slot, unsigned long long key) {
#if defined(__CUDA_ARCH__)
  atomicMin(slot, key);
#else
  if (key < *slot) *slot = key;
#endif
}

MEDVL_HD int64_t load_ro(const int64_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const long long*>(p));
#else
  return *p;
#endif
}
MEDVL_HD float load_ro(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// ------------------------------------------------------------------------------------------------
// Semi-hard tile.
// ------------------------------------------------------------------------------------------------

struct SemiHardProblem {
  int64_t n_a;
  int64_t n_c;
  int distance;              // MiningDistance code
  const float* a_norm;       // [n_a]
  const float* c_norm;       // [n_c]
  const int64_t* labels;     // [n_a]
  const int64_t* c_labels;   // [n_c]
  const int64_t* pair_offsets;   // [n_a + 1]
  const int64_t* pair_positive;  // [P]
  int64_t* negative;             // [P] out
};

// Shared state of one block (pointers into its shared memory, or host arrays for the emulation).
struct SemiHardShared {
  unsigned long long* keys;    // [kCap] sort keys, then sorted
  unsigned long long* bucket;  // [kCap] best negative key per (row, count below), in sorted order
  float* pair_d;               // [kCap] d(i, p) of the chunk's pairs
  float* sorted_d;             // [kCap] the same, sorted within each row's segment
  int64_t* pos_j;              // [kCap] the chunk's positives (-1: not a candidate index)
  int64_t* row_off;            // [kRows + 1] the tile rows' pair offsets (pair_offsets[min(a0 + r, n_a)])
  int64_t* label;              // [kRows]
  float* a_norm;               // [kRows]
  float* far_d;                // [kThreads] each thread's farthest negative
  int64_t* far_j;              // [kThreads]
  int64_t* row_far;            // [kRows] each row's farthest negative (-1: no negative)
};

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Byte offsets of SemiHardShared's arrays in the block's shared memory.
struct SemiHardSharedBytes {
  static constexpr size_t kKeys = 0;
  static constexpr size_t kBucket = kKeys + align128(sizeof(unsigned long long) * kCap);
  static constexpr size_t kPairD = kBucket + align128(sizeof(unsigned long long) * kCap);
  static constexpr size_t kSortedD = kPairD + align128(sizeof(float) * kCap);
  static constexpr size_t kPosJ = kSortedD + align128(sizeof(float) * kCap);
  static constexpr size_t kRowOff = kPosJ + align128(sizeof(int64_t) * kCap);
  static constexpr size_t kLabel = kRowOff + align128(sizeof(int64_t) * (kRows + 1));
  static constexpr size_t kANorm = kLabel + align128(sizeof(int64_t) * kRows);
  static constexpr size_t kFarD = kANorm + align128(sizeof(float) * kRows);
  static constexpr size_t kFarJ = kFarD + align128(sizeof(float) * kThreads);
  static constexpr size_t kRowFar = kFarJ + align128(sizeof(int64_t) * kThreads);
  static constexpr size_t kTotal = kRowFar + align128(sizeof(int64_t) * kRows);
};

MEDVL_HD SemiHardShared semi_hard_shared(unsigned char* base) {
  using L = SemiHardSharedBytes;
  SemiHardShared s;
  s.keys = reinterpret_cast<unsigned long long*>(base + L::kKeys);
  s.bucket = reinterpret_cast<unsigned long long*>(base + L::kBucket);
  s.pair_d = reinterpret_cast<float*>(base + L::kPairD);
  s.sorted_d = reinterpret_cast<float*>(base + L::kSortedD);
  s.pos_j = reinterpret_cast<int64_t*>(base + L::kPosJ);
  s.row_off = reinterpret_cast<int64_t*>(base + L::kRowOff);
  s.label = reinterpret_cast<int64_t*>(base + L::kLabel);
  s.a_norm = reinterpret_cast<float*>(base + L::kANorm);
  s.far_d = reinterpret_cast<float*>(base + L::kFarD);
  s.far_j = reinterpret_cast<int64_t*>(base + L::kFarJ);
  s.row_far = reinterpret_cast<int64_t*>(base + L::kRowFar);
  return s;
}

// The tile's row whose pair range holds pair g: the last r with row_off[r] <= g (rows without pairs
// share their offset with the next row, so the last one is the owner).
MEDVL_HD int pair_row(const int64_t* row_off, int64_t g) {
  int lo = 0, hi = kRows;  // answer in [0, kRows)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (row_off[mid] <= g) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Row r's pairs in the chunk [base, base + cnt), as chunk positions [begin, end).
MEDVL_HD void row_segment(const int64_t* row_off, int r, int64_t base, int cnt, int* begin, int* end) {
  int64_t b = row_off[r] - base, e = row_off[r + 1] - base;
  b = b < 0 ? 0 : (b > cnt ? cnt : b);
  e = e < 0 ? 0 : (e > cnt ? cnt : e);
  *begin = static_cast<int>(b);
  *end = static_cast<int>(e);
}

MEDVL_HD void stage_rows(const SemiHardProblem& p, const SemiHardShared& s, int64_t a0, int tid) {
  if (tid <= kRows) {
    const int64_t i = a0 + tid < p.n_a ? a0 + tid : p.n_a;
    s.row_off[tid] = load_ro(p.pair_offsets + i);
  }
  if (tid < kRows) {
    const bool ok = a0 + tid < p.n_a;
    s.label[tid] = ok ? load_ro(p.labels + a0 + tid) : 0;
    s.a_norm[tid] = ok ? load_ro(p.a_norm + a0 + tid) : 0.f;
    s.row_far[tid] = -1;
  }
  s.far_j[tid] = -1;
  s.far_d[tid] = 0.f;
}

MEDVL_HD void stage_chunk(const SemiHardProblem& p, const SemiHardShared& s, int64_t base, int cnt, int tid) {
  for (int q = tid; q < cnt; q += kThreads) {
    const int64_t j = load_ro(p.pair_positive + base + q);
    s.pos_j[q] = (j >= 0 && j < p.n_c) ? j : -1;  // not a candidate: the pair gets -1
    s.pair_d[q] = 0.f;
    s.bucket[q] = kNoKey;
  }
}

// Sweep 1: the d(i, p) of the chunk's pairs whose positive lies in the tile at b0 (S: its dot products).
MEDVL_HD void pick_pair_distances(const SemiHardProblem& p, const SemiHardShared& s, const float* tile,
                                  int64_t b0, int64_t base, int cnt, int tid) {
  for (int q = tid; q < cnt; q += kThreads) {
    const int64_t j = s.pos_j[q];
    if (j < b0 || j >= b0 + kCols) continue;
    const int r = pair_row(s.row_off, base + q);
    s.pair_d[q] = distance(p.distance, tile[r * kLDS + static_cast<int>(j - b0)], s.a_norm[r],
                           load_ro(p.c_norm + j));
  }
}

// Sweep 1, first chunk: this thread's farthest negative so far, over its columns in ascending order.
MEDVL_HD void farthest_negatives(const SemiHardProblem& p, const SemiHardShared& s, const float* tile, int64_t a0,
                                 int64_t b0, int tid) {
  const int r = tid / kLanesPerRow;
  if (a0 + r >= p.n_a) return;
  float best_d = s.far_d[tid];
  int64_t best_j = s.far_j[tid];
  for (int k = 0; k < kColsPerThread; ++k) {
    const int col = tid % kLanesPerRow + kLanesPerRow * k;
    const int64_t j = b0 + col;
    if (j >= p.n_c || load_ro(p.c_labels + j) == s.label[r]) continue;
    const float d = distance(p.distance, tile[r * kLDS + col], s.a_norm[r], load_ro(p.c_norm + j));
    if (best_j < 0 || d > best_d) best_d = d, best_j = j;
  }
  s.far_d[tid] = best_d;
  s.far_j[tid] = best_j;
}

// The kLanesPerRow partial farthest negatives of each row combined with the total order of beats().
MEDVL_HD void reduce_farthest(const SemiHardShared& s, int tid) {
  if (tid >= kRows) return;
  float best_d = 0.f;
  int64_t best_j = -1;
  for (int lane = 0; lane < kLanesPerRow; ++lane) {
    const int t = tid * kLanesPerRow + lane;
    if (beats(s.far_d[t], s.far_j[t], best_d, best_j, true)) best_d = s.far_d[t], best_j = s.far_j[t];
  }
  s.row_far[tid] = best_j;
}

MEDVL_HD int sort_size(int cnt) {
  int n = 1;
  while (n < cnt) n <<= 1;
  return n;
}

MEDVL_HD void make_sort_keys(const SemiHardShared& s, int64_t base, int cnt, int tid) {
  const int n = sort_size(cnt);
  for (int q = tid; q < n; q += kThreads) {
    if (q >= cnt) {
      s.keys[q] = kNoKey;
      continue;
    }
    const unsigned long long row = static_cast<unsigned long long>(pair_row(s.row_off, base + q));
    s.keys[q] = (row << kRowShift) | (static_cast<unsigned long long>(ordered_bits(s.pair_d[q])) << kCapBits) |
                static_cast<unsigned long long>(q);
  }
}

// One compare-exchange stage (k, j) of a bitonic sort of n keys, ascending.
MEDVL_HD void bitonic_stage(unsigned long long* keys, int n, int k, int j, int tid) {
  for (int t = tid; t < n; t += kThreads) {
    const int u = t ^ j;
    if (u <= t) continue;
    const unsigned long long x = keys[t], y = keys[u];
    const bool ascending = (t & k) == 0;
    if ((x > y) == ascending) {
      keys[t] = y;
      keys[u] = x;
    }
  }
}

MEDVL_HD int sorted_pair(unsigned long long key) { return static_cast<int>(key & (kCap - 1)); }

MEDVL_HD void gather_sorted(const SemiHardShared& s, int cnt, int tid) {
  for (int q = tid; q < cnt; q += kThreads) s.sorted_d[q] = s.pair_d[sorted_pair(s.keys[q])];
}

// Sweep 2: this thread's negatives of the tile at b0 into their rows' buckets. Consecutive columns
// that fall into the same bucket are combined before the (shared-memory) atomic.
MEDVL_HD void bucket_negatives(const SemiHardProblem& p, const SemiHardShared& s, const float* tile, int64_t a0,
                               int64_t b0, int64_t base, int cnt, int tid) {
  const int r = tid / kLanesPerRow;
  if (a0 + r >= p.n_a) return;
  int begin, end;
  row_segment(s.row_off, r, base, cnt, &begin, &end);
  if (begin == end) return;
  int pending = -1;
  unsigned long long pending_key = kNoKey;
  for (int k = 0; k < kColsPerThread; ++k) {
    const int col = tid % kLanesPerRow + kLanesPerRow * k;
    const int64_t j = b0 + col;
    if (j >= p.n_c || load_ro(p.c_labels + j) == s.label[r]) continue;
    const float d = distance(p.distance, tile[r * kLDS + col], s.a_norm[r], load_ro(p.c_norm + j));
    const int below = count_below(s.sorted_d + begin, end - begin, d);
    if (below == 0) continue;  // beyond none of the positives
    const int slot = begin + below - 1;
    const unsigned long long key = negative_key(d, j);
    if (slot != pending) {
      if (pending >= 0) atomic_min_key(s.bucket + pending, pending_key);
      pending = slot;
      pending_key = key;
    } else if (key < pending_key) {
      pending_key = key;
    }
  }
  if (pending >= 0) atomic_min_key(s.bucket + pending, pending_key);
}

// Sorted positive q of a row takes the minimum of its row's buckets >= q: a suffix minimum per segment.
MEDVL_HD void suffix_minimum(const SemiHardShared& s, int64_t base, int cnt, int tid) {
  if (tid >= kRows) return;
  int begin, end;
  row_segment(s.row_off, tid, base, cnt, &begin, &end);
  unsigned long long running = kNoKey;
  for (int q = end - 1; q >= begin; --q) {
    if (s.bucket[q] < running) running = s.bucket[q];
    s.bucket[q] = running;
  }
}

MEDVL_HD void write_negatives(const SemiHardProblem& p, const SemiHardShared& s, int64_t base, int cnt, int tid) {
  for (int q = tid; q < cnt; q += kThreads) {
    const unsigned long long key = s.keys[q];
    const int local = sorted_pair(key);
    const int r = static_cast<int>(key >> kRowShift);
    const unsigned long long best = s.bucket[q];
    int64_t negative = s.row_far[r];
    if (s.pos_j[local] < 0) negative = -1;
    else if (best != kNoKey) negative = key_index(best);
    p.negative[base + local] = negative;
  }
}

// The tile's whole algorithm. Block: each(f) runs f(tid) for this thread (GPU) or for every thread in
// turn (host), sync() is the barrier. Tiles: compute(b0) leaves the tile's dot products in `tile`
// (kRows x kLDS floats) and ends with a barrier. Control flow depends on shared values only, read
// after a barrier: every thread takes the same path.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Block, class Tiles>
MEDVL_HD void semi_hard_tile(Block& block, Tiles& tiles, const float* tile, const SemiHardProblem& p,
                             const SemiHardShared& s, int64_t a0) {
  block.each([&](int tid) { stage_rows(p, s, a0, tid); });
  block.sync();
  const int64_t first = s.row_off[0], last = s.row_off[kRows];
  for (int64_t base = first; base < last; base += kCap) {
    const int cnt = static_cast<int>(last - base < kCap ? last - base : kCap);
    const bool first_chunk = base == first;
    block.each([&](int tid) { stage_chunk(p, s, base, cnt, tid); });
    block.sync();
    for (int64_t b0 = 0; b0 < p.n_c; b0 += kCols) {
      tiles.compute(b0);
      block.each([&](int tid) {
        pick_pair_distances(p, s, tile, b0, base, cnt, tid);
        if (first_chunk) farthest_negatives(p, s, tile, a0, b0, tid);
      });
      block.sync();  // the next tile overwrites `tile`
    }
    block.each([&](int tid) {
      make_sort_keys(s, base, cnt, tid);
      if (first_chunk) reduce_farthest(s, tid);
    });
    block.sync();
    const int n = sort_size(cnt);
    for (int k = 2; k <= n; k <<= 1) {
      for (int j = k >> 1; j > 0; j >>= 1) {
        block.each([&](int tid) { bitonic_stage(s.keys, n, k, j, tid); });
        block.sync();
      }
    }
    block.each([&](int tid) { gather_sorted(s, cnt, tid); });
    block.sync();
    for (int64_t b0 = 0; b0 < p.n_c; b0 += kCols) {
      tiles.compute(b0);
      block.each([&](int tid) { bucket_negatives(p, s, tile, a0, b0, base, cnt, tid); });
      block.sync();
    }
    block.each([&](int tid) { suffix_minimum(s, base, cnt, tid); });
    block.sync();
    block.each([&](int tid) { write_negatives(p, s, base, cnt, tid); });
    block.sync();  // the next chunk reuses every shared array
  }
}

}  // namespace mining
}  // namespace medvl
