// CUDA sigmoid loss: tiled, deterministic, gradients fused into the loss pass; nothing of size
// n_image x n_text is ever allocated or written.
//
// Two kernels, one template (`sigmoid_pass`), each block owning a tile of BM "owned" rows of one
// operand (A) and looping over the other operand (B) in tiles of BN rows:
//
//   row pass    (A = image, B = text):  row_loss[i], row_gsum[i], grad_image[i] = sum_j g_ij t_j
//   column pass (A = text,  B = image): grad_text[j] = sum_i g_ij x_i      (only when compute_grad)
//
// Per B tile a block does:
//   1. S = A_tile B_tile^T (BM x BN, fp32 accumulate) over the whole feature dimension D, in
//      k-steps of BK columns staged in shared memory (zero-padded past n and past D);
//   2. an element-wise epilogue from S (kept in shared memory): z = scale * s + bias, the target y,
//      loss = (max(z, 0) - y z) + log1p(exp(-|z|)) and g = sigmoid(z) - y, both in forms that do
//      not cancel for confident pairs (see the epilogue); the per-row loss / g sums
//      stay in registers (one owned row per 4 threads) and g goes to a BM x BN shared tile G
//      (zero outside the valid n_a x n_b region, so padded rows/columns contribute nothing);
//   3. (compute_grad) Acc += G (BM x BN) * B_tile[:, d0 : d0 + DC] (BN x DC), Acc in registers.
//
// The D dimension of the gradient accumulators: a block cannot hold BM x D fp32 accumulators for
// D up to 4096 (1 MiB for BM = 64), so the grid has a second axis over D chunks of DC columns
// (gridDim.y = ceil(D / DC)); block (m, c) owns grad rows [64 m, 64 m + 64) x columns
// [c DC, c DC + DC) and recomputes S (over the full D) for its chunk. Every output element is
// therefore written by exactly one block, once, at the end: no atomics, no partial buffers, and a
// fixed summation order (bitwise deterministic run to run). The price is that S is recomputed
// ceil(D / DC) times per pass (D <= 256 for 16-bit inputs costs nothing extra; D = 512 costs 2x
// the S work; D = 4096, 16x). Row statistics (row_loss, row_gsum) are written by the blocks of
// chunk 0 only. No workspace is needed.
//
// Arithmetic: 16-bit inputs (fp16/bf16) use tensor cores through nvcuda::wmma (16x16x16, fp32
// accumulate) for both GEMMs; G is rounded to the input dtype for the second GEMM (as
// flash-attention does with P). fp32 inputs use a plain FMA path with fp32 everywhere (no TF32),
// so fp32 results match an fp32 reference to rounding. All WMMA fragments are loaded from and
// stored to shared memory only (never from global memory), so edge tiles need no special cases:
// the staging loads zero-fill, and the final stores to global memory are masked per element.
//
// Thread mapping (256 threads = 8 warps, BM = BN = 64, BK = 32):
//   loads:     flat over the tile, 16-byte vectors when the rows allow it, else scalars;
//   WMMA S:    warp w -> rows 16 (w % 4) .. +16, columns 32 (w / 4) .. +32 (two 16x16 fragments);
//   WMMA Acc:  warp w -> rows 16 (w % 4) .. +16, columns 128 (w / 4) .. +128 (eight fragments);
//   FMA S:     thread (tx, ty) = (t % 16, t / 16) -> rows ty + 16 i, columns tx + 16 j (i, j < 4);
//   FMA Acc:   same thread -> rows ty + 16 i, columns tx + 16 j (i < 4, j < DC / 16 = 8);
//   epilogue:  thread t -> owned row t / 4, columns t % 4 + 4 k (k < 16); row sums by two shuffles.
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
#include "sigmoid_loss/sigmoid_loss.h"
#include "sigmoid_loss/sigmoid_loss_target.h"

