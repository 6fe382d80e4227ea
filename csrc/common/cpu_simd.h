#pragma once
// CPU vector types shared by the compiled CPU kernels: one `Vec` per instruction set (scalar,
// AVX2+FMA, AVX-512), each compiled under its own target attribute, and the run-time choice of the
// instruction set (the best the CPU has; MEDVL_CPU_ISA=scalar|avx2|avx512 lowers it, for tests).
// An op's per-ISA code opens the same target region (MEDVL_TARGET_*_BEGIN/END) around a namespace
// that aliases the matching Vec and includes its kernel body (see cpu_gemm_kernels.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/dtype.h"

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

#if defined(__clang__)
#define MEDVL_TARGET_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,popcnt\"))), apply_to = function)")
#define MEDVL_TARGET_AVX2_END _Pragma("clang attribute pop")
#define MEDVL_TARGET_AVX512_BEGIN                                                                               \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt\"))), apply_to = function)")
#define MEDVL_TARGET_AVX512_END _Pragma("clang attribute pop")
#else
#define MEDVL_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,popcnt\")")
#define MEDVL_TARGET_AVX2_END _Pragma("GCC pop_options")
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* (PR 105593).
#define MEDVL_TARGET_AVX512_BEGIN                                                                        \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt\")") \
      _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define MEDVL_TARGET_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

namespace medvl {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };


inline void convert_scalar(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
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

inline Isa best_isa() {
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
inline Isa selected_isa() {
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

// Portable C++: W = 1 (compilers may vectorise the scalar tile for the baseline ISA).
namespace scalar {
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
  // dst[i] = table[index[i]] for i < n (16-bit indices).
  static void lookup16(const uint16_t* index, int64_t n, const float* table, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = table[index[i]];
  }
  static void convert(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
    convert_scalar(src, dtype, offset, n, dst);
  }
};
}  // namespace scalar

#if MEDVL_X86
MEDVL_TARGET_AVX2_BEGIN
// AVX2 + FMA: W = 8.
namespace avx2 {
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
  static void lookup16(const uint16_t* index, int64_t n, const float* table, float* dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i k = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(index + i)));
      _mm256_storeu_ps(dst + i, _mm256_i32gather_ps(table, k, 4));
    }
    for (; i < n; ++i) dst[i] = table[index[i]];
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
}  // namespace avx2
MEDVL_TARGET_AVX2_END

MEDVL_TARGET_AVX512_BEGIN
// AVX-512: W = 16.
namespace avx512 {
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
  static void lookup16(const uint16_t* index, int64_t n, const float* table, float* dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i k = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(index + i)));
      _mm512_storeu_ps(dst + i, _mm512_i32gather_ps(k, table, 4));
    }
    for (; i < n; ++i) dst[i] = table[index[i]];
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
}  // namespace avx512
MEDVL_TARGET_AVX512_END
#endif  // MEDVL_X86

}  // namespace cpu
}  // namespace medvl
