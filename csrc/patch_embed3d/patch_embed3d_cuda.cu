// CUDA 3D patch embedding: implicit GEMMs over the raw volume. No im2col buffer and no windowed copy
// of the volume exist; every operand tile of the virtual [M = B N, K] patch matrix V is gathered from
// the volume by index arithmetic, windowed in registers and written to shared memory as the MMA
// operand. The math is that of patch_embed3d.h / medvl/reference/patch_embed3d.py.
//
// Three kernels, one tile machinery (block = 256 threads = 8 warps, C tile BM x BN = 64 x 64, reduction
// in steps of BK = 32):
//
//   forward      C[t, e] = V[t, :] . W[e, :]     block (64 tokens, 64 embed columns), loop over K;
//                A = V gathered [token][k], B = W rows [e][k]. Epilogue: + bias, + pos_embed (fp32),
//                one rounding to out_type.
//   grad_weight  C[e, k] = sum_t G[t, e] V[t, k] block (x: 64 embed rows x 64 columns k, z: token split),
//                loop over the split's tokens; A = G^T staged [t][e], B = V gathered [t][k]. With few
//                output tiles the tokens are split (grad_weight_splits, shapes only): each split
//                writes an fp32 partial into the workspace, and reduce_splits sums them in split order,
//                so the result is bitwise deterministic and uses no atomics.
//   grad_volume  C[t, k] = sum_e G[t, e] W[e, k] block (64 tokens, 64 columns k), loop over E;
//                A = G staged [t][e], B = W staged [e][k]. Epilogue: the window derivative (the raw
//                voxel is re-read) and a plain store at the voxel of (t, k): (t, k) -> voxel is a
//                bijection onto the volume when grid = ceil(size / patch), so nothing is zeroed first.
//
// Block order (forward and grad_volume): a 1-D grid in which the output's column tiles vary fastest,
// so the blocks that gather the same 64 tokens run together and their voxels come from L2: a volume
// larger than L2 is read from DRAM about once, not once per column tile (E / 64 or K / 64 times).
// grad_weight: the embed tiles vary fastest in grid x, so the E / 64 blocks that gather the same 64
// columns of V (a 64th of the volume) run together and share them through L2.
//
// Gathers: a token is split once into (base offset, room per axis) and a column into (offset,
// q0, q1, q2) (TokenSlot / ColumnSlot, kept in shared memory for the tile's rows and the current
// chunk's columns); a voxel is the sum of the two offsets and lies inside the volume iff q_i < room_i
// on every axis. Out-of-volume, past-M and past-K elements are staged as 0 (after the window: the
// window maps 0 to out_lo, the reference pads with 0), so edge tiles need no other special case and
// every store to global memory is masked per element.
//
// Arithmetic: fp16/bf16 weights use tensor cores through nvcuda::wmma (16x16x16, fp32 accumulate);
// the windowed values and grad_out are rounded to the weight's type for the MMA. fp32 weights use a
// register-blocked FMA tile (4 x 4 per thread) in plain fp32 (no TF32). One exception: a uint16
// volume without a window holds values up to 65535 > 65504 (fp16's largest finite value), so with an
// fp16 weight V would overflow; there the forward and grad_weight operands stay fp32 (the weight is
// widened in shared memory) and the FMA tile is used.
// The window is a multiply and an add per gathered element, u = (x - lo) * r + out_lo with the slope
// r = fp32(out_span / window_span) (the quotient of the two fp32 spans in double, rounded once, as
// kernels/patch_embed3d.py's window_slope computes it), each operation rounded to nearest by an
// intrinsic (__fsub_rn, __fmul_rn, __fadd_rn: no contraction), then clamped with NaN propagated: bit
// for bit the Triton backend's values, within 2^-22 max(|out_lo|, |out_hi|, span) of PyTorch's
// division (the tolerance is derived and tested in kernels/patch_embed3d.py and its tests). The
// derivative is r strictly inside the window (lo < x < hi), 0 elsewhere, as Triton's.
//
// Vector gathers (vec_gather): where 16 bytes of voxels divide p2 and size2 and the volume is 16-byte
// aligned, the columns of a tile come in aligned runs of kVec contiguous voxels that lie all inside or
// all outside the volume (a token's base and a run's first column offset are multiples of kVec), so
// each run is one 16-byte load, converted and windowed in registers. Otherwise, one voxel per load.
//
// Shared memory (dynamic, < 48 KiB in every instantiation): A and B tiles (padded strides), the fp32
// C tile the accumulators are staged through for the epilogue, and 64 token + 64 column slots.
// Everything but the WMMA tile, the kernels and the launches is in patch_embed3d_tile.cuh: device
// helpers that take the thread index as a parameter (__host__ __device__), which the host emulation
// (patch_embed3d_emulation.cpp, driven by the tests) runs thread by thread for fp32 weights.
#include <mma.h>

