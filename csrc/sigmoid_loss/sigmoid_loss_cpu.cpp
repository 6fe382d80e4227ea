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
#include "sigmoid_loss/sigmoid_loss_target.h"
#include "common/cpu_simd.h"

namespace medvl {
namespace detail {

using cpu::Isa;

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
  const SigmoidTargets targets = targets_of(a);
  for (int64_t j = 0; j < n; ++j) y[j] = sigmoid_target(targets, i, j0 + j);
}
using cpu::convert_scalar;

}  // namespace detail

#define MEDVL_CPU_KERNELS "sigmoid_loss/sigmoid_loss_cpu_kernels.h"
#include "common/cpu_isa_instances.h"

namespace detail {

using cpu::selected_isa;

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
