// CUDA triplet mining: per-anchor running extrema over candidate tiles; nothing of size
// n_anchor x n_candidate is ever allocated or written. The rules, ties included, are those of
// triplet_mining.h / medvl/reference/triplet_mining.py.
//
// Kernels (all 256 threads = 8 warps, all launched on the caller's stream, no host sync):
//
//   row_norms     warp per row: squared norm (fp32 accumulation) of every anchor and candidate row
//                 into the workspace; for the cosine distance the clamped norm max(sqrt(.), 1e-12)
//                 is stored instead. Workspace: 4 (n_anchor + n_candidate) bytes, nothing else.
//
//   mine_tiled    batch-hard (0) and entities (2). A block owns BM = 64 anchors and sweeps the
//                 candidates in tiles of BN = 64. Per tile: S = A_tile C_tile^T (BM x BN, fp32
//                 accumulate) over the whole feature dimension in k-steps of BK = 32 staged in shared
//                 memory (zero-padded past n and past dim), exactly as sigmoid_loss_cuda.cu does it:
//                 tensor cores through nvcuda::wmma for fp16/bf16 (16-bit products are exact in
//                 fp32), plain FMA for fp32 (no TF32). Epilogue: thread t owns anchor row t / 4 and
//                 columns t % 4 + 4 k (k < 16) of every tile, so each thread visits its candidates
//                 in increasing index order and keeps running (value, index) extrema with strict
//                 comparisons (lowest index wins a tie). At the end the 4 threads of a row combine
//                 by two xor shuffles with a total order (value, then lower index), so the result is
//                 the lowest-index extremum, deterministic run to run.
//
//   semi_hard     one block per anchor, its positive pairs in chunks of kCap = 1024 (CSR from
//                 pair_offsets). Per chunk: pair distances (warp per pair), a bitonic sort of the
//                 (distance, pair) keys in shared memory, a sweep over all negatives (warp per
//                 candidate) dropping each negative j into bucket k = #{sorted positives < d_j} with
//                 a 64-bit atomicMin on the key (ordered bits of d_j, j) — min is order-independent,
//                 so this is deterministic, and the key order is "smaller distance, then lower
//                 index" — then a suffix minimum over the buckets (Hillis-Steele in shared memory):
//                 sorted positive q takes the best key of buckets > q, or the farthest negative when
//                 there is none. Anchors with more than kCap pairs sweep the negatives once per
//                 chunk (correct for any count; the workspace does not depend on the pairs).
//
// Distances (fp32, as the CPU kernel and the reference): squared = max(|a|^2 + |c|^2 - 2 <a,c>, 0)
// (euclidean mines identically: sqrt changes no order); cosine = 1 - <a,c> / (max(|a|, 1e-12) *
// max(|c|, 1e-12)), with explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn,
// __fsqrt_rn), so no FMA contraction or fast-math flag can change a bit: on inputs whose dot
// products are exact, results match the reference bit for bit, ties included. Entity scores are
// exact: the key N / D of triplet_mining.h, integers in double and one __ddiv_rn.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "triplet_mining/triplet_mining.h"

