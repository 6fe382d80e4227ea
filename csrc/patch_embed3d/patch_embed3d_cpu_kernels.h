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
    gather_patches(a, t0, mt, k0, kn, tile, kn);
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
    gather_patches(a, t0, mt, k0, kn, tile, kn);
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