#include "patch_embed3d/patch_embed3d_tile.cuh"

namespace medvl {
namespace {

// Warp w owns rows 16 (w % 4) .. +16, columns 32 (w / 4) .. +32 (two 16 x 16 fragments). Fragments are
// loaded from and stored to shared memory only, so edge tiles need no special case.
template <typename T, bool kAMajorM, bool kBMajorN>
struct WmmaTile {
  using L = Layout<T, kAMajorM, kBMajorN>;
  using ALayout = std::conditional_t<kAMajorM, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using BLayout = std::conditional_t<kBMajorN, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
  }

  __device__ void step(const T* a_s, const T* b_s, int tid) {
    using namespace nvcuda;
    const int warp = tid / 32, wm = warp % 4, wn = warp / 4;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> af;
      wmma::load_matrix_sync(af, L::a_ptr(a_s, wm * 16, kk), L::kLDA);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> bf;
        wmma::load_matrix_sync(bf, L::b_ptr(b_s, kk, wn * 32 + f * 16), L::kLDB);
        wmma::mma_sync(acc[f], af, bf, acc[f]);
      }
    }
  }

  __device__ void store(float* c_s, int tid) const {
    const int warp = tid / 32, wm = warp % 4, wn = warp / 4;
#pragma unroll
    for (int f = 0; f < 2; ++f)
      nvcuda::wmma::store_matrix_sync(c_s + (wm * 16) * kLDC + wn * 32 + f * 16, acc[f], kLDC,
                                      nvcuda::wmma::mem_row_major);
  }
};

template <typename T, bool kAMajorM, bool kBMajorN>
using TileMma = std::conditional_t<std::is_same<T, float>::value, FmaTile<T, kAMajorM, kBMajorN>,
                                   WmmaTile<T, kAMajorM, kBMajorN>>;

// ------------------------------------------------------------------------------------------------
// Kernels. Barriers: two per reduction step. The step's slot fill and staging writes happen after
// the previous step's MMA in every thread's program order and before a barrier that precedes any
// read, and the MMA reads follow the second barrier, so one barrier pair covers both hazards.
// ------------------------------------------------------------------------------------------------

