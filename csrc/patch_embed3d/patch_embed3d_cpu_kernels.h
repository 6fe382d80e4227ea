// The per-ISA body of the CPU patch embedding. No include guard on purpose: patch_embed3d_cpu.cpp
// includes this file once per instruction set, inside a namespace (scalar, avx2, avx512) that first
// defines Vec, kMR and kNV, under the matching target region (see common/cpu_gemm_kernels.h).
// It uses Plan and the gather/scatter helpers of patch_embed3d_cpu.cpp's namespace `detail`.
//
// Three passes, each a GEMM whose patch operand is gathered (and windowed) from the raw volume
// tile by tile into a small per-thread buffer, never as a whole im2col matrix:
//   forward      out  = P W^T + bias + pos   A = P tile [k][kMR tokens],  B = W packed [e-panel][k][NR]
//   grad weight  gW   = dY^T P                A = dY as it is (lda E),     B = P tile [k-panel][t][NR]
//   grad volume  dP   = dY W, then scattered  A = dY^T [e][kMR tokens],   B = W packed [k-panel][e][NR]
#include "common/cpu_gemm_kernels.h"

// The gather (convert + window) and scatter loops live here too, so that each ISA vectorises them.
// Windowed value of every raw value in v[0, n), in place.
struct Window {
  bool on;
  float lo, out_lo, out_hi, span, out_span;
  explicit Window(const PatchEmbed3dArgs& a)
      : on(a.has_window), lo(a.window_lo), out_lo(a.out_lo), out_hi(a.out_hi), span(a.window_span),
        out_span(a.out_span) {}
  void apply(float* v, int64_t n) const {
    if (!on) return;
    for (int64_t i = 0; i < n; ++i) {
      const float u = ((v[i] - lo) / span) * out_span + out_lo;
      v[i] = std::min(std::max(u, out_lo), out_hi);  // NaN stays NaN, as torch.clamp
    }
  }
  // d(windowed)/d(raw) times g: torch.clamp passes the gradient only strictly inside (out_lo, out_hi).
  float backward(float raw, float g) const {
    if (!on) return g;
    const float u = ((raw - lo) / span) * out_span + out_lo;
    return (u > out_lo && u < out_hi) ? (g * out_span) / span : 0.f;
  }
};

// 16-bit float volumes, told apart from uint16_t ones by type.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <typename S>
inline float raw_to_float(S v) { return static_cast<float>(v); }
inline int64_t lut_index(int16_t v) { return static_cast<uint16_t>(v); }
inline int64_t lut_index(uint16_t v) { return v; }
inline int64_t lut_index(uint8_t v) { return v; }
template <typename S>
inline int64_t lut_index(S) { return 0; }  // float volumes never take the table
template <>
inline float raw_to_float<Half>(Half v) { return fp16_to_float(v.bits); }
template <>
inline float raw_to_float<BFloat16>(BFloat16 v) { return bf16_to_float(v.bits); }

