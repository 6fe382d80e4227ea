// CPU patch embedding: the window, the patch gather and the projection in one pass over the raw
// volume, OpenMP over blocks of tokens (forward, grad volume) or of weight columns (grad weight).
//
// Patches are gathered from the raw volume a tile at a time (a few hundred tokens x a few hundred
// columns, in each thread's L2) and multiplied with the packed-panel FMA micro-kernel of
// common/cpu_gemm_kernels.h: 2 M K E FLOPs per GEMM, no im2col matrix and no windowed copy of the
// volume. The backward passes gather again from the raw volume. Every output element is written by
// one thread in a fixed order: results do not depend on the thread count or the run.
//
// The window arithmetic is the reference's, operation for operation (this file is compiled with
// -ffp-contract=off so that no multiply-add is fused), so the windowed values match PyTorch's bit
// for bit; only the GEMM's summation order differs.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/cpu_simd.h"
#include "patch_embed3d/patch_embed3d.h"

namespace medvl {
// Everything of this op in its own namespace: the other CPU ops have their own Plan, scalar::, avx2::...
namespace patch_embed3d_impl {
namespace detail {

using cpu::Isa;

inline int64_t columns(const PatchEmbed3dArgs& a) { return a.channels * a.patch[0] * a.patch[1] * a.patch[2]; }
inline int64_t tokens_per_volume(const PatchEmbed3dArgs& a) { return a.grid[0] * a.grid[1] * a.grid[2]; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Tile sizes and one thread's scratch (floats, each piece 64-byte aligned).
struct Plan {
  Isa isa = Isa::kScalar;
  int mr = 1, nr = 1;
  int64_t blocks = 1;  // token blocks (forward, grad volume), a multiple of the thread count
  int64_t mb = 0;      // the most tokens a block can have (its buffers' size)
  int64_t kc = 0;  // K block of the forward GEMM
  int64_t tc = 0;  // tokens per chunk of the grad-weight GEMM
  int64_t kb = 0;  // columns per block (grad weight tasks, grad volume): a multiple of nr
  size_t off_tile = 0, off_panel = 0, off_tail = 0, per_thread = 0;
  size_t shared = 0;  // the packed weight, before the per-thread pieces
  int64_t lut_entries = 0;  // integer volume with a window: windowed value per raw value (after `shared`)
  const float* lut = nullptr;
};

}  // namespace detail

#define MEDVL_CPU_KERNELS "patch_embed3d/patch_embed3d_cpu_kernels.h"
#include "common/cpu_isa_instances.h"

namespace detail {

struct IsaKernels {
  void (*pack_weight_by_embedding)(const float*, int64_t, int64_t, int64_t, float*);
  void (*pack_columns)(const float*, int64_t, int64_t, int64_t, int64_t, float*);
  void (*forward_block)(const PatchEmbed3dArgs&, const Plan&, const float*, int64_t, int64_t, float*);
  void (*grad_weight_task)(const PatchEmbed3dArgs&, const Plan&, int64_t, int64_t, int64_t, int64_t, float*);
  void (*grad_volume_block)(const PatchEmbed3dArgs&, const Plan&, const float*, int64_t, int64_t, float*);
  void (*build_window_lut)(const PatchEmbed3dArgs&, int64_t, int64_t, float*);
  int mr, nr;
};

#define MEDVL_ISA_KERNELS(ns)                                                                        \
  IsaKernels {                                                                                       \
    &ns::pack_weight_by_embedding, &ns::pack_columns, &ns::forward_block, &ns::grad_weight_task,     \
        &ns::grad_volume_block, &ns::build_window_lut, ns::kMR, ns::NR                               \
  }

IsaKernels kernels_for(Isa isa) {
  switch (isa) {
#if MEDVL_X86
    case Isa::kAvx512: return MEDVL_ISA_KERNELS(avx512);
    case Isa::kAvx2: return MEDVL_ISA_KERNELS(avx2);
#endif
    default: return MEDVL_ISA_KERNELS(scalar);
  }
}
#undef MEDVL_ISA_KERNELS

// First token of block `blk` of `blocks`: boundaries fall between micro-panels of mr tokens and
// every block holds the same number of panels, give or take one, so that the threads (each taking
// blocks / threads consecutive blocks) multiply the same number of panels; only the very last
// panel may be partial.
int64_t block_start(const Plan& p, int64_t blk, int64_t blocks, int64_t M) {
  const int64_t panels = (M + p.mr - 1) / p.mr;
  return std::min(M, (blk * panels / blocks) * p.mr);
}

Plan make_plan(const PatchEmbed3dArgs& a, PatchEmbed3dPass pass, int threads) {
  Plan p;
  p.isa = cpu::selected_isa();
  const IsaKernels k = kernels_for(p.isa);
  p.mr = k.mr;
  p.nr = k.nr;
  const int64_t K = std::max<int64_t>(columns(a), 1), E = std::max<int64_t>(a.embed_dim, 1);
  const int64_t M = std::max<int64_t>(a.batch * tokens_per_volume(a), 1);
  // Token blocks: about 192 tokens, as many blocks as a multiple of the thread count. Forward: one
  // 256-column weight panel (256 x NR, 32 KiB with AVX-512) stays in L1 while the block's packed
  // patch panels (192 x 256, in L2) stream past it; kc = 256 beat 128 by ~6% and matched 384/512.
  // Sizes measured on a 2-core AVX-512 Xeon (48 KiB L1, 2 MiB L2).
  int64_t blocks = (M + 191) / 192;
  blocks = round_up(blocks, threads);
  p.blocks = blocks;
  p.mb = ((M + p.mr - 1) / p.mr + blocks - 1) / blocks * p.mr;
  p.kc = std::min<int64_t>(K, 256);
  p.tc = std::min<int64_t>(M, 128);
  p.kb = std::min(round_up(K, p.nr), round_up(512, p.nr));
  size_t off = 0;
  auto take = [&](size_t floats) {
    const size_t at = off;
    off += (floats + 15) / 16 * 16;
    return at;
  };
  switch (pass) {
    case PatchEmbed3dPass::kForward:
      p.shared = round_up(E, p.nr) * K;  // W as embedding panels
      p.off_tile = take(p.mb * p.kc);
      p.off_panel = take(round_up(p.mb, p.mr) * p.kc);
      break;
    case PatchEmbed3dPass::kGradWeight:
      p.off_tile = take(p.tc * p.kb);
      p.off_panel = take(p.tc * round_up(p.kb, p.nr));
      p.off_tail = take(p.tc * p.mr);
      break;
    case PatchEmbed3dPass::kGradVolume:
      p.shared = round_up(K, p.nr) * E;  // W as column panels
      p.off_panel = take(round_up(p.mb, p.mr) * E);
      p.off_tile = take(round_up(p.mb, p.mr) * p.kb);
      break;
  }
  p.per_thread = off;
  p.shared = (p.shared + 15) / 16 * 16;
  // A table of 2^16 (or 256) windowed values replaces a convert, a division and a clamp per voxel
  // read; the gradient pass re-reads raw values only for float volumes, which never use it.
  if (a.has_window && pass != PatchEmbed3dPass::kGradVolume) {
    if (a.volume_type == VolumeType::kInt16 || a.volume_type == VolumeType::kUInt16) p.lut_entries = 65536;
    if (a.volume_type == VolumeType::kUInt8) p.lut_entries = 256;
  }
  return p;
}

size_t workspace_floats(const Plan& p, int threads) {
  return p.shared + (p.lut_entries + 15) / 16 * 16 + p.per_thread * threads + 16;
}

void check_args(const PatchEmbed3dArgs& a, PatchEmbed3dPass pass) {
  if (a.batch < 1 || a.channels < 1 || a.embed_dim < 1) throw std::invalid_argument("medvl: empty patch_embed3d");
  for (int i = 0; i < 3; ++i) {
    if (a.patch[i] < 1 || a.size[i] < 1) throw std::invalid_argument("medvl: patch_embed3d sizes must be positive");
    if (a.grid[i] != (a.size[i] + a.patch[i] - 1) / a.patch[i])
      throw std::invalid_argument("medvl: patch_embed3d grid[i] must be ceil(size[i] / patch[i])");
  }
  if (a.weight_type != DType::kFloat32) throw std::invalid_argument("medvl: the CPU patch_embed3d takes fp32 weights");
  if (pass == PatchEmbed3dPass::kForward && (a.out == nullptr || a.out_type != DType::kFloat32))
    throw std::invalid_argument("medvl: the CPU patch_embed3d writes an fp32 output");
  if (pass != PatchEmbed3dPass::kForward && (a.grad_out == nullptr || a.grad_out_type != DType::kFloat32))
    throw std::invalid_argument("medvl: the CPU patch_embed3d backward takes an fp32 grad_out");
  if (pass == PatchEmbed3dPass::kGradWeight && a.grad_weight == nullptr)
    throw std::invalid_argument("medvl: patch_embed3d grad weight pass needs grad_weight");
  if (pass == PatchEmbed3dPass::kGradVolume && a.grad_volume == nullptr)
    throw std::invalid_argument("medvl: patch_embed3d grad volume pass needs grad_volume");
}

}  // namespace detail
}  // namespace patch_embed3d_impl

size_t patch_embed3d_cpu_workspace_bytes(const PatchEmbed3dArgs& args, int pass, int threads) {
  threads = std::max(threads, 1);
  const patch_embed3d_impl::detail::Plan p =
      patch_embed3d_impl::detail::make_plan(args, static_cast<PatchEmbed3dPass>(pass), threads);
  return patch_embed3d_impl::detail::workspace_floats(p, threads) * sizeof(float);
}

void patch_embed3d_cpu(const PatchEmbed3dArgs& args, int pass_code, int threads) {
  using namespace patch_embed3d_impl::detail;
  if (pass_code < 0 || pass_code > 2) throw std::invalid_argument("medvl: unknown patch_embed3d pass");
  const auto pass = static_cast<PatchEmbed3dPass>(pass_code);
  check_args(args, pass);
  threads = std::max(threads, 1);
  Plan plan = make_plan(args, pass, threads);
  if (args.workspace_bytes < workspace_floats(plan, threads) * sizeof(float))
    throw std::invalid_argument("medvl: patch_embed3d workspace too small");
  const IsaKernels kernels = kernels_for(plan.isa);
  float* shared = static_cast<float*>(args.workspace);
  float* lut = shared + plan.shared;
  float* per_thread = lut + (plan.lut_entries + 15) / 16 * 16;
  if (plan.lut_entries > 0) {
    const int64_t chunk = 4096;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t begin = 0; begin < plan.lut_entries; begin += chunk)
      kernels.build_window_lut(args, begin, std::min(plan.lut_entries, begin + chunk), lut);
    plan.lut = lut;
  }
  const float* weight = static_cast<const float*>(args.weight);
  const int64_t K = columns(args), E = args.embed_dim, M = args.batch * tokens_per_volume(args);

