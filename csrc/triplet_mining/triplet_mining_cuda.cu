// CUDA triplet mining: per-anchor running extrema over candidate tiles; nothing of size
// n_anchor x n_candidate is ever allocated or written. The rules, ties included, are those of
// triplet_mining.h / medvl/reference/triplet_mining.py.
//
// Kernels (all 256 threads = 8 warps, all launched on the caller's stream, no host sync):
//
//   row_norms     warp per row: squared norm (fp32 accumulation) of every anchor and candidate row
//                 into the workspace; for the cosine distance the clamped norm max(sqrt(.), 1e-12)
//                 is stored instead.
//
//   mine_tiled    batch-hard (0) and entities (2). A block owns BM = 64 anchors and sweeps its
//                 candidates in tiles of BN = 64. Per tile: S = A_tile C_tile^T (BM x BN, fp32
//                 accumulate) over the whole feature dimension in k-steps of BK = 32 staged in shared
//                 memory (zero-padded past n and past dim), exactly as sigmoid_loss_cuda.cu does it:
//                 tensor cores through nvcuda::wmma for fp16/bf16 (16-bit products are exact in
//                 fp32), plain FMA for fp32 (no TF32). Epilogue: thread t owns anchor row t / 4 and
//                 columns t % 4 + 4 k (k < 16) of every tile, so each thread visits its candidates
//                 in increasing index order and keeps running (value, index) extrema with strict
//                 comparisons (lowest index wins a tie). At the end the 4 threads of a row combine
//                 by two xor shuffles with a total order (value, then lower index).
//                 Candidate split (grid.y, small batches): with few anchor tiles the candidates are
//                 split into grid.y contiguous ranges of whole tiles (mining_splits: a function of the
//                 shapes only); each block writes its extrema to the workspace and combine_splits
//                 folds them per anchor in ascending split order with the same total order, so the
//                 result is the unsplit one, bit for bit, on any GPU.
//
//   semi_hard_tiled  A block owns the same 64 anchors and S tiles, and runs the tile algorithm of
//                 mining_tile.h (shared with the host emulation that the tests run): sweep 1 reads
//                 every pair's d(i, p) out of the tiles, the pairs are sorted per anchor in shared
//                 memory, sweep 2 drops every negative into its anchor's bucket of "positives it lies
//                 beyond" (64-bit shared-memory atomicMin on (distance, index) keys: order-independent,
//                 so deterministic), and a suffix minimum per anchor gives each pair its negative.
//                 Candidates are read once per tile sweep for 64 anchors (the previous kernel read
//                 them once per anchor), tiles computed twice per chunk of kCap = 1024 pairs.
//
// Distances (fp32, as the CPU kernel and the reference): mining::distance of mining_tile.h, with
// explicit round-to-nearest intrinsics, so no FMA contraction or fast-math flag can change a bit: on
// inputs whose dot products are exact, results match the reference bit for bit, ties included. Entity
// scores are exact: the key N / D of triplet_mining.h, integers in double and one __ddiv_rn.
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

#include "common/cuda_check.h"
#include "triplet_mining/mining_tile.h"
#include "triplet_mining/triplet_mining.h"