namespace medvl {
namespace {

constexpr int kThreads = 256;  // 8 warps; every index mapping below assumes exactly this
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;        // anchors per block (tiled kernel)
constexpr int kBN = 64;        // candidates per tile
constexpr int kBK = 32;        // feature columns per k-step of S
constexpr int kLDS = kBN + 4;  // row stride (floats) of the fp32 S tile

constexpr int kCap = 1024;                                 // semi-hard: pairs per chunk (power of two)
constexpr int kPer = (kCap + 1 + kThreads - 1) / kThreads;  // bucket entries per thread in the scan
constexpr int kStage = 4096;                               // semi-hard: anchor features staged in shared
constexpr unsigned long long kNoKey = ~0ull;

static_assert(kBM == 64 && kBN == 64 && kBK == 32 && kThreads == 256, "mappings below assume these");
static_assert((kCap & (kCap - 1)) == 0, "the bitonic sort needs a power-of-two capacity");

template <typename T>
struct Config {
  static constexpr bool kTensor = !std::is_same<T, float>::value;
  // 16-bit: multiple of 8 elements (WMMA ldm rule), row offset 16 bytes mod 128; fp32: odd stride.
  static constexpr int kLDK = kTensor ? kBK + 8 : kBK + 1;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

#include "common/cuda_score_tile.cuh"

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Tiled kernel: dynamic shared memory layout, in bytes from the (128-byte aligned) base.
template <typename T>
struct TiledSmem {
  using C = Config<T>;
  static constexpr size_t kA = 0;
  static constexpr size_t kB = kA + align128(sizeof(T) * kBM * C::kLDK);
  static constexpr size_t kS = kB + align128(sizeof(T) * kBN * C::kLDK);
  static constexpr size_t kTotal = kS + align128(sizeof(float) * kBM * kLDS);
};

// Semi-hard kernel: fixed part, then min(dim, kStage) fp32 anchor features.
struct SemiSmem {
  static constexpr size_t kKeys = 0;                                                    // u64 [kCap]
  static constexpr size_t kBucket = kKeys + align128(sizeof(unsigned long long) * kCap);  // u64 [kCap + 1]
  static constexpr size_t kPairD = kBucket + align128(sizeof(unsigned long long) * (kCap + 1));  // f32 [kCap]
  static constexpr size_t kSortedD = kPairD + align128(sizeof(float) * kCap);              // f32 [kCap]
  static constexpr size_t kRedD = kSortedD + align128(sizeof(float) * kCap);               // f32 [kWarps]
  static constexpr size_t kRedJ = kRedD + align128(sizeof(float) * kWarps);                // i64 [kWarps]
  static constexpr size_t kRow = kRedJ + align128(sizeof(long long) * kWarps);             // f32 [staged]
  static size_t total(int64_t dim) {
    const int64_t staged = dim < kStage ? dim : kStage;
    return kRow + align128(sizeof(float) * static_cast<size_t>(staged));
  }
};
static_assert(SemiSmem::kRow + sizeof(float) * kStage <= 48 * 1024, "semi-hard kernel must fit in 48 KiB");

struct MineParams {
  const void* a;  // anchors    [n_a, dim]
  const void* c;  // candidates [n_c, dim]
  int64_t n_a;
  int64_t n_c;
  int64_t dim;
  int distance;  // MiningDistance
  bool within;
  bool vec;             // both operands 16-byte aligned and dim % kVec == 0
  const float* a_norm;  // [n_a]: squared norms, or clamped norms for cosine
  const float* c_norm;  // [n_c]
  const int64_t* labels;
  const int64_t* c_labels;
  const int32_t* a_bits;
  const int32_t* c_bits;
  int64_t words[3];
  int64_t total_words;
  double weights[3];  // integers: w_k x denominator
  double lo;          // integers, x denominator
  double hi;
  const int64_t* pair_offsets;
  const int64_t* pair_positive;
  int64_t* positive;
  int64_t* negative;
};

// The pinned distance arithmetic (see the file comment). `na`, `nc`: what row_norms stored.
__device__ __forceinline__ float pair_distance(int distance, float dot, float na, float nc) {
  if (distance == static_cast<int>(MiningDistance::kCosine)) return __fsub_rn(1.f, __fdiv_rn(dot, __fmul_rn(na, nc)));
  const float sq = __fsub_rn(__fadd_rn(na, nc), __fmul_rn(2.f, dot));
  return sq < 0.f ? 0.f : sq;  // the CPU's std::max(sq, 0.f), NaN included
}

// The exact entity score key N / D (triplet_mining.h): the integers are exact in double whatever
// the order or contraction, and the one division rounds to nearest.
__device__ __forceinline__ double entity_key(const MineParams& p, const int32_t* __restrict__ x,
                                             const int32_t* __restrict__ y) {
  double numerator = 0.0, denominator = 1.0;
  int64_t start = 0;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    int both = 0, either = 0;
    for (int64_t w = start; w < start + p.words[k]; ++w) {
      const unsigned u = static_cast<unsigned>(__ldg(x + w));
      const unsigned v = static_cast<unsigned>(__ldg(y + w));
      both += __popc(u & v);
      either += __popc(u | v);
    }
    start += p.words[k];
    if (either == 0) both = either = 1;  // two empty sets: IoU 1
    numerator = numerator * either + p.weights[k] * both * denominator;
    denominator *= either;
  }
  return __ddiv_rn(numerator, denominator);
}

// Monotone map of floats to unsigned keys (-0 folded onto +0 first, so equal floats give equal keys).
__device__ __forceinline__ unsigned ordered_bits(float v) {
  const unsigned b = __float_as_uint(__fadd_rn(v, 0.f));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Warp per row: out[row] = sum_d x[row, d]^2 (fp32), or max(sqrt(that), 1e-12) when `cosine`.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_norms(const T* __restrict__ x, int64_t n, int64_t dim, bool cosine,
                                                      float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= n) return;  // whole warps leave; no block barrier follows
  const T* __restrict__ r = x + row * dim;
  float s = 0.f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = static_cast<float>(r[d]);
    s = fmaf(v, v, s);
  }
  // Xor butterfly: partners add the same two numbers, so every lane ends with the same bits.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) {
    if (cosine) {
      const float norm = __fsqrt_rn(s);
      s = norm < 1e-12f ? 1e-12f : norm;  // the CPU's std::max(norm, 1e-12f)
    }
    out[row] = s;
  }
}

