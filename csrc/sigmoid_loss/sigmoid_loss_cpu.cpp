// CPU sigmoid loss: tiled, OpenMP over image row blocks, gradients fused into the loss pass.
//
// Each (image row block x text tile) does three small GEMMs on packed fp32 panels with a
// register-blocked FMA micro-kernel (S = X T^T, grad_image += G T, grad_text += G^T X) and the
// element-wise loss on S with a vectorised exp/log1p; see sigmoid_loss_cpu_kernels.h. The body is
// compiled three times, for AVX-512, AVX2+FMA and plain C++, and picked at run time (the highest
// the CPU supports; MEDVL_CPU_ISA=scalar|avx2|avx512 lowers it, for tests). Threads own image row
// blocks; grad_text is summed from per-thread partials in thread order, so results are the same
// from run to run for a given thread count. All scratch comes from the caller's workspace.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sigmoid_loss/sigmoid_loss.h"

#if defined(__x86_64__) || defined(_M_X64)
#define MEDVL_X86 1
#include <immintrin.h>
#else
#define MEDVL_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MEDVL_INLINE inline __attribute__((always_inline))
#define MEDVL_NOINLINE __attribute__((noinline))
#define MEDVL_PREFETCH(p) __builtin_prefetch((p), 1, 3)
#else
#define MEDVL_PREFETCH(p) ((void)(p))
#define MEDVL_INLINE inline
#define MEDVL_NOINLINE
#endif

namespace medvl {
namespace detail {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Tile sizes and the layout of one thread's scratch (in floats, each piece 64-byte aligned).
struct Plan {
  Isa isa = Isa::kScalar;
  int mr = 1, nr = 1, w = 1;
  int64_t mb = 0, mbp = 0;  // image rows per block (a multiple of mr)
  int64_t nb = 0, nbp = 0;  // texts per tile (a multiple of nr and of mr)
  int64_t kc = 0;           // dim block of the S GEMM
  size_t off_xt = 0, off_tt = 0, off_xp = 0, off_xr = 0, off_tp = 0, off_tr = 0, off_s = 0, off_gp = 0,
         off_y = 0, off_acc = 0;
  size_t per_thread = 0;    // floats of scratch per thread
  size_t partial = 0;       // floats of one grad_text partial (threads 1.. each have one)
};

struct RowBlockContext {
  const SigmoidLossArgs* args;
  const Plan* plan;
  float scale, bias;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

// y[j] = target of (image i, text j0 + j) for j < n.
void fill_targets(const SigmoidLossArgs& a, int64_t i, int64_t j0, int64_t n, float* y) {
  switch (a.target) {
    case SigmoidTarget::kPair:
      std::fill(y, y + n, 0.f);
      if (a.diagonal_is_pair && i >= j0 && i < j0 + n) y[i - j0] = 1.f;
      return;
    case SigmoidTarget::kLabel: {
      const int64_t label = a.image_labels[i];
      const int64_t* text = a.text_labels + j0;
      for (int64_t j = 0; j < n; ++j) y[j] = text[j] == label ? 1.f : 0.f;
      return;
    }
    case SigmoidTarget::kJaccard: {
      const int64_t words = a.label_words;
      const uint32_t* image = reinterpret_cast<const uint32_t*>(a.image_bits) + i * words;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t* text = reinterpret_cast<const uint32_t*>(a.text_bits) + (j0 + j) * words;
        int both = 0, either = 0;
        for (int64_t k = 0; k < words; ++k) {
          both += __builtin_popcount(image[k] & text[k]);
          either += __builtin_popcount(image[k] | text[k]);
        }
        y[j] = either == 0 ? 1.f : static_cast<float>(both) / static_cast<float>(either);
      }
      if (a.diagonal_is_pair && i >= j0 && i < j0 + n) y[i - j0] = 1.f;
      return;
    }
  }
}

void convert_scalar(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(src) + offset, sizeof(float) * n);
      return;
    case DType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t k = 0; k < n; ++k) dst[k] = fp16_to_float(s[k]);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t k = 0; k < n; ++k) dst[k] = bf16_to_float(s[k]);
      return;
    }
  }
}

}  // namespace detail

