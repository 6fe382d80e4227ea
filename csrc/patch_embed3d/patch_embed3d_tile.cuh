#pragma once
// The CUDA patch embedding's tile machinery that does not need a GPU: scalars and the window, token and
// column slots, kernel parameters and shared-memory layouts, staging (gathers, vector gathers), the
// fp32 FMA tile, the epilogues and the host-side parameter set-up. Every device function here is
// __host__ __device__ and takes the thread index as an argument, so that patch_embed3d_emulation.cpp
// (compiled by tests/ops/test_patch_embed3d.py with a host compiler) runs the kernels' phases thread by
// thread for fp32 weights and checks them against the reference without a GPU. patch_embed3d_cuda.cu
// adds the WMMA tile, the kernels and the launches; its file comment describes the design.
// Included by exactly one translation unit per program (an anonymous namespace).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/cuda_check.h"
#include "patch_embed3d/patch_embed3d.h"

#ifdef __CUDA_ARCH__
#define MEDVL_PE_UNROLL _Pragma("unroll")
#else
#define MEDVL_PE_UNROLL
#endif


namespace medvl {
namespace {


constexpr int kThreads = 256;  // 8 warps; every index mapping below assumes exactly this
constexpr int kBM = 64;        // C tile rows
constexpr int kBN = 64;        // C tile columns
constexpr int kBK = 32;        // reduction step
constexpr int kLDC = kBN + 4;  // row stride (floats) of the fp32 C tile; multiple of 4 (WMMA store)
constexpr int kSlots = 64;     // token / column slots: max(kBM, kBN, kBK)

// grad_weight token splits: aim at ~8 resident blocks on ~132 SMs, each split at least 8 steps long.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinStepsPerSplit = 8;
constexpr int64_t kMaxSplits = 256;

static_assert(kBM == 64 && kBN == 64 && kBK == 32 && kThreads == 256, "mappings below assume these");
static_assert(kSlots >= kBM && kSlots >= kBN && kSlots >= kBK, "slots must cover every tile side");

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// ------------------------------------------------------------------------------------------------
// Scalars: conversions, loads, the window.
// ------------------------------------------------------------------------------------------------

template <typename U>
__host__ __device__ __forceinline__ U ldg(const U* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Loaded through their bit patterns: __ldg has no __half / __nv_bfloat16 overload on every toolkit.
__host__ __device__ __forceinline__ float half_bits_to_float(unsigned short b) { return __half2float(__ushort_as_half(b)); }
__host__ __device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}

// Integer volumes convert exactly (|x| < 2^24), as volume.to(float32) does.
__host__ __device__ __forceinline__ float load_voxel(const void* volume, VolumeType type, int64_t i) {
  switch (type) {
    case VolumeType::kFloat32: return ldg(static_cast<const float*>(volume) + i);
    case VolumeType::kFloat16: return half_bits_to_float(ldg(static_cast<const unsigned short*>(volume) + i));
    case VolumeType::kBFloat16: return bf16_bits_to_float(ldg(static_cast<const unsigned short*>(volume) + i));
    case VolumeType::kInt16: return static_cast<float>(ldg(static_cast<const short*>(volume) + i));
    case VolumeType::kUInt8: return static_cast<float>(ldg(static_cast<const unsigned char*>(volume) + i));
    case VolumeType::kUInt16: break;
  }
  return static_cast<float>(ldg(static_cast<const unsigned short*>(volume) + i));
}

__host__ __device__ __forceinline__ void store_out(void* dst, DType type, int64_t i, float v) {
  switch (type) {
    case DType::kFloat32: static_cast<float*>(dst)[i] = v; return;
    case DType::kFloat16: static_cast<__half*>(dst)[i] = __float2half_rn(v); return;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(v); return;
  }
}

// Bytes per voxel, and voxels per 16-byte run (vector gathers).
__host__ __device__ __forceinline__ int voxel_bytes(VolumeType type) {
  switch (type) {
    case VolumeType::kFloat32: return 4;
    case VolumeType::kUInt8: return 1;
    default: return 2;
  }
}
__host__ __device__ __forceinline__ int run_length(VolumeType type) { return 16 / voxel_bytes(type); }

__host__ __device__ __forceinline__ float bits_to_float(unsigned b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

// The N = run_length(type) voxels of the 16-byte aligned run at element i as floats (exact, as
// load_voxel). N is a template argument so that the run stays in registers.
template <int N>
__host__ __device__ __forceinline__ void load_run(const void* volume, VolumeType type, int64_t i, float (&v)[N]) {
  const uint4 bits = ldg(reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(volume) +
                                                        i * voxel_bytes(type)));
  const unsigned w[4] = {bits.x, bits.y, bits.z, bits.w};
  if constexpr (N == 4) {  // fp32
    MEDVL_PE_UNROLL
    for (int e = 0; e < 4; ++e) v[e] = bits_to_float(w[e]);
  } else if constexpr (N == 16) {  // uint8
    MEDVL_PE_UNROLL
    for (int e = 0; e < 16; ++e) v[e] = static_cast<float>((w[e / 4] >> (8 * (e % 4))) & 0xffu);
  } else {  // 2-byte voxels
    static_assert(N == 8, "runs hold 4, 8 or 16 voxels");
    unsigned short h[8];
    MEDVL_PE_UNROLL
    for (int e = 0; e < 8; ++e) h[e] = static_cast<unsigned short>(w[e / 2] >> (16 * (e % 2)));
    switch (type) {
      case VolumeType::kFloat16:
        MEDVL_PE_UNROLL
        for (int e = 0; e < 8; ++e) v[e] = half_bits_to_float(h[e]);
        break;
      case VolumeType::kBFloat16:
        MEDVL_PE_UNROLL
        for (int e = 0; e < 8; ++e) v[e] = bf16_bits_to_float(h[e]);
        break;
      case VolumeType::kInt16:
        MEDVL_PE_UNROLL
        for (int e = 0; e < 8; ++e) v[e] = static_cast<float>(static_cast<short>(h[e]));
        break;
      default:
        MEDVL_PE_UNROLL
        for (int e = 0; e < 8; ++e) v[e] = static_cast<float>(h[e]);
        break;
    }
  }
}

// The host validates that a gradient volume has a float type.
__host__ __device__ __forceinline__ void store_grad_voxel(void* dst, VolumeType type, int64_t i, float v) {
  if (type == VolumeType::kFloat16)
    static_cast<__half*>(dst)[i] = __float2half_rn(v);
  else if (type == VolumeType::kBFloat16)
    static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(dst)[i] = v;
}

// Round-to-nearest arithmetic that no -fmad or fast-math setting can fuse or approximate (the host
// versions keep the helpers compilable as __host__ __device__; x86-64 SSE is IEEE single).
__host__ __device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// The window's bounds and slope in fp32 (make_window).
struct Window {
  bool on;
  float lo, hi, slope, out_lo, out_hi;
};

// u = (x - lo) * r + out_lo, each operation rounded (see the file comment).
__host__ __device__ __forceinline__ float window_unclipped(float x, const Window& w) {
  return add_rn(mul_rn(sub_rn(x, w.lo), w.slope), w.out_lo);
}

// torch.clamp = min(max(u, out_lo), out_hi) with NaN propagated (the CPU kernel's std::min/std::max
// form); fminf/fmaxf would turn a NaN voxel into out_lo.
__host__ __device__ __forceinline__ float window_value(float x, const Window& w) {
  if (!w.on) return x;
  const float u = window_unclipped(x, w);
  const float m = u < w.out_lo ? w.out_lo : u;
  return w.out_hi < m ? w.out_hi : m;
}

// The clamp passes the gradient strictly inside the window, times the slope (0 on the bounds: x == lo
// or x == hi happens, e.g. a zero background under a (0, ...) window).
__host__ __device__ __forceinline__ float window_grad(float g, float x, const Window& w) {
  if (!w.on) return g;
  return (x > w.lo && x < w.hi) ? mul_rn(g, w.slope) : 0.f;
}

__host__ __device__ __forceinline__ unsigned float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  unsigned b;
  memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// The gradients of the N = run_length(type) voxels of the 16-byte aligned run at element i (a float
// volume: N = 4 for fp32, 8 for fp16/bf16), rounded as store_grad_voxel rounds them.
template <int N>
__host__ __device__ __forceinline__ void store_grad_run(void* dst, VolumeType type, int64_t i, const float (&g)[N]) {
  unsigned w[4];
  if constexpr (N == 4) {
    MEDVL_PE_UNROLL
    for (int e = 0; e < 4; ++e) w[e] = float_to_bits(g[e]);
  } else {
    static_assert(N == 8, "float volumes have runs of 4 or 8 voxels");
    MEDVL_PE_UNROLL
    for (int e = 0; e < 4; ++e) {
      const bool half = type == VolumeType::kFloat16;
      const unsigned lo = half ? __half_as_ushort(__float2half_rn(g[2 * e]))
                               : __bfloat16_as_ushort(__float2bfloat16_rn(g[2 * e]));
      const unsigned hi = half ? __half_as_ushort(__float2half_rn(g[2 * e + 1]))
                               : __bfloat16_as_ushort(__float2bfloat16_rn(g[2 * e + 1]));
      w[e] = lo | (hi << 16);
    }
  }
  *reinterpret_cast<uint4*>(static_cast<unsigned char*>(dst) + i * voxel_bytes(type)) =
      make_uint4(w[0], w[1], w[2], w[3]);
}

// ------------------------------------------------------------------------------------------------
// Index arithmetic: token and column slots.
// ------------------------------------------------------------------------------------------------

struct Geometry {
  int64_t size[3];
  int64_t grid[3];
  int patch[3];
  int64_t tokens;          // per volume: grid0 * grid1 * grid2
  int64_t rows;            // M = batch * tokens
  int64_t cols;            // K = channels * p0 * p1 * p2 (<= INT_MAX)
  int64_t plane;           // size1 * size2
  int64_t channel_stride;  // size0 * plane
  int64_t batch_stride;    // channels * channel_stride
};

// A token's patch origin as a flat offset, and how many of the patch's p_i positions along each axis
// lie inside the volume (0 on every axis for a token past the end: nothing of it is inside).
struct TokenSlot {
  int64_t base;
  int64_t n;  // t mod tokens: the pos_embed row
  int room0, room1, room2;
  int pad;
};

// A column's offset inside a patch and its (q0, q1, q2); INT_MAX for a column past K.
struct ColumnSlot {
  int64_t offset;
  int q0, q1, q2;
  int pad;
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__host__ __device__ __forceinline__ TokenSlot token_slot(const Geometry& g, int64_t t, int64_t t_end) {
  TokenSlot s{0, 0, 0, 0, 0, 0};
  if (t < 0 || t >= t_end) return s;
  const int64_t b = t / g.tokens;
  int64_t n = t - b * g.tokens;
  s.n = n;
  const int64_t g2 = n % g.grid[2];
  n /= g.grid[2];
  const int64_t g1 = n % g.grid[1];
  const int64_t g0 = n / g.grid[1];
  const int64_t o0 = g0 * g.patch[0], o1 = g1 * g.patch[1], o2 = g2 * g.patch[2];
  s.base = b * g.batch_stride + o0 * g.plane + o1 * g.size[2] + o2;
  // Clamped to the patch so they fit an int; q_i < p_i always.
  s.room0 = static_cast<int>(min64(g.size[0] - o0, g.patch[0]));
  s.room1 = static_cast<int>(min64(g.size[1] - o1, g.patch[1]));
  s.room2 = static_cast<int>(min64(g.size[2] - o2, g.patch[2]));
  return s;
}

__host__ __device__ __forceinline__ ColumnSlot column_slot(const Geometry& g, int64_t k) {
  ColumnSlot s{0, INT_MAX, INT_MAX, INT_MAX, 0};
  if (k < 0 || k >= g.cols) return s;
  // K <= INT_MAX (validated): 32-bit division is several times cheaper than 64-bit on the GPU.
  int r = static_cast<int>(k);
  s.q2 = r % g.patch[2];
  r /= g.patch[2];
  s.q1 = r % g.patch[1];
  r /= g.patch[1];
  s.q0 = r % g.patch[0];
  const int c = r / g.patch[0];
  s.offset = c * g.channel_stride + s.q0 * g.plane + static_cast<int64_t>(s.q1) * g.size[2] + s.q2;
  return s;
}

__host__ __device__ __forceinline__ bool inside(const TokenSlot& t, const ColumnSlot& c) {
  return c.q0 < t.room0 && c.q1 < t.room1 && c.q2 < t.room2;
}

// ------------------------------------------------------------------------------------------------
// Kernel parameters and shared memory layout.
// ------------------------------------------------------------------------------------------------

struct Params {
  Geometry g;
  Window w;
  const void* volume;
  VolumeType volume_type;
  const void* weight;  // [E, K], the kernel's weight storage type
  const float* bias;
  const float* pos;
  void* out;
  DType out_type;
  const void* grad_out;  // [M, E]
  DType grad_out_type;
  float* grad_weight;  // grad_weight pass: [splits][E, K] (the workspace) or [E, K] (one split)
  void* grad_volume;
  int64_t embed;             // E
  int64_t tokens_per_split;  // grad_weight: a multiple of kBK
  bool vec_weight;           // 16-byte weight rows: aligned base, K a multiple of the vector width
  bool vec_grad_out;         // likewise for grad_out rows (E)
  bool vec_gather;           // 16-byte voxel runs: see "Vector gathers" in the file comment
};

// kAMajorM: the A tile (BM x BK) is stored [m][k] (WMMA row_major), else [k][m] (col_major).
// kBMajorN: the B tile (BK x BN) is stored [n][k] (WMMA col_major), else [k][n] (row_major).
// Each pass picks the orientation in which its global rows are contiguous, so staging writes runs.
// Strides in elements: 16-bit ones are multiples of 8 (WMMA ldm, 16-byte rows) whose row offset is
// 16 bytes mod 128 (conflict-free fragment loads); fp32 [x][k] tiles have an odd stride for the FMA
// tile's k-major reads, fp32 [k][x] tiles a multiple of 4.
template <typename T, bool kAMajorM, bool kBMajorN>
struct Layout {
  static constexpr bool kTensor = !std::is_same<T, float>::value;
  static constexpr int kLDA = kAMajorM ? (kTensor ? kBK + 8 : kBK + 1) : (kTensor ? kBM + 8 : kBM + 4);
  static constexpr int kLDB = kBMajorN ? (kTensor ? kBK + 8 : kBK + 1) : (kTensor ? kBN + 8 : kBN + 4);
  static constexpr int kAElems = (kAMajorM ? kBM : kBK) * kLDA;
  static constexpr int kBElems = (kBMajorN ? kBN : kBK) * kLDB;
  static constexpr size_t kA = 0;
  static constexpr size_t kB = kA + align128(sizeof(T) * kAElems);
  static constexpr size_t kC = kB + align128(sizeof(T) * kBElems);
  static constexpr size_t kTok = kC + align128(sizeof(float) * kBM * kLDC);
  static constexpr size_t kCol = kTok + align128(sizeof(TokenSlot) * kSlots);
  static constexpr size_t kTotal = kCol + align128(sizeof(ColumnSlot) * kSlots);
  static_assert(kTotal <= 48 * 1024, "the tiles must fit the default 48 KiB of shared memory");
  static_assert(!kTensor || (kLDA % 8 == 0 && kLDB % 8 == 0), "WMMA needs 16-byte strides");