// Running extremum of one thread; `index` < 0: none yet. V: float distances (batch-hard) or the
// double entity keys.
template <typename V>
struct Extremum {
  V value;
  float dist;  // entities: the distance tie-break
  long long index;
};

// Lane-group combine: does `o` beat `m`? Max (`largest`) or min of value, then (entities) of dist
// in the same sense (`dist_largest`), then the lower index.
template <typename V>
__device__ __forceinline__ bool beats(const Extremum<V>& o, const Extremum<V>& m, bool largest, bool use_dist,
                                      bool dist_largest) {
  if (o.index < 0) return false;
  if (m.index < 0) return true;
  if (o.value != m.value) return largest ? o.value > m.value : o.value < m.value;
  if (use_dist && o.dist != m.dist) return dist_largest ? o.dist > m.dist : o.dist < m.dist;
  return o.index < m.index;
}

template <typename V>
__device__ __forceinline__ void combine4(Extremum<V>& m, bool largest, bool use_dist, bool dist_largest) {
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    Extremum<V> o;
    o.value = __shfl_xor_sync(0xffffffffu, m.value, off);
    o.dist = __shfl_xor_sync(0xffffffffu, m.dist, off);
    o.index = __shfl_xor_sync(0xffffffffu, m.index, off);
    if (beats(o, m, largest, use_dist, dist_largest)) m = o;
  }
}