// ===============================================================================================
// Portable C++: W = 1, a 4 x 4 scalar tile (compilers may vectorise it for the baseline ISA).
// ===============================================================================================
namespace scalar {
using namespace detail;
struct Vec {
  using T = float;
  using M = bool;
  static constexpr int W = 1;
  static MEDVL_INLINE T zero() { return 0.f; }
  static MEDVL_INLINE T set1(float x) { return x; }
  static MEDVL_INLINE T load(const float* p) { return *p; }
  static MEDVL_INLINE void store(float* p, T v) { *p = v; }
  static MEDVL_INLINE T loadn(const float* p, int n) { return n > 0 ? *p : 0.f; }
  static MEDVL_INLINE void storen(float* p, T v, int n) {
    if (n > 0) *p = v;
  }
  static MEDVL_INLINE T keep(T v, int n) { return n > 0 ? v : 0.f; }
  static MEDVL_INLINE T add(T a, T b) { return a + b; }
  static MEDVL_INLINE T sub(T a, T b) { return a - b; }
  static MEDVL_INLINE T mul(T a, T b) { return a * b; }
  static MEDVL_INLINE T fmadd(T a, T b, T c) { return a * b + c; }
  static MEDVL_INLINE T max(T a, T b) { return a > b ? a : b; }
  static MEDVL_INLINE T abs(T a) { return std::fabs(a); }
  static MEDVL_INLINE T recip(T a) { return 1.f / a; }
  static MEDVL_INLINE M ge(T a, T b) { return a >= b; }
  static MEDVL_INLINE M lt(T a, T b) { return a < b; }
  static MEDVL_INLINE T select(M m, T if_false, T if_true) { return m ? if_true : if_false; }
  static MEDVL_INLINE T round(T a) { return std::nearbyint(a); }
  static MEDVL_INLINE T pow2n(T n) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static MEDVL_INLINE float hsum(T v) { return v; }
  static MEDVL_INLINE void transpose(T*) {}
  static void convert(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
    convert_scalar(src, dtype, offset, n, dst);
  }
};
constexpr int kMR = 4;
constexpr int kNV = 4;
#include "sigmoid_loss/sigmoid_loss_cpu_kernels.h"
}  // namespace scalar