// Walks the voxels of tokens [t0, t0 + mt) x columns [k0, k0 + kn) as runs along the last axis:
// visit(r, j, offset, inside, run) for token r, tile column j, the run's first voxel offset (valid
// when inside > 0), `inside` voxels in the volume and run - inside padding voxels after them.
template <typename Visit>
inline void for_each_run(const PatchEmbed3dArgs& a, int64_t t0, int64_t mt, int64_t k0, int64_t kn, Visit visit) {
  const int64_t p0 = a.patch[0], p1 = a.patch[1], p2 = a.patch[2];
  const int64_t n1 = a.grid[1], n2 = a.grid[2], N = tokens_per_volume(a);
  const int64_t S0 = a.size[0], S1 = a.size[1], S2 = a.size[2];
  const int64_t plane = S1 * S2, channel = S0 * plane;
  int64_t rest = k0 / p2;
  const int64_t q2_start = k0 % p2, q1_start = rest % p1;
  rest /= p1;
  const int64_t q0_start = rest % p0, c_start = rest / p0;
  for (int64_t r = 0; r < mt; ++r) {
    const int64_t t = t0 + r, b = t / N, n = t % N;
    const int64_t z0 = (n / (n1 * n2)) * p0, y0 = ((n / n2) % n1) * p1, x0 = (n % n2) * p2;
    const int64_t volume_base = b * a.channels * channel;
    int64_t q2 = q2_start, q1 = q1_start, q0 = q0_start, c = c_start;
    for (int64_t j = 0; j < kn;) {
      const int64_t run = std::min(p2 - q2, kn - j);
      const int64_t z = z0 + q0, y = y0 + q1, x = x0 + q2;
      const int64_t inside = (z < S0 && y < S1) ? std::max<int64_t>(0, std::min(run, S2 - x)) : 0;
      visit(r, j, volume_base + c * channel + z * plane + y * S2 + x, inside, run);
      j += run;
      q2 = 0;
      if (++q1 == p1) {
        q1 = 0;
        if (++q0 == p0) {
          q0 = 0;
          ++c;
        }
      }
    }
  }
}

template <typename S>
inline void gather_typed(const PatchEmbed3dArgs& a, int64_t t0, int64_t mt, int64_t k0, int64_t kn, float* tile,
                         int64_t ld, const float* lut) {
  const S* volume = static_cast<const S*>(a.volume);
  const Window window(a);
  for_each_run(a, t0, mt, k0, kn, [&](int64_t r, int64_t j, int64_t offset, int64_t inside, int64_t run) {
    float* dst = tile + r * ld + j;
    const S* src = volume + offset;
    if (lut) {  // integer volumes: the windowed value of every possible raw value, computed once
      if constexpr (sizeof(S) == 2) {  // int16 (two's complement bits) or uint16: the bits are the index
        Vec::lookup16(reinterpret_cast<const uint16_t*>(src), inside, lut, dst);
      } else {
        for (int64_t i = 0; i < inside; ++i) dst[i] = lut[lut_index(src[i])];
      }
    } else {
      for (int64_t i = 0; i < inside; ++i) dst[i] = raw_to_float(src[i]);
      window.apply(dst, inside);
    }
    std::fill(dst + inside, dst + run, 0.f);  // padding: zero after the window
  });
}

// tile[r * ld + j] = windowed value of (token t0 + r, column k0 + j); lut: see build_window_lut.
inline void gather_patches(const PatchEmbed3dArgs& a, int64_t t0, int64_t mt, int64_t k0, int64_t kn, float* tile,
                           int64_t ld, const float* lut) {
  switch (a.volume_type) {
    case VolumeType::kFloat32: return gather_typed<float>(a, t0, mt, k0, kn, tile, ld, nullptr);
    case VolumeType::kFloat16: return gather_typed<Half>(a, t0, mt, k0, kn, tile, ld, nullptr);
    case VolumeType::kBFloat16: return gather_typed<BFloat16>(a, t0, mt, k0, kn, tile, ld, nullptr);
    case VolumeType::kInt16: return gather_typed<int16_t>(a, t0, mt, k0, kn, tile, ld, lut);
    case VolumeType::kUInt8: return gather_typed<uint8_t>(a, t0, mt, k0, kn, tile, ld, lut);
    case VolumeType::kUInt16: return gather_typed<uint16_t>(a, t0, mt, k0, kn, tile, ld, lut);
  }
}

// lut[index] = windowed value of the raw integer with that lut_index, for entries [begin, end): the
// same arithmetic as Window::apply, so the values are bit for bit those of the direct path.
inline void build_window_lut(const PatchEmbed3dArgs& a, int64_t begin, int64_t end, float* lut) {
  for (int64_t i = begin; i < end; ++i)
    lut[i] = a.volume_type == VolumeType::kInt16 ? static_cast<float>(static_cast<int16_t>(static_cast<uint16_t>(i)))
                                                 : static_cast<float>(i);
  Window(a).apply(lut + begin, end - begin);
}