  // Address of A(m, k) / B(k, n); at a 16 x 16 fragment origin this is also the WMMA load pointer
  // for the layout named above (row_major A: (i, k) at p[i ld + k]; col_major A: p[i + k ld]; and
  // the same with (k, j) for B).
  __host__ __device__ static const T* a_ptr(const T* a_s, int m, int k) {
    return kAMajorM ? a_s + m * kLDA + k : a_s + k * kLDA + m;
  }
  __host__ __device__ static const T* b_ptr(const T* b_s, int k, int n) {
    return kBMajorN ? b_s + n * kLDB + k : b_s + k * kLDB + n;
  }
};

// ------------------------------------------------------------------------------------------------
// Staging (all threads of the block, `tid` = threadIdx.x; every element of the tile is written).
// ------------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ void fill_tokens(TokenSlot* s, const Geometry& g, int64_t t0, int count,
                                                     int64_t t_end, int tid) {
  if (tid < count) s[tid] = token_slot(g, t0 + tid, t_end);
}

__host__ __device__ __forceinline__ void fill_columns(ColumnSlot* s, const Geometry& g, int64_t k0, int count,
                                                      int tid) {
  if (tid < count) s[tid] = column_slot(g, k0 + tid);
}

// dst[r * LD + c] = windowed V(token slot r, column slot c) rounded to T; 0 outside the volume.
// Columns vary fastest: a warp reads runs of p2 contiguous voxels.
// gather_tile with vector gathers: a run of N columns starting at a multiple of N is N contiguous
// voxels, all inside or all outside the volume (the host checked p.vec_gather's conditions).
template <int N, typename T, int NTOK, int NCOL, int LD>
__host__ __device__ __forceinline__ void gather_runs(T* __restrict__ dst, const TokenSlot* __restrict__ tok,
                                                     const ColumnSlot* __restrict__ col, const Params& p, int tid) {
  static_assert(NCOL % N == 0, "a tile row must hold whole runs");
  constexpr int kRuns = NCOL / N;
  for (int idx = tid; idx < NTOK * kRuns; idx += kThreads) {
    const int r = idx / kRuns;
    const int c0 = (idx % kRuns) * N;
    float v[N];
    if (inside(tok[r], col[c0])) {
      load_run<N>(p.volume, p.volume_type, tok[r].base + col[c0].offset, v);
      MEDVL_PE_UNROLL
      for (int e = 0; e < N; ++e) v[e] = window_value(v[e], p.w);
    } else {
      MEDVL_PE_UNROLL
      for (int e = 0; e < N; ++e) v[e] = 0.f;
    }
    MEDVL_PE_UNROLL
    for (int e = 0; e < N; ++e) dst[r * LD + c0 + e] = from_float<T>(v[e]);
  }
}

template <typename T, int NTOK, int NCOL, int LD>
__host__ __device__ __forceinline__ void gather_tile(T* __restrict__ dst, const TokenSlot* __restrict__ tok,
                                                     const ColumnSlot* __restrict__ col, const Params& p, int tid) {
  if (p.vec_gather) {
    switch (run_length(p.volume_type)) {
      case 4: gather_runs<4, T, NTOK, NCOL, LD>(dst, tok, col, p, tid); return;
      case 8: gather_runs<8, T, NTOK, NCOL, LD>(dst, tok, col, p, tid); return;
      default: gather_runs<16, T, NTOK, NCOL, LD>(dst, tok, col, p, tid); return;
    }
  }
  for (int idx = tid; idx < NTOK * NCOL; idx += kThreads) {
    const int r = idx / NCOL;
    const int c = idx % NCOL;
    float v = 0.f;
    if (inside(tok[r], col[c])) v = window_value(load_voxel(p.volume, p.volume_type, tok[r].base + col[c].offset), p.w);
    dst[r * LD + c] = from_float<T>(v);
  }
}

// Rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of the row-major matrix g (row stride ld,
// rows < nrows and columns < ncols valid) into s[r * LD + c] as T, zeros elsewhere. `vec` (only
// honoured when S == T) requires a 16-byte aligned g and ld == ncols a multiple of the vector width,
// so a 16-byte chunk starting at a valid column lies wholly inside its row.
template <typename S, typename T, int ROWS, int COLS, int LD>
__host__ __device__ __forceinline__ void load_matrix_tile(T* __restrict__ s, const S* __restrict__ g, int64_t row0,
                                                          int64_t nrows, int64_t col0, int64_t ncols, int64_t ld,
                                                          bool vec, int tid) {
  if constexpr (std::is_same<S, T>::value) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    static_assert(COLS % kVec == 0, "tile width must be a multiple of the vector width");
    if (vec) {
      constexpr int kChunksPerRow = COLS / kVec;
      for (int idx = tid; idx < ROWS * kChunksPerRow; idx += kThreads) {
        const int r = idx / kChunksPerRow;
        const int c = (idx % kChunksPerRow) * kVec;
        const int64_t gr = row0 + r, gc = col0 + c;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (gr < nrows && gc < ncols) v = ldg(reinterpret_cast<const uint4*>(g + gr * ld + gc));
        T* d = s + r * LD + c;
        if constexpr ((LD * sizeof(T)) % 16 == 0) {
          *reinterpret_cast<uint4*>(d) = v;
        } else {
          T parts[kVec];
          memcpy(parts, &v, sizeof(v));
          MEDVL_PE_UNROLL
          for (int e = 0; e < kVec; ++e) d[e] = parts[e];
        }
      }
      return;
    }
  }
  for (int idx = tid; idx < ROWS * COLS; idx += kThreads) {
    const int r = idx / COLS;
    const int c = idx % COLS;
    const int64_t gr = row0 + r, gc = col0 + c;
    float v = 0.f;
    if (gr < nrows && gc < ncols) v = to_float(g[gr * ld + gc]);
    s[r * LD + c] = from_float<T>(v);
  }
}

// grad_out tile (runtime dtype) into s as T.
template <typename T, int ROWS, int COLS, int LD>
__host__ __device__ __forceinline__ void load_grad_out_tile(T* __restrict__ s, const Params& p, int64_t row0,
                                                            int64_t nrows, int64_t col0, int tid) {
  switch (p.grad_out_type) {
    case DType::kFloat32:
      load_matrix_tile<float, T, ROWS, COLS, LD>(s, static_cast<const float*>(p.grad_out), row0, nrows, col0, p.embed,
                                                 p.embed, p.vec_grad_out, tid);
      return;
    case DType::kFloat16:
      load_matrix_tile<__half, T, ROWS, COLS, LD>(s, static_cast<const __half*>(p.grad_out), row0, nrows, col0,
                                                  p.embed, p.embed, p.vec_grad_out, tid);
      return;
    case DType::kBFloat16:
      load_matrix_tile<__nv_bfloat16, T, ROWS, COLS, LD>(s, static_cast<const __nv_bfloat16*>(p.grad_out), row0,
                                                         nrows, col0, p.embed, p.embed, p.vec_grad_out, tid);
      return;
  }
}

// ------------------------------------------------------------------------------------------------
// The tile product C (64 x 64) += A (64 x 32) B (32 x 64), two flavours with one interface.
// ------------------------------------------------------------------------------------------------

// Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 16 i, columns tx + 16 j (i, j < 4): in a warp
// the A reads are two broadcasts and the B reads 16 consecutive (or odd-strided) words. Used for fp32
// operands on the GPU.
template <typename T, bool kAMajorM, bool kBMajorN>
struct FmaTile {
  using L = Layout<T, kAMajorM, kBMajorN>;
  float acc[4][4];