// T: MMA operand type; WT: weight storage type (T, or __half widened to fp32 for the uint16 case).
template <typename T, typename WT>
__global__ void __launch_bounds__(kThreads) patch_embed3d_forward_kernel(const Params p) {
  using L = Layout<T, true, true>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* a_s = reinterpret_cast<T*>(smem + L::kA);  // [kBM tokens][kLDA]
  T* b_s = reinterpret_cast<T*>(smem + L::kB);  // [kBN embed][kLDB]
  float* c_s = reinterpret_cast<float*>(smem + L::kC);
  TokenSlot* tok = reinterpret_cast<TokenSlot*>(smem + L::kTok);
  ColumnSlot* col = reinterpret_cast<ColumnSlot*>(smem + L::kCol);

  const int tid = threadIdx.x;
  const int64_t column_tiles = (p.embed + kBN - 1) / kBN;  // vary fastest: see "Block order"
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) / column_tiles * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) % column_tiles * kBN;
  const WT* w = static_cast<const WT*>(p.weight);

  fill_tokens(tok, p.g, m0, kBM, p.g.rows, tid);
  TileMma<T, true, true> mma;
  mma.zero();
  for (int64_t k0 = 0; k0 < p.g.cols; k0 += kBK) {
    fill_columns(col, p.g, k0, kBK, tid);
    __syncthreads();
    gather_tile<T, kBM, kBK, L::kLDA>(a_s, tok, col, p, tid);
    load_matrix_tile<WT, T, kBN, kBK, L::kLDB>(b_s, w, n0, p.embed, k0, p.g.cols, p.g.cols, p.vec_weight, tid);
    __syncthreads();
    mma.step(a_s, b_s, tid);
  }
  mma.store(c_s, tid);
  __syncthreads();
  forward_epilogue(c_s, tok, m0, n0, p, tid);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed3d_grad_weight_kernel(const Params p) {
  using L = Layout<T, false, false>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* a_s = reinterpret_cast<T*>(smem + L::kA);  // [kBK tokens][kLDA]: grad_out rows, embed columns
  T* b_s = reinterpret_cast<T*>(smem + L::kB);  // [kBK tokens][kLDB]: V
  float* c_s = reinterpret_cast<float*>(smem + L::kC);
  TokenSlot* tok = reinterpret_cast<TokenSlot*>(smem + L::kTok);
  ColumnSlot* col = reinterpret_cast<ColumnSlot*>(smem + L::kCol);

  const int tid = threadIdx.x;
  const int64_t embed_tiles = (p.embed + kBM - 1) / kBM;  // vary fastest: see "Block order"
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) % embed_tiles * kBM;  // embed rows e
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) / embed_tiles * kBN;  // columns k
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * p.tokens_per_split;
  const int64_t t_end = min64(t_begin + p.tokens_per_split, p.g.rows);

  fill_columns(col, p.g, n0, kBN, tid);
  TileMma<T, false, false> mma;
  mma.zero();
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBK) {
    fill_tokens(tok, p.g, t0, kBK, t_end, tid);
    __syncthreads();
    load_grad_out_tile<T, kBK, kBM, L::kLDA>(a_s, p, t0, t_end, m0, tid);
    gather_tile<T, kBK, kBN, L::kLDB>(b_s, tok, col, p, tid);
    __syncthreads();
    mma.step(a_s, b_s, tid);
  }
  mma.store(c_s, tid);
  __syncthreads();
  grad_weight_epilogue(c_s, m0, n0, p.grad_weight + static_cast<int64_t>(blockIdx.z) * p.embed * p.g.cols, p, tid);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed3d_grad_volume_kernel(const Params p) {
  using L = Layout<T, true, false>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* a_s = reinterpret_cast<T*>(smem + L::kA);  // [kBM tokens][kLDA]: grad_out
  T* b_s = reinterpret_cast<T*>(smem + L::kB);  // [kBK embed][kLDB]: W
  float* c_s = reinterpret_cast<float*>(smem + L::kC);
  TokenSlot* tok = reinterpret_cast<TokenSlot*>(smem + L::kTok);
  ColumnSlot* col = reinterpret_cast<ColumnSlot*>(smem + L::kCol);

  const int tid = threadIdx.x;
  const int64_t column_tiles = (p.g.cols + kBN - 1) / kBN;  // vary fastest: see "Block order"
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) / column_tiles * kBM;  // tokens
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) % column_tiles * kBN;  // columns k
  const T* w = static_cast<const T*>(p.weight);

  // Read only by the epilogue, after the loop's barriers.
  fill_tokens(tok, p.g, m0, kBM, p.g.rows, tid);
  fill_columns(col, p.g, n0, kBN, tid);
  TileMma<T, true, false> mma;
  mma.zero();
  for (int64_t e0 = 0; e0 < p.embed; e0 += kBK) {
    load_grad_out_tile<T, kBM, kBK, L::kLDA>(a_s, p, m0, p.g.rows, e0, tid);
    load_matrix_tile<T, T, kBK, kBN, L::kLDB>(b_s, w, e0, p.embed, n0, p.g.cols, p.g.cols, p.vec_weight, tid);
    __syncthreads();
    mma.step(a_s, b_s, tid);
    __syncthreads();
  }
  mma.store(c_s, tid);
  __syncthreads();
  grad_volume_epilogue(c_s, tok, col, p, tid);
}

// grad_weight[i] = sum over splits s = 0, 1, ... of partial[s][i], in that order.
__global__ void __launch_bounds__(kThreads) patch_embed3d_reduce_splits_kernel(const float* __restrict__ partial,
                                                                              int64_t count, int64_t splits,
                                                                              float* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count; i += stride) {
    float s = partial[i];
    for (int64_t j = 1; j < splits; ++j) s += partial[j * count + i];
    out[i] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------

void check_cuda(cudaError_t status, const char* what) { medvl::check_cuda(status, "patch_embed3d_cuda", what); }

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const Params& p, const char* what) {
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), what);
}

void require_grid(int64_t x, int64_t y, int64_t z) {
  require(x <= INT_MAX && y <= 65535 && z <= 65535, "problem too large for one launch (grid dimensions)");
}

void run_forward(const Params& p, DType weight_type, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.g.rows, kBM) * ceil_div(p.embed, kBN);
  require_grid(blocks, 1, 1);
  const dim3 grid(static_cast<unsigned>(blocks));
  const char* what = "launching patch_embed3d_forward_kernel";
  switch (weight_type) {
    case DType::kFloat32:
      launch(patch_embed3d_forward_kernel<float, float>, grid, Layout<float, true, true>::kTotal, stream, p, what);
      return;
    case DType::kFloat16:
      if (p.volume_type == VolumeType::kUInt16 && !p.w.on)
        launch(patch_embed3d_forward_kernel<float, __half>, grid, Layout<float, true, true>::kTotal, stream, p, what);
      else
        launch(patch_embed3d_forward_kernel<__half, __half>, grid, Layout<__half, true, true>::kTotal, stream, p,
               what);
      return;
    case DType::kBFloat16:
      launch(patch_embed3d_forward_kernel<__nv_bfloat16, __nv_bfloat16>, grid,
             Layout<__nv_bfloat16, true, true>::kTotal, stream, p, what);
      return;
  }
}

