// The per-ISA body of the CPU sigmoid loss: GEMM micro-kernel, packing, vectorised exp/log1p, and
// the work on one image row block. No include guard on purpose: sigmoid_loss_cpu.cpp includes this
// file once per instruction set, inside a namespace (scalar, avx2, avx512) that first defines
//   struct Vec  -- the vector type and its operations (W lanes of float),
//   kMR, kNV    -- the register tile of the micro-kernel: kMR rows x kNV vectors of W columns,
// under `#pragma GCC target` (or clang's equivalent), so every function here is compiled for that ISA.
// It uses Plan, RowBlockContext and the helpers of sigmoid_loss_cpu.cpp's namespace `detail`.
//
// One tile (MB image rows x NB texts) does three GEMMs on packed fp32 panels:
//   S   = X T^T                 A = Xp [i-panel][d][kMR],  B = Tp [j-panel][d][NR]   (K = dim)
//   G   = sigmoid(s S + b) - y  in place over S, with the row sums of the loss and of G
//   gI += G T                   A = Gp [i-panel][j][kMR],  B = Tr [d-panel][j][NR]   (K = n_j)
//   gT += G^T X                 A = G (row-major, lda NBp), B = Xr [d-panel][i][NR]   (K = n_i)
// K never needs padding; M rows past the edge are computed but not stored; N columns past dim are
// zero in the packed panels and masked on store.

#include "common/cpu_gemm_kernels.h"

// ---------------------------------------------------------------------------------------------
// Element-wise: exp(-a) for a >= 0 and log1p(e) for e in [0, 1], both to ~1 ulp.
// ---------------------------------------------------------------------------------------------

MEDVL_INLINE V exp_neg(V a) {
  // Cephes expf: exp(x) = 2^n exp(r), x = n ln2 + r, |r| <= ln2/2; below ln(FLT_MIN), 0.
  const V x0 = Vec::sub(Vec::zero(), a);
  const M underflow = Vec::lt(x0, Vec::set1(-87.33654f));
  const V x = Vec::max(x0, Vec::set1(-87.33654f));
  const V n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  V r = Vec::fmadd(n, Vec::set1(-0.693359375f), x);
  r = Vec::fmadd(n, Vec::set1(2.12194440e-4f), r);
  V p = Vec::set1(1.9875691500e-4f);
  p = Vec::fmadd(p, r, Vec::set1(1.3981999507e-3f));
  p = Vec::fmadd(p, r, Vec::set1(8.3334519073e-3f));
  p = Vec::fmadd(p, r, Vec::set1(4.1665795894e-2f));
  p = Vec::fmadd(p, r, Vec::set1(1.6666665459e-1f));
  p = Vec::fmadd(p, r, Vec::set1(5.0000001201e-1f));
  p = Vec::fmadd(p, Vec::mul(r, r), Vec::add(r, Vec::set1(1.f)));
  return Vec::select(underflow, Vec::mul(p, Vec::pow2n(n)), Vec::zero());
}

MEDVL_INLINE V log1p_unit(V e) {
  // log1p(e) = 2 atanh(w), w = e / (2 + e) in [0, 1/3]: the series to w^13 is within 1.4e-8 relative.
  const V w = Vec::mul(e, Vec::recip(Vec::add(e, Vec::set1(2.f))));
  const V t = Vec::mul(w, w);
  V p = Vec::set1(1.f / 13.f);
  p = Vec::fmadd(p, t, Vec::set1(1.f / 11.f));
  p = Vec::fmadd(p, t, Vec::set1(1.f / 9.f));
  p = Vec::fmadd(p, t, Vec::set1(1.f / 7.f));
  p = Vec::fmadd(p, t, Vec::set1(1.f / 5.f));
  p = Vec::fmadd(p, t, Vec::set1(1.f / 3.f));
  p = Vec::fmadd(p, t, Vec::set1(1.f));
  return Vec::mul(Vec::add(w, w), p);
}

// S row (n columns, z = scale*s + bias) -> G row in place; returns the sums of loss and of g.
// y holds the targets (at least n, read in whole vectors); lanes past n are zeroed in G.
inline void loss_row(float* s_row, const float* y, int64_t n, float scale, float bias, bool write_g,
                     float* loss_sum, float* g_sum) {
  const V vs = Vec::set1(scale), vb = Vec::set1(bias), one = Vec::set1(1.f), zero = Vec::zero();
  V acc_loss = zero, acc_g = zero;
  for (int64_t j = 0; j < n; j += W) {
    const V z = Vec::fmadd(Vec::load(s_row + j), vs, vb);
    const V yv = Vec::load(y + j);
    const V e = exp_neg(Vec::abs(z));
    // max(z, 0) - y z as (step(z) - y) z: exact for a positive with y = 1 (no cancellation).
    const M positive = Vec::ge(z, zero);
    V loss = Vec::fmadd(Vec::sub(Vec::select(positive, zero, one), yv), z, log1p_unit(e));
    const V r = Vec::recip(Vec::add(one, e));
    const V sig = Vec::select(positive, Vec::mul(e, r), r);
    V g = Vec::sub(sig, yv);
    if (n - j < W) {
      const int left = static_cast<int>(n - j);
      loss = Vec::keep(loss, left);
      g = Vec::keep(g, left);
    }
    if (write_g) Vec::store(s_row + j, g);
    acc_loss = Vec::add(acc_loss, loss);
    acc_g = Vec::add(acc_g, g);
  }
  *loss_sum = Vec::hsum(acc_loss);
  *g_sum = Vec::hsum(acc_g);
}