namespace medvl {
namespace {

// Errors name this entry point (common/cuda_check.h).
constexpr const char* kEntry = "triplet_mining_cuda";
void require(bool ok, const std::string& message) { medvl::require(ok, kEntry, message); }
void check_cuda(cudaError_t status, const char* what) { medvl::check_cuda(status, kEntry, what); }

constexpr int kThreads = 256;  // 8 warps; every index mapping below assumes exactly this
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;        // anchors per block (tiled kernel)
constexpr int kBN = 64;        // candidates per tile
constexpr int kBK = 32;        // feature columns per k-step of S
constexpr int kLDS = kBN + 4;  // row stride (floats) of the fp32 S tile

// Candidate splits of mine_tiled: enough blocks for about kTargetBlocks (a few waves on a 132-SM GPU)
// when the anchor tiles alone are fewer, each split at least kMinTilesPerSplit tiles long. Not
// measured: settle on the GPU with bench/bench_triplet_mining.py.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMinTilesPerSplit = 4;
constexpr int64_t kMaxSplits = 64;

static_assert(kBM == 64 && kBN == 64 && kBK == 32 && kThreads == 256, "mappings below assume these");
static_assert(kBM == mining::kRows && kBN == mining::kCols && kThreads == mining::kThreads && kLDS == mining::kLDS,
              "the semi-hard tile algorithm shares the score tile's geometry");

template <typename T>
struct Config {
  static constexpr bool kTensor = !std::is_same<T, float>::value;
  // 16-bit: multiple of 8 elements (WMMA ldm rule), row offset 16 bytes mod 128; fp32: odd stride.
  static constexpr int kLDK = kTensor ? kBK + 8 : kBK + 1;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

#include "common/cuda_score_tile.cuh"

using mining::align128;

// Tiled kernel: dynamic shared memory layout, in bytes from the (128-byte aligned) base.
template <typename T>
struct TiledSmem {
  using C = Config<T>;
  static constexpr size_t kA = 0;
  static constexpr size_t kB = kA + align128(sizeof(T) * kBM * C::kLDK);
  static constexpr size_t kS = kB + align128(sizeof(T) * kBN * C::kLDK);
  static constexpr size_t kTotal = kS + align128(sizeof(float) * kBM * kLDS);
};

// Semi-hard kernel: the score tile's staging, then mining_tile.h's shared state.
template <typename T>
struct SemiTiledSmem {
  static constexpr size_t kMining = TiledSmem<T>::kTotal;
  static constexpr size_t kTotal = kMining + mining::SemiHardSharedBytes::kTotal;
};

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
  int64_t candidates_per_split;  // mine_tiled: a multiple of kBN
  double* part_value;            // grid.y > 1: [2][splits][n_a] extrema values (float distances or keys)
  float* part_dist;              // [2][splits][n_a] their distances (entities' tie-break)
  int64_t* part_index;           // [2][splits][n_a] their indices
};

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
// Anchor i's triplet from its two extrema: entities keep the negative only when it scores strictly below
// the positive (else -1, no triplet).
template <bool kEntities, typename V>
__device__ __forceinline__ void write_result(const MineParams& p, int64_t i, const Extremum<V>& first,
                                             const Extremum<V>& second) {
  p.positive[i] = first.index;
  if constexpr (kEntities)
    p.negative[i] = (second.index >= 0 && first.index >= 0 && second.value < first.value) ? second.index : -1;
  else
    p.negative[i] = second.index;
}

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