// Batch-hard (kEntities = false) and entities (kEntities = true): one block per 64 anchors.
template <typename T, bool kEntities>
__global__ void __launch_bounds__(kThreads) mine_tiled(const MineParams p) {
  using L = TiledSmem<T>;

  extern __shared__ __align__(128) unsigned char smem[];
  T* a_s = reinterpret_cast<T*>(smem + L::kA);         // [kBM][kLDK]
  T* b_s = reinterpret_cast<T*>(smem + L::kB);         // [kBN][kLDK]
  float* s_s = reinterpret_cast<float*>(smem + L::kS);  // [kBM][kLDS]

  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ c = static_cast<const T*>(p.c);
  const int64_t n_a = p.n_a, n_c = p.n_c, dim = p.dim;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBM;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 4;  // WMMA: 16-row slab of the 64 anchors
  const int wn = warp / 4;  // WMMA: column half
  const int tx = tid % 16;  // FMA path
  const int ty = tid / 16;
  const int er = tid / 4;   // epilogue: anchor row of the tile
  const int eq = tid % 4;   // epilogue: column phase
  const int64_t i = a0 + er;
  const bool row_ok = i < n_a;

  const float na = row_ok ? p.a_norm[i] : 0.f;
  [[maybe_unused]] const int64_t label = (!kEntities && row_ok) ? __ldg(p.labels + i) : 0;
  [[maybe_unused]] const int32_t* a_bits = kEntities && row_ok ? p.a_bits + i * p.total_words : nullptr;

  // Batch-hard: first = farthest positive, second = nearest negative.
  // Entities:   first = highest score (ties: farthest), second = lowest in-range score (ties: nearest).
  using Value = typename std::conditional<kEntities, double, float>::type;
  Extremum<Value> first{0, 0.f, -1}, second{0, 0.f, -1};

  for (int64_t b0 = 0; b0 < n_c; b0 += kBN) {
    score_tile<T>(s_s, a_s, b_s, a, a0, n_a, c, b0, n_c, dim, p.vec, wm, wn, tx, ty);
    __syncthreads();

    // ---- 2. Epilogue: this thread's 16 columns, in increasing candidate index. ----
    if (row_ok) {
#pragma unroll 4
      for (int k = 0; k < kBN / 4; ++k) {
        const int col = eq + 4 * k;
        const int64_t j = b0 + col;
        if (j >= n_c || (p.within && j == i)) continue;
        const float d = pair_distance(p.distance, s_s[er * kLDS + col], na, p.c_norm[j]);
        if constexpr (kEntities) {
          const double s = entity_key(p, a_bits, p.c_bits + j * p.total_words);
          if (first.index < 0 || s > first.value || (s == first.value && d > first.dist)) first = {s, d, j};
          if (s >= p.lo && s < p.hi &&
              (second.index < 0 || s < second.value || (s == second.value && d < second.dist)))
            second = {s, d, j};
        } else {
          if (__ldg(p.c_labels + j) == label) {
            if (first.index < 0 || d > first.value) first = {d, 0.f, j};
          } else {
            if (second.index < 0 || d < second.value) second = {d, 0.f, j};
          }
        }
      }
    }
    __syncthreads();  // s_s is rewritten by the next tile (even when dim == 0 skips the k-loop)
  }

  // ---- The 4 threads of a row are adjacent lanes: combine with a total order, write once. ----
  combine4(first, true, kEntities, true);
  combine4(second, false, kEntities, false);
  if (eq == 0 && row_ok) {
    p.positive[i] = first.index;
    if constexpr (kEntities)
      p.negative[i] = (second.index >= 0 && first.index >= 0 && second.value < first.value) ? second.index : -1;
    else
      p.negative[i] = second.index;
  }
}