namespace medvl {
namespace {

// Errors name this entry point (common/cuda_check.h).
constexpr const char* kEntry = "sigmoid_loss_cuda";
void require(bool ok, const std::string& message) { medvl::require(ok, kEntry, message); }
void check_cuda(cudaError_t status, const char* what) { medvl::check_cuda(status, kEntry, what); }

constexpr int kThreads = 256;  // 8 warps; every index mapping below assumes exactly this
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;        // owned rows per block
constexpr int kBN = 64;        // looped rows per tile
constexpr int kBK = 32;        // feature columns per k-step of S
constexpr int kLDS = kBN + 4;  // row stride (floats) of the fp32 S tile

template <typename T>
struct Config {
  static constexpr bool kTensor = !std::is_same<T, float>::value;
  // Strides in elements. 16-bit: multiples of 8 (WMMA ldm rule, 16-byte rows) whose row offset is
  // 16 bytes mod 128 (no bank conflicts in fragment loads). fp32: odd stride for the k-major reads
  // of the FMA path.
  static constexpr int kLDK = kTensor ? kBK + 8 : kBK + 1;
  static constexpr int kLDG = kTensor ? kBN + 8 : kBN + 4;
  static constexpr int kDC = kTensor ? 256 : 128;  // D columns of the gradient owned by a block
  static constexpr int kLDC = kTensor ? kDC + 8 : kDC;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  // fp16 G: SigLIP's negatives have g ~ sigmoid(-10) ~ 4.5e-5, below fp16's smallest normal; cast
  // as is they would keep a few bits, rounded the same way for every negative. G goes into the
  // tile times 2^14 (|G| 2^14 <= 16384 < 65504) and the accumulator comes out times 2^-14, both
  // exact (the Triton kernel's _FP16_G_SCALE). bf16 has fp32's exponent range; fp32 needs nothing.
  static constexpr float kGScale = std::is_same<T, __half>::value ? 16384.f : 1.f;
};

#include "common/cuda_score_tile.cuh"

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Dynamic shared memory layout, in bytes from the (128-byte aligned) base.
template <typename T, bool kGrad>
struct Smem {
  using C = Config<T>;
  static constexpr size_t kA = 0;
  static constexpr size_t kB = kA + align128(sizeof(T) * kBM * C::kLDK);
  static constexpr size_t kS = kB + align128(sizeof(T) * kBN * C::kLDK);
  static constexpr size_t kG = kS + align128(sizeof(float) * kBM * kLDS);
  static constexpr size_t kC = kG + (kGrad ? align128(sizeof(T) * kBM * C::kLDG) : 0);
  static constexpr size_t kTotal = kC + (kGrad ? align128(sizeof(T) * kBN * C::kLDC) : 0);
  // The WMMA path stages each warp's 16x16 result fragments through the S region after the loop.
  static_assert(sizeof(float) * kWarps * 256 <= sizeof(float) * kBM * kLDS, "scratch must fit in S");
};

static_assert(kBM == 64 && kBN == 64 && kBK == 32 && kThreads == 256, "mappings below assume these");
static_assert(Config<__half>::kDC == 2 * 128 && Config<float>::kDC == 16 * 8, "mappings assume these");

struct PassParams {
  const void* a;  // owned operand  [n_a, dim]
  const void* b;  // looped operand [n_b, dim]
  int64_t n_a;
  int64_t n_b;
  int64_t dim;
  const float* logit_scale;
  const float* logit_bias;
  SigmoidTargets tgt;
  float* row_loss;  // row pass only: [n_a]
  float* row_gsum;  // row pass with gradients only: [n_a]
  float* grad;      // with gradients: [n_a, dim] = sum over looped rows of g * b
  bool vec;         // both operands 16-byte aligned and dim % kVec == 0
};

// kRow: row pass (A = image, B = text; writes row_loss/row_gsum from the chunk-0 blocks);
// otherwise the column pass (A = text, B = image). kGrad: accumulate and write `grad`.
template <typename T, bool kRow, bool kGrad>
__global__ void __launch_bounds__(kThreads) sigmoid_pass(const PassParams p) {
  using C = Config<T>;
  using L = Smem<T, kGrad>;
  constexpr int kLDG = C::kLDG, kLDC = C::kLDC, kDC = C::kDC;

  extern __shared__ __align__(128) unsigned char smem[];
  T* a_s = reinterpret_cast<T*>(smem + L::kA);         // [kBM][kLDK]
  T* b_s = reinterpret_cast<T*>(smem + L::kB);         // [kBN][kLDK]
  float* s_s = reinterpret_cast<float*>(smem + L::kS);  // [kBM][kLDS]
  T* g_s = reinterpret_cast<T*>(smem + L::kG);         // [kBM][kLDG]  (kGrad)
  T* c_s = reinterpret_cast<T*>(smem + L::kC);         // [kBN][kLDC]  (kGrad)

  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ b = static_cast<const T*>(p.b);
  const int64_t n_a = p.n_a, n_b = p.n_b, dim = p.dim;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kDC;  // first grad column owned (kGrad)
  const float scale = __ldg(p.logit_scale);
  const float bias = __ldg(p.logit_bias);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wm = warp % 4;  // WMMA: 16-row slab of the 64 owned rows
  const int wn = warp / 4;  // WMMA: column half
  const int tx = tid % 16;  // FMA path
  const int ty = tid / 16;
  const int er = tid / 4;   // epilogue: owned row
  const int eq = tid % 4;   // epilogue: column phase
  const int64_t e_row = a0 + er;
  const bool e_row_ok = e_row < n_a;

  // Register state carried across B tiles.
  float loss_acc = 0.f, gsum_acc = 0.f;  // partial row sums of row `er` (this thread's columns)
  [[maybe_unused]] float facc[4][kDC / 16];  // FMA path gradient accumulators
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  [[maybe_unused]] AccFrag gacc[C::kTensor ? 8 : 1];  // WMMA path gradient accumulators
  if constexpr (kGrad) {
    if constexpr (C::kTensor) {
#pragma unroll
      for (int f = 0; f < 8; ++f) nvcuda::wmma::fill_fragment(gacc[f], 0.f);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < kDC / 16; ++j) facc[i][j] = 0.f;
    }
  }