  // This block's candidates: split blockIdx.y of whole tiles (all of them without a split).
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * p.candidates_per_split;
  const int64_t c_end = c_begin + p.candidates_per_split < n_c ? c_begin + p.candidates_per_split : n_c;
  for (int64_t b0 = c_begin; b0 < c_end; b0 += kBN) {
    score_tile<T>(s_s, a_s, b_s, a, a0, n_a, c, b0, n_c, dim, p.vec, wm, wn, tx, ty);
    __syncthreads();

    // ---- 2. Epilogue: this thread's 16 columns, in increasing candidate index. ----
    if (row_ok) {
#pragma unroll 4
      for (int k = 0; k < kBN / 4; ++k) {
        const int col = eq + 4 * k;
        const int64_t j = b0 + col;
        if (j >= c_end || (p.within && j == i)) continue;
        const float d = mining::distance(p.distance, s_s[er * kLDS + col], na, p.c_norm[j]);
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
  if (eq != 0 || !row_ok) return;
  if (gridDim.y > 1) {  // this split's extrema; combine_splits folds them
    const int64_t at = static_cast<int64_t>(blockIdx.y) * n_a + i;
    const int64_t other = static_cast<int64_t>(gridDim.y) * n_a;
    p.part_value[at] = first.value;
    p.part_dist[at] = first.dist;
    p.part_index[at] = first.index;
    p.part_value[other + at] = second.value;
    p.part_dist[other + at] = second.dist;
    p.part_index[other + at] = second.index;
    return;
  }
  write_result<kEntities>(p, i, first, second);
}

// Thread per anchor: the splits' extrema folded in ascending split order (ascending candidates) with
// the total order of beats(), as one unsplit sweep would have kept them.
template <bool kEntities>
__global__ void __launch_bounds__(kThreads) combine_splits(const MineParams p, int64_t splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.n_a) return;
  Extremum<double> first{0, 0.f, -1}, second{0, 0.f, -1};
  const int64_t other = splits * p.n_a;
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t at = s * p.n_a + i;
    const Extremum<double> f{p.part_value[at], p.part_dist[at], p.part_index[at]};
    const Extremum<double> g{p.part_value[other + at], p.part_dist[other + at], p.part_index[other + at]};
    if (beats(f, first, true, kEntities, true)) first = f;
    if (beats(g, second, false, kEntities, false)) second = g;
  }
  write_result<kEntities>(p, i, first, second);
}

// The block and score-tile policies of mining::semi_hard_tile on the GPU (the host emulation has its own).
struct DeviceBlock {
  __device__ __forceinline__ void sync() { __syncthreads(); }
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(static_cast<int>(threadIdx.x));
  }
};

template <typename T>
struct DeviceTiles {
  float* s_s;
  T* a_s;
  T* b_s;
  const T* a;
  const T* c;
  int64_t a0, n_a, n_c, dim;
  bool vec;
  int wm, wn, tx, ty;
  __device__ __forceinline__ void compute(int64_t b0) {
    score_tile<T>(s_s, a_s, b_s, a, a0, n_a, c, b0, n_c, dim, vec, wm, wn, tx, ty);
    __syncthreads();
  }
};

// Semi-hard: one block per 64 anchors (mining_tile.h).
template <typename T>
__global__ void __launch_bounds__(kThreads) semi_hard_tiled(const MineParams p) {
  using L = TiledSmem<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  DeviceTiles<T> tiles{reinterpret_cast<float*>(smem + L::kS), reinterpret_cast<T*>(smem + L::kA),
                       reinterpret_cast<T*>(smem + L::kB), static_cast<const T*>(p.a), static_cast<const T*>(p.c),
                       static_cast<int64_t>(blockIdx.x) * kBM, p.n_a, p.n_c, p.dim, p.vec, warp % 4, warp / 4,
                       tid % 16, tid / 16};
  const mining::SemiHardProblem problem{p.n_a, p.n_c, p.distance, p.a_norm, p.c_norm, p.labels, p.c_labels,
                                        p.pair_offsets, p.pair_positive, p.negative};
  const mining::SemiHardShared shared = mining::semi_hard_shared(smem + SemiTiledSmem<T>::kMining);
  DeviceBlock block;
  mining::semi_hard_tile(block, tiles, tiles.s_s, problem, shared, tiles.a0);
}



bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename T>
void launch_norms(const void* x, int64_t n, int64_t dim, bool cosine, float* out, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = (n + kWarps - 1) / kWarps;
  require(blocks <= INT_MAX, "batch too large for one launch");
  row_norms<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const T*>(x), n, dim, cosine, out);
  check_cuda(cudaGetLastError(), "launching the norm kernel");
}

// Candidate splits of mine_tiled: a function of the shapes only (the result does not depend on it anyway).
struct Splits {
  int64_t count;
  int64_t candidates_per_split;  // a multiple of kBN
};

Splits mining_splits(int64_t n_anchor, int64_t n_candidate) {
  const int64_t anchor_tiles = (n_anchor + kBM - 1) / kBM;
  const int64_t candidate_tiles = (n_candidate + kBN - 1) / kBN;
  if (anchor_tiles == 0 || candidate_tiles == 0) return Splits{1, kBN};
  int64_t want = (kTargetBlocks + anchor_tiles - 1) / anchor_tiles;
  const int64_t by_length = candidate_tiles / kMinTilesPerSplit;
  if (want > by_length) want = by_length;
  if (want > kMaxSplits) want = kMaxSplits;
  if (want < 1) want = 1;
  const int64_t tiles_per_split = (candidate_tiles + want - 1) / want;
  // Recounted so that no split is empty.
  return Splits{(candidate_tiles + tiles_per_split - 1) / tiles_per_split, tiles_per_split * kBN};
}

// Workspace: the fp32 norms of every anchor and candidate row, then (mine_tiled with a split) the
// splits' extrema: values (double), distances (float), indices, each [2][splits][n_anchor].
struct Workspace {
  size_t a_norm, c_norm, part_value, part_dist, part_index, total;
};