#if MEDVL_X86
// ===============================================================================================
// AVX2 + FMA: W = 8, a 6 x 16 tile (12 accumulators of 16 ymm registers).
// ===============================================================================================
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt")
#endif
namespace avx2 {
using namespace detail;
struct Vec {
  using T = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static MEDVL_INLINE __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static MEDVL_INLINE T zero() { return _mm256_setzero_ps(); }
  static MEDVL_INLINE T set1(float x) { return _mm256_set1_ps(x); }
  static MEDVL_INLINE T load(const float* p) { return _mm256_loadu_ps(p); }
  static MEDVL_INLINE void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static MEDVL_INLINE T loadn(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  static MEDVL_INLINE void storen(float* p, T v, int n) { _mm256_maskstore_ps(p, first(n), v); }
  static MEDVL_INLINE T keep(T v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(first(n))); }
  static MEDVL_INLINE T add(T a, T b) { return _mm256_add_ps(a, b); }
  static MEDVL_INLINE T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static MEDVL_INLINE T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static MEDVL_INLINE T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static MEDVL_INLINE T max(T a, T b) { return _mm256_max_ps(a, b); }
  static MEDVL_INLINE T abs(T a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  static MEDVL_INLINE T recip(T a) { return _mm256_div_ps(_mm256_set1_ps(1.f), a); }
  static MEDVL_INLINE M ge(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static MEDVL_INLINE M lt(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static MEDVL_INLINE T select(M m, T if_false, T if_true) { return _mm256_blendv_ps(if_false, if_true, m); }
  static MEDVL_INLINE T round(T a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static MEDVL_INLINE T pow2n(T n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static MEDVL_INLINE float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static MEDVL_INLINE void transpose(T* r) {
    T t[8], u[8];
    for (int a = 0; a < 4; ++a) {
      t[2 * a] = _mm256_unpacklo_ps(r[2 * a], r[2 * a + 1]);
      t[2 * a + 1] = _mm256_unpackhi_ps(r[2 * a], r[2 * a + 1]);
    }
    for (int a = 0; a < 2; ++a) {
      u[4 * a + 0] = _mm256_shuffle_ps(t[4 * a], t[4 * a + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * a + 1] = _mm256_shuffle_ps(t[4 * a], t[4 * a + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * a + 2] = _mm256_shuffle_ps(t[4 * a + 1], t[4 * a + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * a + 3] = _mm256_shuffle_ps(t[4 * a + 1], t[4 * a + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
  static void convert(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
    if (dtype == DType::kFloat32) return convert_scalar(src, dtype, offset, n, dst);
    const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
    int64_t k = 0;
    if (dtype == DType::kFloat16) {
      for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k))));
    } else {
      for (; k + 8 <= n; k += 8) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
        _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      }
    }
    convert_scalar(src, dtype, offset + k, n - k, dst + k);
  }
};
constexpr int kMR = 6;
constexpr int kNV = 2;
#include "sigmoid_loss/sigmoid_loss_cpu_kernels.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ===============================================================================================
// AVX-512: W = 16, a 12 x 32 tile (24 accumulators of 32 zmm registers).
// ===============================================================================================
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt")
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* (PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace avx512 {
using namespace detail;
struct Vec {
  using T = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static MEDVL_INLINE __mmask16 first(int n) {
    return static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
  }
  static MEDVL_INLINE T zero() { return _mm512_setzero_ps(); }
  static MEDVL_INLINE T set1(float x) { return _mm512_set1_ps(x); }
  static MEDVL_INLINE T load(const float* p) { return _mm512_loadu_ps(p); }
  static MEDVL_INLINE void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static MEDVL_INLINE T loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static MEDVL_INLINE void storen(float* p, T v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static MEDVL_INLINE T keep(T v, int n) { return _mm512_maskz_mov_ps(first(n), v); }
  static MEDVL_INLINE T add(T a, T b) { return _mm512_add_ps(a, b); }
  static MEDVL_INLINE T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static MEDVL_INLINE T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static MEDVL_INLINE T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static MEDVL_INLINE T max(T a, T b) { return _mm512_max_ps(a, b); }
  static MEDVL_INLINE T abs(T a) { return _mm512_abs_ps(a); }
  static MEDVL_INLINE T recip(T a) {  // rcp14 and one Newton step: ~1 ulp
    const T x = _mm512_rcp14_ps(a);
    return _mm512_fmadd_ps(x, _mm512_fnmadd_ps(a, x, _mm512_set1_ps(1.f)), x);
  }
  static MEDVL_INLINE M ge(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static MEDVL_INLINE M lt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static MEDVL_INLINE T select(M m, T if_false, T if_true) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static MEDVL_INLINE T round(T a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static MEDVL_INLINE T pow2n(T n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static MEDVL_INLINE float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static MEDVL_INLINE void transpose(T* r) {
    T t[16], u[16];
    for (int a = 0; a < 8; ++a) {
      t[2 * a] = _mm512_unpacklo_ps(r[2 * a], r[2 * a + 1]);
      t[2 * a + 1] = _mm512_unpackhi_ps(r[2 * a], r[2 * a + 1]);
    }
    for (int a = 0; a < 4; ++a) {
      u[4 * a + 0] = _mm512_shuffle_ps(t[4 * a], t[4 * a + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * a + 1] = _mm512_shuffle_ps(t[4 * a], t[4 * a + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * a + 2] = _mm512_shuffle_ps(t[4 * a + 1], t[4 * a + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * a + 3] = _mm512_shuffle_ps(t[4 * a + 1], t[4 * a + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // u[4a + c], 128-bit lane L: column 4L + c of rows 4a..4a+3.
    for (int c = 0; c < 4; ++c) {
      const T v = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
      const T v2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
      const T w = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const T w2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
      r[c] = _mm512_shuffle_f32x4(v, w, 0x88);
      r[4 + c] = _mm512_shuffle_f32x4(v, w, 0xdd);
      r[8 + c] = _mm512_shuffle_f32x4(v2, w2, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(v2, w2, 0xdd);
    }
  }
  static void convert(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
    if (dtype == DType::kFloat32) return convert_scalar(src, dtype, offset, n, dst);
    const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = first(static_cast<int>(std::min<int64_t>(16, n - k)));
      const __m256i h = _mm256_maskz_loadu_epi16(m, s + k);
      const T v = dtype == DType::kFloat16
                      ? _mm512_cvtph_ps(h)
                      : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      _mm512_mask_storeu_ps(dst + k, m, v);
    }
  }
};
constexpr int kMR = 12;
constexpr int kNV = 2;
#include "sigmoid_loss/sigmoid_loss_cpu_kernels.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif  // MEDVL_X86

namespace detail {

Isa best_isa() {
#if MEDVL_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("popcnt"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// The ISA in use: the best the CPU has, lowered by MEDVL_CPU_ISA=scalar|avx2|avx512 if set.
Isa selected_isa() {
  static const Isa isa = [] {
    Isa best = best_isa();
    if (const char* want = std::getenv("MEDVL_CPU_ISA")) {
      const std::string w(want);
      Isa asked = best;
      if (w == "scalar") asked = Isa::kScalar;
      else if (w == "avx2") asked = Isa::kAvx2;
      else if (w == "avx512") asked = Isa::kAvx512;
      if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
    }
    return best;
  }();
  return isa;
}

Plan make_plan(int64_t n_image, int64_t n_text, int64_t dim, bool compute_grad, DType dtype, int threads) {
  Plan p;
  p.isa = selected_isa();
  switch (p.isa) {
#if MEDVL_X86
    case Isa::kAvx512: p.mr = avx512::kMR; p.nr = avx512::NR; p.w = avx512::W; break;
    case Isa::kAvx2: p.mr = avx2::kMR; p.nr = avx2::NR; p.w = avx2::W; break;
#endif
    default: p.mr = scalar::kMR; p.nr = scalar::NR; p.w = scalar::W; break;
  }
  threads = std::max(threads, 1);
  n_image = std::max<int64_t>(n_image, 1);
  n_text = std::max<int64_t>(n_text, 1);
  dim = std::max<int64_t>(dim, 1);
  // Texts per tile: a multiple of both register-tile sides, 192 (fewer for a large dim, so that the
  // two packed copies of the tile stay within about 2 MiB).
  const int64_t nb_step = p.nr / gcd64(p.nr, p.mr) * p.mr;
  const int64_t nb_cap = std::max(nb_step, (262144 / dim) / nb_step * nb_step);
  p.nb = std::min({round_up(192, nb_step), nb_cap, round_up(n_text, nb_step)});
  p.nbp = p.nb;
  // Image rows per block: up to 768, about 576 at dim 512 (a text tile is packed once per row
  // block, so more rows amortise it), and a block count that is a multiple of the thread count.
  const int64_t target_rows = std::max<int64_t>(8 * p.mr, std::min<int64_t>(768, 294912 / dim));
  int64_t blocks = (n_image + target_rows - 1) / target_rows;
  blocks = round_up(blocks, threads);
  p.mb = round_up((n_image + blocks - 1) / blocks, p.mr);
  p.mbp = p.mb;
  p.kc = std::min<int64_t>(dim, 128);  // a kc x NR panel of T^T stays in L1

  const int64_t dim_w = round_up(dim, p.nr);  // column panels are whole tiles of nr
  size_t off = 0;
  auto take = [&](size_t floats) {
    const size_t at = off;
    off += (floats + 15) / 16 * 16;
    return at;
  };
  const bool convert = dtype != DType::kFloat32;
  p.off_xt = take(convert ? p.mbp * dim : 0);
  p.off_tt = take(convert ? p.nbp * dim : 0);
  p.off_xp = take(p.mbp * dim);
  p.off_xr = take(compute_grad ? p.mbp * dim_w : 0);
  p.off_tp = take(p.nbp * dim);
  p.off_tr = take(compute_grad ? p.nbp * dim_w : 0);
  p.off_s = take(p.mbp * p.nbp);
  p.off_gp = take(compute_grad ? p.mbp * p.nbp : 0);
  p.off_y = take(p.nbp + 64);
  p.off_acc = take(4 * p.mbp);  // 2 * mbp doubles
  p.per_thread = off;
  p.partial = compute_grad ? static_cast<size_t>(round_up(n_text * dim, 16)) : 0;
  return p;
}

size_t workspace_floats(const Plan& p, int threads) {
  return p.per_thread * static_cast<size_t>(threads) + p.partial * static_cast<size_t>(threads - 1) + 16;
}

// Flush-to-zero and denormals-are-zero while this thread computes, restored after: with a large
// logit scale, exp(-|z|) and g * feature products fall below FLT_MIN, and denormal arithmetic costs
// microcode assists (measured: 40% slower at logit_scale 300). Changes results by < 1e-38 per term.
struct FlushDenormals {
#if MEDVL_X86
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

using RowBlockFn = void (*)(const RowBlockContext&, int64_t, float*, float*);

RowBlockFn row_block_for(Isa isa) {
  switch (isa) {
#if MEDVL_X86
    case Isa::kAvx512: return &avx512::row_block;
    case Isa::kAvx2: return &avx2::row_block;
#endif
    default: return &scalar::row_block;
  }
}

}  // namespace detail

// The plan depends on dtype only through the conversion buffers: size for the 16-bit case, which
// needs the most, so that the Python side need not pass the dtype.
size_t sigmoid_loss_cpu_workspace_bytes(int64_t n_image, int64_t n_text, int64_t dim, bool compute_grad,
                                        int threads) {
  threads = std::max(threads, 1);
  const detail::Plan p = detail::make_plan(n_image, n_text, dim, compute_grad, DType::kBFloat16, threads);
  return sizeof(float) * detail::workspace_floats(p, threads);
}

void sigmoid_loss_cpu(const SigmoidLossArgs& a, int threads) {
  using namespace detail;
  threads = std::max(threads, 1);
  if (a.n_image < 0 || a.n_text < 0 || a.dim < 1) throw std::invalid_argument("medvl: sigmoid_loss_cpu bad sizes");
  if (a.workspace_bytes < sigmoid_loss_cpu_workspace_bytes(a.n_image, a.n_text, a.dim, a.compute_grad, threads))
    throw std::invalid_argument("medvl: sigmoid_loss_cpu workspace too small");
  if (!a.image || !a.text || !a.logit_scale || !a.logit_bias || !a.row_loss)
    throw std::invalid_argument("medvl: sigmoid_loss_cpu null pointer");
  if (a.compute_grad && (!a.row_gsum || !a.grad_image || !a.grad_text))
    throw std::invalid_argument("medvl: sigmoid_loss_cpu null gradient pointer");
  if (a.target == SigmoidTarget::kLabel && (!a.image_labels || !a.text_labels))
    throw std::invalid_argument("medvl: sigmoid_loss_cpu label target without labels");
  if (a.target == SigmoidTarget::kJaccard && a.label_words > 0 && (!a.image_bits || !a.text_bits))
    throw std::invalid_argument("medvl: sigmoid_loss_cpu jaccard target without label bits");

  const int64_t dim = a.dim;
  if (a.n_image == 0 || a.n_text == 0) {
    std::fill(a.row_loss, a.row_loss + a.n_image, 0.f);
    if (a.compute_grad) {
      std::fill(a.row_gsum, a.row_gsum + a.n_image, 0.f);
      std::fill(a.grad_image, a.grad_image + a.n_image * dim, 0.f);
      std::fill(a.grad_text, a.grad_text + a.n_text * dim, 0.f);
    }
    return;
  }

  const Plan plan = make_plan(a.n_image, a.n_text, dim, a.compute_grad, a.dtype, threads);
  const RowBlockContext ctx{&a, &plan, *a.logit_scale, *a.logit_bias};
  const RowBlockFn row_block = row_block_for(plan.isa);
  // 64-byte align the workspace (the buffer may come from anywhere).
  const uintptr_t base = (reinterpret_cast<uintptr_t>(a.workspace) + 63) & ~static_cast<uintptr_t>(63);
  float* workspace = reinterpret_cast<float*>(base);
  float* partials = workspace + plan.per_thread * threads;  // thread t >= 1: partials + (t-1) * partial
  const int64_t row_blocks = (a.n_image + plan.mb - 1) / plan.mb;
  const int64_t text_elems = a.n_text * dim;
  int used_threads = 1;

#pragma omp parallel num_threads(threads)
  {
    [[maybe_unused]] const FlushDenormals flush{};
    const int tid = omp_get_thread_num();
#pragma omp single
    used_threads = omp_get_num_threads();
    float* scratch = workspace + plan.per_thread * tid;
    float* grad_text = nullptr;
    if (a.compute_grad) {
      grad_text = tid == 0 ? a.grad_text : partials + plan.partial * (tid - 1);
      std::fill(grad_text, grad_text + text_elems, 0.f);
    }
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < row_blocks; ++rb) row_block(ctx, rb, scratch, grad_text);
  }

  if (!a.compute_grad || used_threads == 1) return;
  // grad_text = partial_0 + partial_1 + ... in thread order: independent of scheduling.
  const int64_t chunk = 4096;
  const int64_t chunks = (text_elems + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * chunk, k1 = std::min(text_elems, k0 + chunk);
    float* out = a.grad_text;
    for (int t = 1; t < used_threads; ++t) {
      const float* part = partials + plan.partial * (t - 1);
      for (int64_t k = k0; k < k1; ++k) out[k] += part[k];
    }
  }
}

}  // namespace medvl