// <anchor row, candidate row> by one warp (lanes over d, xor butterfly: every lane gets the sum).
template <typename T>
__device__ __forceinline__ float warp_dot(const float* __restrict__ a_s, const T* __restrict__ a_row,
                                          const T* __restrict__ c_row, int64_t dim, int64_t staged, int lane) {
  float s = 0.f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float av = d < staged ? a_s[d] : static_cast<float>(a_row[d]);
    s = fmaf(av, static_cast<float>(c_row[d]), s);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// Sorts n (a power of two) keys ascending in shared memory. Callers sync before; ends synced.
__device__ __forceinline__ void bitonic_sort(unsigned long long* keys, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < n; t += kThreads) {
        const int u = t ^ j;
        if (u > t) {
          const unsigned long long x = keys[t], y = keys[u];
          const bool up = (t & k) == 0;
          if ((x > y) == up) {
            keys[t] = y;
            keys[u] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Semi-hard: one block per anchor.
template <typename T>
__global__ void __launch_bounds__(kThreads) semi_hard(const MineParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(smem + SemiSmem::kKeys);
  unsigned long long* bucket = reinterpret_cast<unsigned long long*>(smem + SemiSmem::kBucket);
  float* pair_d = reinterpret_cast<float*>(smem + SemiSmem::kPairD);
  float* sorted_d = reinterpret_cast<float*>(smem + SemiSmem::kSortedD);
  float* red_d = reinterpret_cast<float*>(smem + SemiSmem::kRedD);
  long long* red_j = reinterpret_cast<long long*>(smem + SemiSmem::kRedJ);
  float* a_s = reinterpret_cast<float*>(smem + SemiSmem::kRow);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t i = blockIdx.x;
  const int64_t n_c = p.n_c, dim = p.dim;
  const T* __restrict__ a_row = static_cast<const T*>(p.a) + i * dim;
  const T* __restrict__ c = static_cast<const T*>(p.c);
  const int64_t staged = dim < kStage ? dim : kStage;

  const int64_t first = p.pair_offsets[i];
  const int64_t count = p.pair_offsets[i + 1] - first;
  if (count <= 0) return;  // block-uniform: nothing to write
  for (int64_t d = tid; d < staged; d += kThreads) a_s[d] = static_cast<float>(a_row[d]);
  const float na = p.a_norm[i];
  const int64_t label = __ldg(p.labels + i);
  __syncthreads();

  for (int64_t base = 0; base < count; base += kCap) {
    const int cnt = static_cast<int>(count - base < kCap ? count - base : kCap);
    const int64_t* __restrict__ pos = p.pair_positive + first + base;
    int64_t* __restrict__ out = p.negative + first + base;

    // 1. Distances of this chunk's positives (warp per pair; invalid indices get 0 and output -1).
    for (int q = warp; q < cnt; q += kWarps) {
      const int64_t j = pos[q];
      const bool ok = j >= 0 && j < n_c;  // warp-uniform
      const float dot = ok ? warp_dot(a_s, a_row, c + j * dim, dim, staged, lane) : 0.f;
      if (lane == 0) pair_d[q] = ok ? pair_distance(p.distance, dot, na, p.c_norm[j]) : 0.f;
    }
    int n2 = 1;
    while (n2 < cnt) n2 <<= 1;
    for (int k = tid; k <= cnt; k += kThreads) bucket[k] = kNoKey;
    __syncthreads();

    // 2. Sort (distance, pair) ascending.
    for (int q = tid; q < n2; q += kThreads)
      keys[q] = q < cnt ? (static_cast<unsigned long long>(ordered_bits(pair_d[q])) << 32) | static_cast<unsigned>(q)
                        : kNoKey;
    __syncthreads();
    bitonic_sort(keys, n2);
    for (int q = tid; q < cnt; q += kThreads) sorted_d[q] = pair_d[keys[q] & 0xffffffffu];
    __syncthreads();

    // 3. Sweep the negatives in increasing index (per warp): farthest, and buckets.
    float far_d = 0.f;
    long long far_j = -1;
    for (int64_t j = warp; j < n_c; j += kWarps) {
      if ((p.within && j == i) || __ldg(p.c_labels + j) == label) continue;  // warp-uniform
      const float dot = warp_dot(a_s, a_row, c + j * dim, dim, staged, lane);
      if (lane == 0) {
        const float d = pair_distance(p.distance, dot, na, p.c_norm[j]);
        if (far_j < 0 || d > far_d) far_d = d, far_j = j;
        // k = number of sorted positives with distance < d: this negative is beyond exactly those.
        int lo = 0, hi = cnt;
        while (lo < hi) {
          const int mid = (lo + hi) / 2;
          if (sorted_d[mid] < d) lo = mid + 1;
          else hi = mid;
        }
        if (lo > 0)
          atomicMin(&bucket[lo], (static_cast<unsigned long long>(ordered_bits(d)) << 32) |
                                     static_cast<unsigned long long>(j));
      }
    }
    if (lane == 0) {
      red_d[warp] = far_d;
      red_j[warp] = far_j;
    }
    __syncthreads();

    // 4. Suffix minimum over bucket[0 .. cnt] (Hillis-Steele; cnt is block-uniform).
    const int n = cnt + 1;
    for (int off = 1; off < n; off <<= 1) {
      unsigned long long v[kPer];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int k = tid + e * kThreads;
        v[e] = kNoKey;
        if (k + off < n) v[e] = bucket[k] < bucket[k + off] ? bucket[k] : bucket[k + off];
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int k = tid + e * kThreads;
        if (k + off < n) bucket[k] = v[e];
      }
      __syncthreads();
    }

    // 5. The farthest negative (largest distance, then lowest index), then the outputs.
    float fd = 0.f;
    long long fj = -1;
    for (int w = 0; w < kWarps; ++w) {
      const long long j = red_j[w];
      if (j >= 0 && (fj < 0 || red_d[w] > fd || (red_d[w] == fd && j < fj))) fd = red_d[w], fj = j;
    }
    for (int q = tid; q < cnt; q += kThreads) {
      const int local = static_cast<int>(keys[q] & 0xffffffffu);
      const int64_t j = pos[local];
      const unsigned long long best = bucket[q + 1];
      out[local] = (j < 0 || j >= n_c) ? -1 : best != kNoKey ? static_cast<int64_t>(best & 0xffffffffu) : fj;
    }
    __syncthreads();  // the next chunk reuses every shared array
  }
}

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("medvl: triplet_mining_cuda: ") + what + ": " + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
}

void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(std::string("medvl: triplet_mining_cuda: ") + message);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename T>
void launch_norms(const void* x, int64_t n, int64_t dim, bool cosine, float* out, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = (n + kWarps - 1) / kWarps;
  if (blocks > INT_MAX) throw std::invalid_argument("medvl: triplet_mining_cuda: batch too large for one launch");
  row_norms<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const T*>(x), n, dim, cosine, out);
  check_cuda(cudaGetLastError(), "launching the norm kernel");
}

template <typename T>
void run(const TripletMiningArgs& args, cudaStream_t stream) {
  const bool cosine = args.distance == MiningDistance::kCosine;
  float* a_norm = static_cast<float*>(args.workspace);
  float* c_norm = reinterpret_cast<float*>(static_cast<char*>(args.workspace) +
                                           round_up(sizeof(float) * static_cast<size_t>(args.n_anchor)));
  launch_norms<T>(args.anchors, args.n_anchor, args.dim, cosine, a_norm, stream);
  launch_norms<T>(args.candidates, args.n_candidate, args.dim, cosine, c_norm, stream);

  MineParams p{};
  p.a = args.anchors;
  p.c = args.candidates;
  p.n_a = args.n_anchor;
  p.n_c = args.n_candidate;
  p.dim = args.dim;
  p.distance = static_cast<int>(args.distance);
  p.within = args.within;
  p.vec = aligned16(args.anchors) && aligned16(args.candidates) && args.dim % Config<T>::kVec == 0;
  p.a_norm = a_norm;
  p.c_norm = c_norm;
  p.labels = args.labels;
  p.c_labels = args.candidate_labels;
  p.a_bits = args.anchor_bits;
  p.c_bits = args.candidate_bits;
  p.total_words = 0;
  for (int k = 0; k < 3; ++k) {
    p.words[k] = args.entity_words[k];
    p.weights[k] = args.entity_weights[k];
    p.total_words += args.entity_words[k];
  }
  p.lo = args.score_low;
  p.hi = args.score_high;
  p.pair_offsets = args.pair_offsets;
  p.pair_positive = args.pair_positive;
  p.positive = args.positive;
  p.negative = args.negative;

  if (args.strategy == MiningStrategy::kSemiHard) {
    if (args.n_anchor > INT_MAX) throw std::invalid_argument("medvl: triplet_mining_cuda: too many anchors for one launch");
    const size_t smem = SemiSmem::total(args.dim);
    semi_hard<T><<<static_cast<unsigned>(args.n_anchor), kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching the semi-hard kernel");
    return;
  }
  const int64_t blocks = (args.n_anchor + kBM - 1) / kBM;
  const size_t smem = TiledSmem<T>::kTotal;
  static_assert(TiledSmem<T>::kTotal <= 48 * 1024, "tiled kernel must fit in 48 KiB of shared memory");
  if (args.strategy == MiningStrategy::kEntities) {
    mine_tiled<T, true><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching the entity-mining kernel");
  } else {
    mine_tiled<T, false><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching the batch-hard kernel");
  }
}

}  // namespace

