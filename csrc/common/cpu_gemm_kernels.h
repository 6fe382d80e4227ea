// The per-ISA GEMM pieces shared by the CPU kernels: a register-blocked FMA micro-kernel and the
// panel packing routines. No include guard on purpose: an op's .cpp includes this file once per
// instruction set, inside a namespace that first defines
//   Vec      -- one of medvl::cpu::{scalar,avx2,avx512}::Vec (W lanes of float),
//   kMR, kNV -- the register tile of the micro-kernel: kMR rows x kNV vectors of W columns,
// inside the matching MEDVL_TARGET_*_BEGIN/END region, so every function is compiled for that ISA.

using V = Vec::T;
using M = Vec::M;
constexpr int W = Vec::W;
constexpr int NR = kNV * W;

// ---------------------------------------------------------------------------------------------
// Micro-kernel: C[MR x NV*W] (+)= sum_k A[k*lda + r] * B[k*NV*W + c], rows < m_valid stored, the
// last vector's first n_last lanes stored.
// ---------------------------------------------------------------------------------------------
template <int MR, int NV>
MEDVL_NOINLINE void ukernel(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B,
                            float* __restrict C, int64_t ldc, int m_valid, int n_last, bool accumulate) {
  if (accumulate) {  // C may be far (grad_text rows): fetch it while the K loop runs
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      if (r >= m_valid) break;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) MEDVL_PREFETCH(C + r * ldc + v * W);
    }
  }
  V c[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = Vec::zero();
  constexpr int64_t ldb = NV * W;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(B + v * W);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const V a = Vec::set1(A[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = Vec::fmadd(a, b[v], c[r][v]);
    }
    A += lda;
    B += ldb;
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
    if (r >= m_valid) break;
    float* cr = C + r * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v) {
      const V old = accumulate ? Vec::load(cr + v * W) : Vec::zero();
      Vec::store(cr + v * W, Vec::add(old, c[r][v]));
    }
    if (n_last == W) {
      const V old = accumulate ? Vec::load(cr + (NV - 1) * W) : Vec::zero();
      Vec::store(cr + (NV - 1) * W, Vec::add(old, c[r][NV - 1]));
    } else {
      const V old = accumulate ? Vec::loadn(cr + (NV - 1) * W, n_last) : Vec::zero();
      Vec::storen(cr + (NV - 1) * W, Vec::add(old, c[r][NV - 1]), n_last);
    }
  }
}

// A panel of `vectors` (1..kNV) vectors of W columns: picks the kernel of that width.
template <int MR>
inline void ukernel_width(int vectors, int64_t K, const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                          int m_valid, int n_last, bool accumulate) {
  switch (vectors) {
#define MEDVL_UK_CASE(n) \
  case n:                \
    if (n <= kNV) ukernel<MR, (n <= kNV ? n : 1)>(K, A, lda, B, C, ldc, m_valid, n_last, accumulate); \
    break;
    MEDVL_UK_CASE(1)
    MEDVL_UK_CASE(2)
    MEDVL_UK_CASE(3)
    MEDVL_UK_CASE(4)
#undef MEDVL_UK_CASE
    default: break;
  }
}
static_assert(kNV >= 1 && kNV <= 4, "kNV must be 1..4");

// ---------------------------------------------------------------------------------------------
// Packing.
// ---------------------------------------------------------------------------------------------

// out[p][k][w] = src[(p*PW + w)*ld + k] for rows p*PW + w < rows (else 0), k < K, p < panels.
// Panel p starts at out + p*PW*K. W x W blocks are transposed in registers.
inline void pack_transposed(const float* src, int64_t ld, int64_t rows, int64_t K, int PW, int64_t panels,
                            float* out) {
  V r[W];
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = out + p * PW * K;
    for (int w0 = 0; w0 < PW; w0 += W) {
      const int wn = std::min(W, PW - w0);
      const int64_t row0 = p * PW + w0;
      const int here = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(wn, rows - row0)));
      for (int64_t k0 = 0; k0 < K; k0 += W) {
        const int kn = static_cast<int>(std::min<int64_t>(W, K - k0));
        const float* s = src + row0 * ld + k0;
        if (kn == W) {
          for (int w = 0; w < W; ++w) r[w] = w < here ? Vec::load(s + w * ld) : Vec::zero();
        } else {
          for (int w = 0; w < W; ++w) r[w] = w < here ? Vec::loadn(s + w * ld, kn) : Vec::zero();
        }
        Vec::transpose(r);
        float* o = panel + k0 * PW + w0;
        if (wn == W) {
          for (int k = 0; k < kn; ++k) Vec::store(o + k * PW, r[k]);
        } else {
          for (int k = 0; k < kn; ++k) Vec::storen(o + k * PW, r[k], wn);
        }
      }
    }
  }
}

// Column panels of NR (the last one narrower, a whole number of vectors): panel q holds
// out[q*NR*K_alloc + k*width_q + c] = src[k*ld + q*NR + c] for columns < dim (else 0), k < K.
inline void pack_columns(const float* src, int64_t ld, int64_t K, int64_t dim, int64_t K_alloc, float* out) {
  const int64_t dim_vectors = (dim + W - 1) / W;
  for (int64_t q = 0; q * kNV < dim_vectors; ++q) {
    const int width = static_cast<int>(std::min<int64_t>(kNV, dim_vectors - q * kNV));
    float* panel = out + q * NR * K_alloc;
    const int64_t c0 = q * NR;
    for (int64_t k = 0; k < K; ++k) {
      const float* s = src + k * ld + c0;
      float* o = panel + k * width * W;
      for (int v = 0; v < width; ++v) {
        const int64_t left = dim - (c0 + v * W);
        Vec::store(o + v * W, left >= W ? Vec::load(s + v * W) : Vec::loadn(s + v * W, static_cast<int>(left)));
      }
    }
  }
}