  __host__ __device__ void zero() {
    MEDVL_PE_UNROLL
    for (int i = 0; i < 4; ++i)
      MEDVL_PE_UNROLL
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  __host__ __device__ void step(const T* a_s, const T* b_s, int tid) {
    const int tx = tid % 16, ty = tid / 16;
#ifdef __CUDA_ARCH__
#pragma unroll 8
#endif
    for (int k = 0; k < kBK; ++k) {
      float av[4], bv[4];
      MEDVL_PE_UNROLL
      for (int i = 0; i < 4; ++i) av[i] = to_float(*L::a_ptr(a_s, ty + 16 * i, k));
      MEDVL_PE_UNROLL
      for (int j = 0; j < 4; ++j) bv[j] = to_float(*L::b_ptr(b_s, k, tx + 16 * j));
      MEDVL_PE_UNROLL
      for (int i = 0; i < 4; ++i)
        MEDVL_PE_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __host__ __device__ void store(float* c_s, int tid) const {
    const int tx = tid % 16, ty = tid / 16;
    MEDVL_PE_UNROLL
    for (int i = 0; i < 4; ++i)
      MEDVL_PE_UNROLL
      for (int j = 0; j < 4; ++j) c_s[(ty + 16 * i) * kLDC + tx + 16 * j] = acc[i][j];
  }
};

// ------------------------------------------------------------------------------------------------
// Epilogues (C tile in shared memory, fp32 [kBM][kLDC]); stores masked per element, columns fastest.
// ------------------------------------------------------------------------------------------------

// out[t, e] = (C + bias[e]) + pos[t mod N, e]: conv3d adds its bias, then the reference adds pos.
__host__ __device__ __forceinline__ void forward_epilogue(const float* c_s, const TokenSlot* tok, int64_t m0,
                                                          int64_t n0, const Params& p, int tid) {
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN, n = idx % kBN;
    const int64_t t = m0 + m, e = n0 + n;
    if (t >= p.g.rows || e >= p.embed) continue;
    float v = c_s[m * kLDC + n];
    if (p.bias != nullptr) v = add_rn(v, ldg(p.bias + e));
    if (p.pos != nullptr) v = add_rn(v, ldg(p.pos + tok[m].n * p.embed + e));
    store_out(p.out, p.out_type, t * p.embed + e, v);
  }
}

__host__ __device__ __forceinline__ void grad_weight_epilogue(const float* c_s, int64_t m0, int64_t n0,
                                                              float* dst, const Params& p, int tid) {
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN, n = idx % kBN;
    const int64_t e = m0 + m, k = n0 + n;
    if (e < p.embed && k < p.g.cols) dst[e * p.g.cols + k] = c_s[m * kLDC + n];
  }
}

template <int N>
__host__ __device__ __forceinline__ void grad_volume_runs(const float* c_s, const TokenSlot* tok,
                                                          const ColumnSlot* col, const Params& p, int tid) {
  constexpr int kRuns = kBN / N;
  for (int idx = tid; idx < kBM * kRuns; idx += kThreads) {
    const int m = idx / kRuns, n0 = (idx % kRuns) * N;
    if (!inside(tok[m], col[n0])) continue;
    const int64_t voxel = tok[m].base + col[n0].offset;
    float g[N];
    MEDVL_PE_UNROLL
    for (int e = 0; e < N; ++e) g[e] = c_s[m * kLDC + n0 + e];
    if (p.w.on) {
      float x[N];
      load_run<N>(p.volume, p.volume_type, voxel, x);
      MEDVL_PE_UNROLL
      for (int e = 0; e < N; ++e) g[e] = window_grad(g[e], x[e], p.w);
    }
    store_grad_run<N>(p.grad_volume, p.volume_type, voxel, g);
  }
}

__host__ __device__ __forceinline__ void grad_volume_epilogue(const float* c_s, const TokenSlot* tok,
                                                              const ColumnSlot* col, const Params& p, int tid) {
  if (p.vec_gather) {  // whole 16-byte runs: one load of the voxels, one store of their gradients
    if (run_length(p.volume_type) == 4) grad_volume_runs<4>(c_s, tok, col, p, tid);
    else grad_volume_runs<8>(c_s, tok, col, p, tid);
    return;
  }
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN, n = idx % kBN;
    if (!inside(tok[m], col[n])) continue;
    const int64_t voxel = tok[m].base + col[n].offset;
    float g = c_s[m * kLDC + n];
    if (p.w.on) g = window_grad(g, load_voxel(p.volume, p.volume_type, voxel), p.w);
    store_grad_voxel(p.grad_volume, p.volume_type, voxel, g);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: validation and the kernels' parameters.
// ------------------------------------------------------------------------------------------------

inline void require(bool ok, const std::string& message) { medvl::require(ok, "patch_embed3d_cuda", message); }

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

inline bool valid_dtype(DType t) { return static_cast<int>(t) >= 0 && static_cast<int>(t) <= 2; }

// Validates the shapes shared by every pass and fills the geometry.
inline Geometry make_geometry(const PatchEmbed3dArgs& a) {
  require(a.batch > 0 && a.channels > 0, "batch and channels must be positive");
  require(a.embed_dim > 0, "embed_dim must be positive");
  Geometry g{};
  int64_t k = a.channels;
  for (int i = 0; i < 3; ++i) {
    require(a.size[i] > 0 && a.patch[i] > 0, "sizes and patch sizes must be positive");
    require(a.grid[i] == ceil_div(a.size[i], a.patch[i]), "grid must be ceil(size / patch) on every axis");
    require(a.patch[i] <= INT_MAX && k <= INT_MAX / a.patch[i], "channels * p0 * p1 * p2 exceeds 2^31 - 1");
    k *= a.patch[i];
    g.size[i] = a.size[i];
    g.grid[i] = a.grid[i];
    g.patch[i] = static_cast<int>(a.patch[i]);
  }
  g.tokens = a.grid[0] * a.grid[1] * a.grid[2];
  g.rows = a.batch * g.tokens;
  g.cols = k;
  g.plane = a.size[1] * a.size[2];
  g.channel_stride = a.size[0] * g.plane;
  g.batch_stride = a.channels * g.channel_stride;
  return g;
}

// Token splits of grad_weight: a function of the shapes only, so results are reproducible on any GPU.
struct Splits {
  int64_t count;
  int64_t tokens_per_split;  // a multiple of kBK
};

inline Splits grad_weight_splits(int64_t rows, int64_t embed, int64_t cols) {
  const int64_t tiles = ceil_div(embed, kBM) * ceil_div(cols, kBN);
  const int64_t steps = ceil_div(rows, kBK);
  int64_t want = ceil_div(kTargetBlocks, tiles);
  const int64_t by_length = steps / kMinStepsPerSplit;
  if (want > by_length) want = by_length;
  if (want > kMaxSplits) want = kMaxSplits;
  if (want < 1) want = 1;
  const int64_t steps_per_split = ceil_div(steps, want);
  // Recounted so that no split is empty.
  return Splits{ceil_div(steps, steps_per_split), steps_per_split * kBK};
}

inline size_t grad_weight_workspace(const Geometry& g, int64_t embed) {
  const Splits s = grad_weight_splits(g.rows, embed, g.cols);
  return s.count > 1 ? static_cast<size_t>(s.count) * static_cast<size_t>(embed) * static_cast<size_t>(g.cols) *
                           sizeof(float)
                     : 0;
}

inline Window make_window(const PatchEmbed3dArgs& a) {
  Window w{};
  w.on = a.has_window;
  w.lo = a.window_lo;
  w.hi = a.window_hi;
  w.out_lo = a.out_lo;
  w.out_hi = a.out_hi;
  // window_span and out_span: hi - lo and out_hi - out_lo from the caller's doubles, rounded to fp32.
  w.slope = static_cast<float>(static_cast<double>(a.out_span) / static_cast<double>(a.window_span));
  return w;
}

// Validates what every pass shares and fills the kernels' parameters (pass-specific checks stay with
// the launches). vec_gather, vec_weight, vec_grad_out: 16-byte vector accesses where alignment and
// sizes allow them.
inline Params make_params(const PatchEmbed3dArgs& args, int pass) {
  require(pass >= 0 && pass <= 2, "unknown pass code " + std::to_string(pass));
  const int vt = static_cast<int>(args.volume_type);
  require(vt >= 0 && vt <= 5, "unknown volume dtype code");
  require(valid_dtype(args.weight_type), "unknown weight dtype code");
  require(args.volume != nullptr, "null volume pointer");

  Params p{};
  p.g = make_geometry(args);
  p.w = make_window(args);
  p.volume = args.volume;
  p.volume_type = args.volume_type;
  p.weight = args.weight;
  p.bias = args.bias;
  p.pos = args.pos_embed;
  p.out = args.out;
  p.out_type = args.out_type;
  p.grad_out = args.grad_out;
  p.grad_out_type = args.grad_out_type;
  p.grad_weight = args.grad_weight;
  p.grad_volume = args.grad_volume;
  p.embed = args.embed_dim;
  p.tokens_per_split = p.g.rows;
  const int64_t wvec = 16 / static_cast<int64_t>(dtype_size(args.weight_type));
  p.vec_weight = aligned16(args.weight) && p.g.cols % wvec == 0;
  const int run = run_length(args.volume_type);
  p.vec_gather = aligned16(args.volume) && p.g.patch[2] % run == 0 && p.g.size[2] % run == 0;
  if (pass != static_cast<int>(PatchEmbed3dPass::kForward)) {
    require(valid_dtype(args.grad_out_type), "unknown grad_out dtype code");
    require(args.grad_out != nullptr, "null grad_out pointer");
    const int64_t gvec = 16 / static_cast<int64_t>(dtype_size(args.grad_out_type));
    p.vec_grad_out = aligned16(args.grad_out) && p.embed % gvec == 0;
  }
  return p;
}

}  // namespace
}  // namespace medvl