template <typename S>
inline void scatter_typed(const PatchEmbed3dArgs& a, int64_t t0, int64_t mt, int64_t k0, int64_t kn, const float* tile,
                   int64_t ld) {
  const S* volume = static_cast<const S*>(a.volume);
  float* grad = static_cast<float*>(a.grad_volume);
  const Window window(a);
  for_each_run(a, t0, mt, k0, kn, [&](int64_t r, int64_t j, int64_t offset, int64_t inside, int64_t) {
    const float* src = tile + r * ld + j;
    for (int64_t i = 0; i < inside; ++i) grad[offset + i] = window.backward(raw_to_float(volume[offset + i]), src[i]);
  });
}

// grad_volume (fp32) at the voxels of (tokens t0.., columns k0..) = dv/dx * tile; padding is dropped.
inline void scatter_patch_grads(const PatchEmbed3dArgs& a, int64_t t0, int64_t mt, int64_t k0, int64_t kn,
                         const float* tile, int64_t ld) {
  switch (a.volume_type) {
    case VolumeType::kFloat32: return scatter_typed<float>(a, t0, mt, k0, kn, tile, ld);
    case VolumeType::kFloat16: return scatter_typed<Half>(a, t0, mt, k0, kn, tile, ld);
    case VolumeType::kBFloat16: return scatter_typed<BFloat16>(a, t0, mt, k0, kn, tile, ld);
    default: throw std::invalid_argument("medvl: patch_embed3d has no volume gradient for integer volumes");
  }
}


// W (E x K, row-major) as column panels of NR embeddings: panel q holds [k][width_q * W] with
// width_q = min(kNV, vectors left); embeddings past E are zero.
inline void pack_weight_by_embedding(const float* weight, int64_t E, int64_t K, int64_t q, float* packed) {
  const int64_t e0 = q * NR;
  const int64_t vectors = std::min<int64_t>(kNV, (E - e0 + W - 1) / W);
  pack_transposed(weight + e0 * K, K, E - e0, K, static_cast<int>(vectors * W), 1, packed + e0 * K);
}

inline int panel_vectors(int64_t columns_left) {
  return static_cast<int>(std::min<int64_t>(kNV, (columns_left + W - 1) / W));
}

inline int last_lanes(int64_t columns_left, int vectors) {
  return static_cast<int>(std::min<int64_t>(W, columns_left - (vectors - 1) * W));
}

// Forward for tokens [t0, t0 + mt): out rows start as bias + pos, then accumulate P W^T over K blocks.
inline void forward_block(const PatchEmbed3dArgs& a, const Plan& p, const float* packed_w, int64_t t0, int64_t mt,
                          float* scratch) {
  const int64_t K = columns(a), E = a.embed_dim, N = tokens_per_volume(a);
  float* out = static_cast<float*>(a.out);
  for (int64_t r = 0; r < mt; ++r) {
    float* row = out + (t0 + r) * E;
    const float* pos = a.pos_embed ? a.pos_embed + ((t0 + r) % N) * E : nullptr;
    for (int64_t e = 0; e < E; ++e) row[e] = (a.bias ? a.bias[e] : 0.f) + (pos ? pos[e] : 0.f);
  }
  float* tile = scratch + p.off_tile;
  float* panel = scratch + p.off_panel;
  const int64_t panels = (mt + kMR - 1) / kMR;
  for (int64_t k0 = 0; k0 < K; k0 += p.kc) {
    const int64_t kn = std::min(p.kc, K - k0);
    gather_patches(a, t0, mt, k0, kn, tile, kn, p.lut);
    pack_transposed(tile, kn, mt, kn, kMR, panels, panel);
    for (int64_t e0 = 0; e0 < E; e0 += NR) {
      const int vectors = panel_vectors(E - e0);
      const float* b = packed_w + e0 * K + k0 * vectors * W;
      for (int64_t s = 0; s < panels; ++s) {
        const int rows = static_cast<int>(std::min<int64_t>(kMR, mt - s * kMR));
        ukernel_width<kMR>(vectors, kn, panel + s * kMR * kn, kMR, b, out + (t0 + s * kMR) * E + e0, E, rows,
                           last_lanes(E - e0, vectors), true);
      }
    }
  }
}