  for (int64_t b0 = 0; b0 < n_b; b0 += kBN) {
    score_tile<T>(s_s, a_s, b_s, a, a0, n_a, b, b0, n_b, dim, p.vec, wm, wn, tx, ty);
    // Stage this tile's slice of B for the gradient GEMM while S settles (c_s was last read by
    // the previous tile's gradient GEMM, which ended with a barrier).
    if constexpr (kGrad) load_tile<T, kBN, kDC, kLDC>(c_s, b, b0, n_b, d0, dim, p.vec);
    __syncthreads();

    // ---- 2. Epilogue: z, y, loss, g; G tile (zero outside the valid region). ----
    {
      float tile_loss = 0.f, tile_g = 0.f;
#pragma unroll 4
      for (int k = 0; k < kBN / 4; ++k) {
        const int c = eq + 4 * k;
        const int64_t col = b0 + c;
        float g = 0.f;
        if (e_row_ok && col < n_b) {
          const float z = fmaf(scale, s_s[er * kLDS + c], bias);
          const float y = kRow ? sigmoid_target(p.tgt, e_row, col) : sigmoid_target(p.tgt, col, e_row);
          // e = exp(-|z|) in (0, 1]: no overflow. The loss adds the small log1p term last, so a
          // confident correct pair (y = 1, z >> 0) gives log1p(e) rather than (z + tiny) - z; g is
          // (1 - y) sigmoid(z) - y sigmoid(-z), so sigmoid(z) - 1 never cancels.
          const float e = expf(-fabsf(z));
          if constexpr (kRow) tile_loss += (fmaxf(z, 0.f) - y * z) + log1pf(e);
          const float r = 1.f / (1.f + e);
          const float sig_pos = z >= 0.f ? r : e * r;  // sigmoid(z)
          const float sig_neg = z >= 0.f ? e * r : r;  // sigmoid(-z) = 1 - sigmoid(z)
          g = (1.f - y) * sig_pos - y * sig_neg;
          tile_g += g;
        }
        if constexpr (kGrad) g_s[er * kLDG + c] = from_float<T>(g * C::kGScale);
      }
      loss_acc += tile_loss;
      gsum_acc += tile_g;
    }

    // ---- 3. Acc += G * B_tile[:, d0 : d0 + DC]. ----
    if constexpr (kGrad) {
      __syncthreads();
      if constexpr (C::kTensor) {
        using namespace nvcuda;
#pragma unroll
        for (int kk = 0; kk < kBN; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
          wmma::load_matrix_sync(af, g_s + (wm * 16) * kLDG + kk, kLDG);
#pragma unroll
          for (int f = 0; f < 8; ++f) {
            const int col = wn * 128 + f * 16;
            // Warp-uniform skip of fragments wholly past dim (their columns are zero anyway).
            if (d0 + col < dim) {
              wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
              wmma::load_matrix_sync(bf, c_s + kk * kLDC + col, kLDC);
              wmma::mma_sync(gacc[f], af, bf, gacc[f]);
            }
          }
        }
      } else {
#pragma unroll 4
        for (int k = 0; k < kBN; ++k) {
          float gv[4], cv[kDC / 16];
#pragma unroll
          for (int i = 0; i < 4; ++i) gv[i] = static_cast<float>(g_s[(ty + 16 * i) * kLDG + k]);
#pragma unroll
          for (int j = 0; j < kDC / 16; ++j) cv[j] = static_cast<float>(c_s[k * kLDC + tx + 16 * j]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < kDC / 16; ++j) facc[i][j] = fmaf(gv[i], cv[j], facc[i][j]);
        }
      }
      __syncthreads();
    }
  }