  switch (pass) {
    case PatchEmbed3dPass::kForward: {
      const int64_t blocks = plan.blocks, embedding_panels = (E + plan.nr - 1) / plan.nr;
#pragma omp parallel num_threads(threads)
      {
        float* scratch = per_thread + plan.per_thread * omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t q = 0; q < embedding_panels; ++q) kernels.pack_weight_by_embedding(weight, E, K, q, shared);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t t0 = block_start(plan, blk, blocks, M), t1 = block_start(plan, blk + 1, blocks, M);
          if (t0 < t1) kernels.forward_block(args, plan, shared, t0, t1 - t0, scratch);
        }
      }
      return;
    }
    case PatchEmbed3dPass::kGradWeight: {
      // Tasks own (column block x embedding range) blocks of grad_weight; split the embeddings only
      // when there are too few column blocks to keep every thread busy.
      const int64_t column_blocks = (K + plan.kb - 1) / plan.kb;
      const int64_t embedding_steps = (E + plan.mr - 1) / plan.mr;
      const int64_t splits = std::min(embedding_steps, std::max<int64_t>(1, (2 * threads + column_blocks - 1) /
                                                                                column_blocks));
      const int64_t step_per_split = (embedding_steps + splits - 1) / splits;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
      for (int64_t cb = 0; cb < column_blocks; ++cb) {
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t k0 = cb * plan.kb, e0 = s * step_per_split * plan.mr;
          const int64_t e1 = std::min(E, e0 + step_per_split * plan.mr);
          if (e0 < e1)
            kernels.grad_weight_task(args, plan, k0, std::min(plan.kb, K - k0), e0, e1,
                                     per_thread + plan.per_thread * omp_get_thread_num());
        }
      }
      return;
    }
    case PatchEmbed3dPass::kGradVolume: {
      kernels.pack_columns(weight, K, E, K, E, shared);
      const int64_t blocks = plan.blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t t0 = block_start(plan, blk, blocks, M), t1 = block_start(plan, blk + 1, blocks, M);
        if (t0 < t1)
          kernels.grad_volume_block(args, plan, shared, t0, t1 - t0,
                                    per_thread + plan.per_thread * omp_get_thread_num());
      }
      return;
    }
  }
}

}  // namespace medvl
