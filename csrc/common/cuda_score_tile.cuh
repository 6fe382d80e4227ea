// The 64 x 64 score tile shared by the CUDA kernels that compare two row sets (sigmoid_loss,
// triplet_mining): staging of operand tiles and S = A_tile B_tile^T over the full feature dimension.
// No include guard on purpose: a .cu includes this file inside its own (anonymous) namespace after
// defining kThreads (256), kBM, kBN (64), kBK (32), kLDS (the fp32 S tile's row stride) and
// Config<T> with kTensor, kLDK and kVec, so the tile constants stay with each kernel's layout comment.
// Thread mappings: WMMA warp w -> rows 16 (w % 4) .. +16, columns 32 (w / 4) .. +32 (two fragments);
// FMA thread (tx, ty) = (t % 16, t / 16) -> rows ty + 16 i, columns tx + 16 j (i, j < 4).

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Stages rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of the row-major [nrows, dim]
// matrix g into s (row stride LD elements), writing zeros outside the matrix. Every element of
// the ROWS x COLS tile is written. `vec` requires a 16-byte aligned g and dim % kVec == 0, so a
// 16-byte chunk starting at a column < dim lies wholly inside the row (col0 and the chunk offsets
// are multiples of kVec).
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, int64_t row0, int64_t nrows,
                                          int64_t col0, int64_t dim, bool vec) {
  constexpr int kVec = Config<T>::kVec;
  static_assert(COLS % kVec == 0, "tile width must be a multiple of the vector width");
  if (vec) {
    constexpr int kChunksPerRow = COLS / kVec;
    constexpr int kChunks = ROWS * kChunksPerRow;
    for (int idx = threadIdx.x; idx < kChunks; idx += kThreads) {
      const int r = idx / kChunksPerRow;
      const int c = (idx % kChunksPerRow) * kVec;
      const int64_t gr = row0 + r, gc = col0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (gr < nrows && gc < dim) v = __ldg(reinterpret_cast<const uint4*>(g + gr * dim + gc));
      T* dst = s + r * LD + c;
      if constexpr ((LD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
        T parts[kVec];
        memcpy(parts, &v, sizeof(v));
#pragma unroll
        for (int e = 0; e < kVec; ++e) dst[e] = parts[e];
      }
    }
  } else {
    const T zero = from_float<T>(0.f);
    for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
      const int r = idx / COLS;
      const int c = idx % COLS;
      const int64_t gr = row0 + r, gc = col0 + c;
      s[r * LD + c] = (gr < nrows && gc < dim) ? g[gr * dim + gc] : zero;
    }
  }
}

// s_s (kBM x kBN fp32, row stride kLDS) = A rows [a0, a0 + kBM) . B rows [b0, b0 + kBN) over the full
// feature dimension, fp32 accumulation (WMMA for 16-bit T, an FMA tile for fp32). a_s and b_s are the
// staging tiles (row stride Config<T>::kLDK). Ends with s_s written, not with a barrier after it.
template <typename T>
__device__ __forceinline__ void score_tile(float* __restrict__ s_s, T* __restrict__ a_s, T* __restrict__ b_s,
                                           const T* __restrict__ a, int64_t a0, int64_t n_a, const T* __restrict__ b,
                                           int64_t b0, int64_t n_b, int64_t dim, bool vec, int wm, int wn, int tx,
                                           int ty) {
  using C = Config<T>;
  constexpr int kLDK = C::kLDK;
  if constexpr (C::kTensor) {
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc[2];
    wmma::fill_fragment(sacc[0], 0.f);
    wmma::fill_fragment(sacc[1], 0.f);
    for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
      load_tile<T, kBM, kBK, kLDK>(a_s, a, a0, n_a, k0, dim, vec);
      load_tile<T, kBN, kBK, kLDK>(b_s, b, b0, n_b, k0, dim, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::load_matrix_sync(af, a_s + (wm * 16) * kLDK + kk, kLDK);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // B_tile^T (k x n) is b_s read column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
          wmma::load_matrix_sync(bf, b_s + (wn * 32 + f * 16) * kLDK + kk, kLDK);
          wmma::mma_sync(sacc[f], af, bf, sacc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(s_s + (wm * 16) * kLDS + wn * 32 + f * 16, sacc[f], kLDS, wmma::mem_row_major);
  } else {
    float sacc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sacc[i][j] = 0.f;
    for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
      load_tile<T, kBM, kBK, kLDK>(a_s, a, a0, n_a, k0, dim, vec);
      load_tile<T, kBN, kBK, kLDK>(b_s, b, b0, n_b, k0, dim, vec);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kBK; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = static_cast<float>(a_s[(ty + 16 * i) * kLDK + k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = static_cast<float>(b_s[(tx + 16 * j) * kLDK + k]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sacc[i][j] = fmaf(av[i], bv[j], sacc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s_s[(ty + 16 * i) * kLDS + tx + 16 * j] = sacc[i][j];
  }
}