  // ---- Row statistics: the 4 threads of a row are adjacent lanes; fixed butterfly order. ----
  if constexpr (kRow) {
    float l = loss_acc, gs = gsum_acc;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    gs += __shfl_xor_sync(0xffffffffu, gs, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    gs += __shfl_xor_sync(0xffffffffu, gs, 2);
    if (eq == 0 && e_row_ok && blockIdx.y == 0) {
      p.row_loss[e_row] = l;
      if constexpr (kGrad) p.row_gsum[e_row] = gs;
    }
  }

  // ---- Gradient chunk out: masked per element. ----
  if constexpr (kGrad) {
    float* __restrict__ out = p.grad;
    if constexpr (C::kTensor) {
      using namespace nvcuda;
      // Each warp stages one fragment at a time in its own 16x16 slice of the S region (the last
      // reads of S were in the final epilogue, followed by barriers).
      float* scratch = s_s + warp * 256;
#pragma unroll
      for (int f = 0; f < 8; ++f) {
        wmma::store_matrix_sync(scratch, gacc[f], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int m = 0; m < 8; ++m) {
          const int e = lane + 32 * m;
          const int64_t row = a0 + wm * 16 + e / 16;
          const int64_t col = d0 + wn * 128 + f * 16 + e % 16;
          if (row < n_a && col < dim) out[row * dim + col] = scratch[e] * (1.f / C::kGScale);
        }
        __syncwarp();
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = a0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < kDC / 16; ++j) {
          const int64_t col = d0 + tx + 16 * j;
          if (row < n_a && col < dim) out[row * dim + col] = facc[i][j];
        }
      }
    }
  }
}


template <typename T, bool kRow, bool kGrad>
void launch_pass(const PassParams& p, cudaStream_t stream) {
  using C = Config<T>;
  const size_t smem = Smem<T, kGrad>::kTotal;
  auto kernel = sigmoid_pass<T, kRow, kGrad>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cannot reserve shared memory for the kernel");
  const int64_t blocks_x = (p.n_a + kBM - 1) / kBM;
  const int64_t blocks_y = kGrad ? (p.dim + C::kDC - 1) / C::kDC : 1;
  require(blocks_x <= INT_MAX && blocks_y <= 65535, "batch or feature dimension too large for one launch");
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  sigmoid_pass<T, kRow, kGrad><<<grid, kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), kRow ? "launching the row pass" : "launching the column pass");
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
void run(const SigmoidLossArgs& args, cudaStream_t stream) {
  const SigmoidTargets tgt = targets_of(args);
  const bool vec = aligned16(args.image) && aligned16(args.text) && args.dim % Config<T>::kVec == 0;

  PassParams row{};
  row.a = args.image;
  row.b = args.text;
  row.n_a = args.n_image;
  row.n_b = args.n_text;
  row.dim = args.dim;
  row.logit_scale = args.logit_scale;
  row.logit_bias = args.logit_bias;
  row.tgt = tgt;
  row.row_loss = args.row_loss;
  row.row_gsum = args.row_gsum;
  row.grad = args.grad_image;
  row.vec = vec;
  if (!args.compute_grad) {
    launch_pass<T, true, false>(row, stream);
    return;
  }
  launch_pass<T, true, true>(row, stream);

  PassParams col = row;
  col.a = args.text;
  col.b = args.image;
  col.n_a = args.n_text;
  col.n_b = args.n_image;
  col.row_loss = nullptr;
  col.row_gsum = nullptr;
  col.grad = args.grad_text;
  launch_pass<T, false, true>(col, stream);
}


}  // namespace

size_t sigmoid_loss_cuda_workspace_bytes(int64_t n_image, int64_t n_text, int64_t dim, bool compute_grad) {
  (void)n_image;
  (void)n_text;
  (void)dim;
  (void)compute_grad;
  return 0;  // the D-chunked grid needs no scratch
}

void sigmoid_loss_cuda(const SigmoidLossArgs& args, void* stream) {
  require(args.n_image > 0 && args.n_text > 0, "empty batch (n_image and n_text must be positive)");
  require(args.dim > 0, "feature dimension must be positive");
  require(args.image != nullptr && args.text != nullptr, "null feature pointer");
  require(args.logit_scale != nullptr && args.logit_bias != nullptr, "null logit_scale/logit_bias pointer");
  require(args.row_loss != nullptr, "null row_loss pointer");
  if (args.compute_grad)
    require(args.row_gsum != nullptr && args.grad_image != nullptr && args.grad_text != nullptr,
            "compute_grad needs row_gsum, grad_image and grad_text");
  switch (args.target) {
    case SigmoidTarget::kPair: break;
    case SigmoidTarget::kLabel:
      require(args.image_labels != nullptr && args.text_labels != nullptr, "target 'label' needs both label arrays");
      break;
    case SigmoidTarget::kJaccard:
      require(args.image_bits != nullptr && args.text_bits != nullptr, "target 'jaccard' needs both bit arrays");
      require(args.label_words > 0, "target 'jaccard' needs label_words > 0");
      break;
    default: require(false, "unknown target code");
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  with_cuda_type(args.dtype, kEntry, [&](auto element) { run<decltype(element)>(args, s); });
}

}  // namespace medvl