// ---------------------------------------------------------------------------------------------
// One image row block against every text tile.
// ---------------------------------------------------------------------------------------------

inline void row_block(const RowBlockContext& ctx, int64_t rb, float* scratch, float* grad_text) {
  const SigmoidLossArgs& a = *ctx.args;
  const Plan& p = *ctx.plan;
  const int64_t dim = a.dim;
  const bool grad = a.compute_grad;
  const int64_t i0 = rb * p.mb;
  const int64_t ni = std::min(p.mb, a.n_image - i0);
  const int64_t i_panels = (ni + kMR - 1) / kMR;

  float* xt = scratch + p.off_xt;
  float* tt = scratch + p.off_tt;
  float* xp = scratch + p.off_xp;
  float* xr = scratch + p.off_xr;
  float* tp = scratch + p.off_tp;
  float* tr = scratch + p.off_tr;
  float* s = scratch + p.off_s;
  float* gp = scratch + p.off_gp;
  float* y = scratch + p.off_y;
  double* acc = reinterpret_cast<double*>(scratch + p.off_acc);

  // The image rows, as fp32 row-major, packed both ways.
  const float* x = nullptr;
  if (a.dtype == DType::kFloat32) {
    x = static_cast<const float*>(a.image) + i0 * dim;
  } else {
    Vec::convert(a.image, a.dtype, i0 * dim, ni * dim, xt);
    x = xt;
  }
  pack_transposed(x, dim, ni, dim, kMR, i_panels, xp);
  if (grad) {
    pack_columns(x, dim, ni, dim, p.mbp, xr);
    std::fill(a.grad_image + i0 * dim, a.grad_image + (i0 + ni) * dim, 0.f);
  }
  std::fill(acc, acc + 2 * p.mbp, 0.0);
  std::fill(s, s + p.mbp * p.nbp, 0.f);
  std::fill(y, y + p.nbp, 0.f);

  const float scale = ctx.scale, bias = ctx.bias;
  const int64_t dim_vectors = (dim + W - 1) / W;
  const int64_t d_panels = (dim_vectors + kNV - 1) / kNV;

  for (int64_t j0 = 0; j0 < a.n_text; j0 += p.nb) {
    const int64_t nj = std::min(p.nb, a.n_text - j0);
    const int64_t j_panels = (nj + NR - 1) / NR;
    const float* t = nullptr;
    if (a.dtype == DType::kFloat32) {
      t = static_cast<const float*>(a.text) + j0 * dim;
    } else {
      Vec::convert(a.text, a.dtype, j0 * dim, nj * dim, tt);
      t = tt;
    }
    pack_transposed(t, dim, nj, dim, NR, j_panels, tp);
    if (grad) pack_columns(t, dim, nj, dim, p.nbp, tr);

    // S = X T^T, blocked over dim so that a B panel stays in L1.
    for (int64_t k0 = 0; k0 < dim; k0 += p.kc) {
      const int64_t kn = std::min(p.kc, dim - k0);
      for (int64_t jp = 0; jp < j_panels; ++jp)
        for (int64_t ip = 0; ip < i_panels; ++ip)
          ukernel<kMR, kNV>(kn, xp + ip * kMR * dim + k0 * kMR, kMR, tp + jp * NR * dim + k0 * NR,
                            s + ip * kMR * p.nbp + jp * NR, p.nbp, kMR, W, k0 > 0);
    }

    // G and the row sums.
    for (int64_t i = 0; i < ni; ++i) {
      fill_targets(a, i0 + i, j0, nj, y);
      float loss_sum, g_sum;
      loss_row(s + i * p.nbp, y, nj, scale, bias, grad, &loss_sum, &g_sum);
      acc[i] += loss_sum;
      acc[p.mbp + i] += g_sum;
    }
    if (!grad) continue;

    // grad_image[i0:, :] += G T: A = G transposed into [i-panel][j][kMR].
    pack_transposed(s, p.nbp, ni, nj, kMR, i_panels, gp);
    for (int64_t q = 0; q < d_panels; ++q) {
      const int width = static_cast<int>(std::min<int64_t>(kNV, dim_vectors - q * kNV));
      const int n_last = static_cast<int>(dim - (q * NR + (width - 1) * W));
      for (int64_t ip = 0; ip < i_panels; ++ip)
        ukernel_width<kMR>(width, nj, gp + ip * kMR * nj, kMR, tr + q * NR * p.nbp,
                           a.grad_image + (i0 + ip * kMR) * dim + q * NR, dim,
                           static_cast<int>(std::min<int64_t>(kMR, ni - ip * kMR)), n_last, true);
    }
    // grad_text[j0:, :] += G^T X: A = G read in place (row i at stride NBp, kMR texts contiguous).
    const int64_t jq_panels = (nj + kMR - 1) / kMR;
    for (int64_t q = 0; q < d_panels; ++q) {
      const int width = static_cast<int>(std::min<int64_t>(kNV, dim_vectors - q * kNV));
      const int n_last = static_cast<int>(dim - (q * NR + (width - 1) * W));
      for (int64_t jq = 0; jq < jq_panels; ++jq)
        ukernel_width<kMR>(width, ni, s + jq * kMR, p.nbp, xr + q * NR * p.mbp,
                           grad_text + (j0 + jq * kMR) * dim + q * NR, dim,
                           static_cast<int>(std::min<int64_t>(kMR, nj - jq * kMR)), n_last, true);
    }
  }

  for (int64_t i = 0; i < ni; ++i) {
    a.row_loss[i0 + i] = static_cast<float>(acc[i]);
    if (grad) a.row_gsum[i0 + i] = static_cast<float>(acc[p.mbp + i]);
  }
}