Workspace workspace_layout(int64_t n_anchor, int64_t n_candidate, int strategy) {
  Workspace w{};
  w.a_norm = 0;
  w.c_norm = round_up(sizeof(float) * static_cast<size_t>(n_anchor));
  w.part_value = w.c_norm + round_up(sizeof(float) * static_cast<size_t>(n_candidate));
  size_t partials = 0;
  if (strategy != static_cast<int>(MiningStrategy::kSemiHard)) {
    const Splits s = mining_splits(n_anchor, n_candidate);
    if (s.count > 1) partials = 2 * static_cast<size_t>(s.count) * static_cast<size_t>(n_anchor);
  }
  w.part_dist = w.part_value + round_up(sizeof(double) * partials);
  w.part_index = w.part_dist + round_up(sizeof(float) * partials);
  w.total = w.part_index + round_up(sizeof(int64_t) * partials);
  return w;
}

template <typename T>
void run(const TripletMiningArgs& args, cudaStream_t stream) {
  const bool cosine = args.distance == MiningDistance::kCosine;
  const Workspace layout = workspace_layout(args.n_anchor, args.n_candidate, static_cast<int>(args.strategy));
  char* workspace = static_cast<char*>(args.workspace);
  float* a_norm = reinterpret_cast<float*>(workspace + layout.a_norm);
  float* c_norm = reinterpret_cast<float*>(workspace + layout.c_norm);
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

  const int64_t blocks = (args.n_anchor + kBM - 1) / kBM;
  require(blocks <= INT_MAX, "too many anchors for one launch");
  if (args.strategy == MiningStrategy::kSemiHard) {
    constexpr size_t smem = SemiTiledSmem<T>::kTotal;
    static_assert(SemiTiledSmem<T>::kTotal <= 99 * 1024, "semi-hard tiles must fit every sm_8x/sm_90 opt-in limit");
    check_cuda(cudaFuncSetAttribute(semi_hard_tiled<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "allowing the semi-hard kernel its shared memory");
    semi_hard_tiled<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching the semi-hard kernel");
    return;
  }
  const Splits splits = mining_splits(args.n_anchor, args.n_candidate);
  p.candidates_per_split = splits.candidates_per_split;
  p.part_value = reinterpret_cast<double*>(workspace + layout.part_value);
  p.part_dist = reinterpret_cast<float*>(workspace + layout.part_dist);
  p.part_index = reinterpret_cast<int64_t*>(workspace + layout.part_index);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits.count));
  const size_t smem = TiledSmem<T>::kTotal;
  static_assert(TiledSmem<T>::kTotal <= 48 * 1024, "tiled kernel must fit in 48 KiB of shared memory");
  const unsigned combine_blocks = static_cast<unsigned>((args.n_anchor + kThreads - 1) / kThreads);
  if (args.strategy == MiningStrategy::kEntities) {
    mine_tiled<T, true><<<grid, kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching the entity-mining kernel");
    if (splits.count > 1) combine_splits<true><<<combine_blocks, kThreads, 0, stream>>>(p, splits.count);
  } else {
    mine_tiled<T, false><<<grid, kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "launching the batch-hard kernel");
    if (splits.count > 1) combine_splits<false><<<combine_blocks, kThreads, 0, stream>>>(p, splits.count);
  }
  if (splits.count > 1) check_cuda(cudaGetLastError(), "launching the split-combining kernel");
}

}  // namespace

size_t triplet_mining_cuda_workspace_bytes(int64_t n_anchor, int64_t n_candidate, int64_t dim, int strategy,
                                           int64_t max_pairs_per_anchor) {
  (void)dim;
  (void)max_pairs_per_anchor;  // semi-hard works in chunks of shared memory: no per-pair workspace
  require(strategy >= 0 && strategy <= 2, "unknown mining strategy code");
  require(n_anchor >= 0 && n_candidate >= 0, "sizes must be non-negative");
  return workspace_layout(n_anchor, n_candidate, strategy).total;
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
  require(args.workspace != nullptr && reinterpret_cast<uintptr_t>(args.workspace) % 8 == 0,
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
      require(args.pair_offsets != nullptr && args.pair_positive != nullptr, "semi_hard needs pair_offsets and pair_positive");
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
  with_cuda_type(args.dtype, kEntry, [&](auto element) { run<decltype(element)>(args, s); });
}

}  // namespace medvl