size_t triplet_mining_cuda_workspace_bytes(int64_t n_anchor, int64_t n_candidate, int64_t dim, int strategy,
                                           int64_t max_pairs_per_anchor) {
  (void)dim;
  (void)max_pairs_per_anchor;  // semi-hard works in chunks of shared memory: no per-pair workspace
  require(strategy >= 0 && strategy <= 2, "unknown mining strategy code");
  require(n_anchor >= 0 && n_candidate >= 0, "sizes must be non-negative");
  // The fp32 norms of every anchor and every candidate row.
  return round_up(sizeof(float) * static_cast<size_t>(n_anchor)) +
         round_up(sizeof(float) * static_cast<size_t>(n_candidate));
}

void triplet_mining_cuda(const TripletMiningArgs& args, void* stream) {
  require(args.n_anchor >= 0 && args.n_candidate >= 0 && args.dim >= 0, "sizes must be non-negative");
  require(args.n_candidate <= INT32_MAX, "more than 2^31 - 1 candidates");
  const int strategy = static_cast<int>(args.strategy);
  require(strategy >= 0 && strategy <= 2, "unknown mining strategy code");
  const int distance = static_cast<int>(args.distance);
  require(distance >= 0 && distance <= 2, "unknown mining distance code");
  const size_t need = triplet_mining_cuda_workspace_bytes(args.n_anchor, args.n_candidate, args.dim, strategy, 0);
  require(args.workspace_bytes >= need, "workspace too small (see triplet_mining_cuda_workspace_bytes)");
  if (args.n_anchor == 0) return;  // nothing to write
  require(args.workspace != nullptr && reinterpret_cast<uintptr_t>(args.workspace) % 4 == 0,
          "null or misaligned workspace pointer");
  if (args.dim > 0) {
    require(args.anchors != nullptr, "null anchors pointer");
    require(args.n_candidate == 0 || args.candidates != nullptr, "null candidates pointer");
  }
  require(args.negative != nullptr, "null negative pointer");
  switch (args.strategy) {
    case MiningStrategy::kBatchHard:
      require(args.positive != nullptr, "batch_hard needs the positive output");
      require(args.labels != nullptr && (args.n_candidate == 0 || args.candidate_labels != nullptr),
              "batch_hard needs labels and candidate_labels");
      break;
    case MiningStrategy::kSemiHard:
      require(args.labels != nullptr && (args.n_candidate == 0 || args.candidate_labels != nullptr),
              "semi_hard needs labels and candidate_labels");
      require(args.pair_offsets != nullptr, "semi_hard needs pair_offsets (and pair_positive)");
      break;
    case MiningStrategy::kEntities: {
      require(args.positive != nullptr, "entities needs the positive output");
      int64_t words = 0;
      for (int k = 0; k < 3; ++k) {
        require(args.entity_words[k] >= 0, "entity_words must be non-negative");
        words += args.entity_words[k];
      }
      require(words == 0 || (args.anchor_bits != nullptr && (args.n_candidate == 0 || args.candidate_bits != nullptr)),
              "entities needs anchor_bits and candidate_bits");
      break;
    }
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32: run<float>(args, s); return;
    case DType::kFloat16: run<__half>(args, s); return;
    case DType::kBFloat16: run<__nv_bfloat16>(args, s); return;
  }
  require(false, "unknown dtype");
}

}  // namespace medvl