// grad_weight[e0:e1, k0:k0+kn] = sum over all tokens of dY[t, e] P[t, k]; this task owns the block.
inline void grad_weight_task(const PatchEmbed3dArgs& a, const Plan& p, int64_t k0, int64_t kn, int64_t e0,
                             int64_t e1, float* scratch) {
  const int64_t K = columns(a), E = a.embed_dim, M = a.batch * tokens_per_volume(a);
  const float* grad_out = static_cast<const float*>(a.grad_out);
  float* tile = scratch + p.off_tile;
  float* panel = scratch + p.off_panel;
  float* tail = scratch + p.off_tail;  // the last rows of dY when fewer than kMR embeddings are left
  for (int64_t e = e0; e < e1; ++e) std::fill(a.grad_weight + e * K + k0, a.grad_weight + e * K + k0 + kn, 0.f);
  for (int64_t t0 = 0; t0 < M; t0 += p.tc) {
    const int64_t mt = std::min(p.tc, M - t0);
    gather_patches(a, t0, mt, k0, kn, tile, kn, p.lut);
    pack_columns(tile, kn, mt, kn, mt, panel);
    for (int64_t e = e0; e < e1; e += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, e1 - e));
      const float* A = grad_out + t0 * E + e;
      int64_t lda = E;
      if (e + kMR > E) {  // the micro-kernel reads kMR values per token: don't run past dY's end
        for (int64_t t = 0; t < mt; ++t)
          for (int r = 0; r < kMR; ++r) tail[t * kMR + r] = r < rows ? A[t * E + r] : 0.f;
        A = tail;
        lda = kMR;
      }
      for (int64_t c0 = 0; c0 < kn; c0 += NR) {
        const int vectors = panel_vectors(kn - c0);
        ukernel_width<kMR>(vectors, mt, A, lda, panel + c0 * mt, a.grad_weight + e * K + k0 + c0, K, rows,
                           last_lanes(kn - c0, vectors), true);
      }
    }
  }
}

// grad_volume for the voxels of tokens [t0, t0 + mt): dP = dY W block by block of columns, scattered.
inline void grad_volume_block(const PatchEmbed3dArgs& a, const Plan& p, const float* packed_w, int64_t t0, int64_t mt,
                              float* scratch) {
  const int64_t K = columns(a), E = a.embed_dim;
  const float* grad_out = static_cast<const float*>(a.grad_out);
  float* panel = scratch + p.off_panel;
  float* tile = scratch + p.off_tile;
  const int64_t panels = (mt + kMR - 1) / kMR;
  pack_transposed(grad_out + t0 * E, E, mt, E, kMR, panels, panel);
  for (int64_t k0 = 0; k0 < K; k0 += p.kb) {
    const int64_t kn = std::min(p.kb, K - k0);
    for (int64_t c0 = 0; c0 < kn; c0 += NR) {
      const int vectors = panel_vectors(kn - c0);
      const float* b = packed_w + (k0 + c0) * E;
      for (int64_t s = 0; s < panels; ++s) {
        const int rows = static_cast<int>(std::min<int64_t>(kMR, mt - s * kMR));
        ukernel_width<kMR>(vectors, E, panel + s * kMR * E, kMR, b, tile + s * kMR * kn + c0, kn, rows,
                           last_lanes(kn - c0, vectors), false);
      }
    }
    scatter_patch_grads(a, t0, mt, k0, kn, tile, kn);
  }
}