void run_grad_weight(const PatchEmbed3dArgs& args, Params p, DType weight_type, cudaStream_t stream) {
  const Splits s = grad_weight_splits(p.g.rows, p.embed, p.g.cols);
  const int64_t tiles = ceil_div(p.embed, kBM) * ceil_div(p.g.cols, kBN);
  require_grid(tiles, 1, s.count);
  p.tokens_per_split = s.tokens_per_split;
  p.grad_weight = s.count > 1 ? static_cast<float*>(args.workspace) : args.grad_weight;
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(s.count));
  const char* what = "launching patch_embed3d_grad_weight_kernel";
  if (weight_type == DType::kFloat32 || (weight_type == DType::kFloat16 && p.volume_type == VolumeType::kUInt16 &&
                                         !p.w.on))
    launch(patch_embed3d_grad_weight_kernel<float>, grid, Layout<float, false, false>::kTotal, stream, p, what);
  else if (weight_type == DType::kFloat16)
    launch(patch_embed3d_grad_weight_kernel<__half>, grid, Layout<__half, false, false>::kTotal, stream, p, what);
  else
    launch(patch_embed3d_grad_weight_kernel<__nv_bfloat16>, grid, Layout<__nv_bfloat16, false, false>::kTotal, stream,
           p, what);
  if (s.count > 1) {
    const int64_t count = p.embed * p.g.cols;
    int64_t blocks = ceil_div(count, kThreads);
    if (blocks > 4096) blocks = 4096;
    patch_embed3d_reduce_splits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.grad_weight, count, s.count, args.grad_weight);
    check_cuda(cudaGetLastError(), "launching patch_embed3d_reduce_splits_kernel");
  }
}

void run_grad_volume(const Params& p, DType weight_type, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.g.rows, kBM) * ceil_div(p.g.cols, kBN);
  require_grid(blocks, 1, 1);
  const dim3 grid(static_cast<unsigned>(blocks));
  const char* what = "launching patch_embed3d_grad_volume_kernel";
  switch (weight_type) {
    case DType::kFloat32:
      launch(patch_embed3d_grad_volume_kernel<float>, grid, Layout<float, true, false>::kTotal, stream, p, what);
      return;
    case DType::kFloat16:
      launch(patch_embed3d_grad_volume_kernel<__half>, grid, Layout<__half, true, false>::kTotal, stream, p, what);
      return;
    case DType::kBFloat16:
      launch(patch_embed3d_grad_volume_kernel<__nv_bfloat16>, grid, Layout<__nv_bfloat16, true, false>::kTotal,
             stream, p, what);
      return;
  }
}

}  // namespace

size_t patch_embed3d_cuda_workspace_bytes(const PatchEmbed3dArgs& args, int pass) {
  if (pass != static_cast<int>(PatchEmbed3dPass::kGradWeight)) return 0;
  return grad_weight_workspace(make_geometry(args), args.embed_dim);
}

void patch_embed3d_cuda(const PatchEmbed3dArgs& args, int pass, void* stream) {
  const Params p = make_params(args, pass);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (static_cast<PatchEmbed3dPass>(pass)) {
    case PatchEmbed3dPass::kForward:
      require(valid_dtype(args.out_type), "unknown out dtype code");
      require(args.weight != nullptr && args.out != nullptr, "forward needs weight and out");
      run_forward(p, args.weight_type, s);
      return;
    case PatchEmbed3dPass::kGradWeight: {
      require(args.grad_weight != nullptr, "null grad_weight pointer");
      const size_t need = grad_weight_workspace(p.g, p.embed);
      require(args.workspace_bytes >= need, "workspace too small (see patch_embed3d_cuda_workspace_bytes)");
      require(need == 0 || (args.workspace != nullptr && reinterpret_cast<uintptr_t>(args.workspace) % 4 == 0),
              "null or misaligned workspace");
      run_grad_weight(args, p, args.weight_type, s);
      return;
    }
    case PatchEmbed3dPass::kGradVolume:
      require(args.volume_type == VolumeType::kFloat32 || args.volume_type == VolumeType::kFloat16 ||
                  args.volume_type == VolumeType::kBFloat16,
              "grad_volume needs a float volume");
      require(args.weight != nullptr && args.grad_volume != nullptr, "grad_volume needs weight and grad_volume");
      run_grad_volume(p, args.weight_type, s);
      return;
  }
}

}  // namespace medvl
