// Host emulation of the CUDA patch-embedding kernels for fp32 weights: the kernels' phases from
// patch_embed3d_tile.cuh (slots, gathers and vector gathers, the window, the fp32 FMA tile, the
// epilogues, make_params), run thread by thread between the barriers, in the kernels' block order and
// with their token splits. Not part of the build: tests/ops/test_patch_embed3d.py compiles it with a host
// compiler (and the CUDA headers) and checks it against the reference and the Triton window on a
// machine without a GPU. What it cannot test: the WMMA tile (fp16/bf16 weights), real barriers and
// the launches; the control flow below mirrors patch_embed3d_cuda.cu's kernels, and must stay so.
//
// Usage: patch_embed3d_emulation IN OUT
//   IN:  int64 pass, volume type, B, C, S0, S1, S2, p0, p1, p2, E, has_window, has_bias, has_pos,
//        force_scalar_gathers, 0; float64 lo, hi, out_lo, out_hi; the volume's bytes; float32 weight
//        [E, K]; bias [E] (has_bias); pos_embed [N, E] (has_pos); grad_out [B N, E] (passes 1, 2)
//   OUT: pass 0: float32 [B N, E]; pass 1: float32 [E, K]; pass 2: the volume gradient's bytes
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "patch_embed3d/patch_embed3d_tile.cuh"

namespace {

using namespace medvl;

template <typename U>
std::vector<U> read(FILE* f, int64_t n) {
  std::vector<U> v(static_cast<size_t>(n));
  if (n > 0 && std::fread(v.data(), sizeof(U), v.size(), f) != v.size()) {
    std::fprintf(stderr, "patch_embed3d_emulation: short input\n");
    std::exit(2);
  }
  return v;
}

// A block's shared memory, 128-byte aligned, scribbled on (the GPU does not clear it either).
struct Smem {
  std::vector<unsigned char> bytes;
  unsigned char* base;
  explicit Smem(size_t n) : bytes(n + 128) {
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(i * 77 + 5);
    base = bytes.data();
    while (reinterpret_cast<uintptr_t>(base) % 128) ++base;
  }
};

template <class F>
void each_thread(F&& f) {
  for (int tid = 0; tid < kThreads; ++tid) f(tid);
}

// patch_embed3d_forward_kernel<float, float>, block by block.
void forward(const Params& p) {
  using L = Layout<float, true, true>;
  const int64_t column_tiles = (p.embed + kBN - 1) / kBN;
  const int64_t blocks = ceil_div(p.g.rows, kBM) * column_tiles;
  const float* w = static_cast<const float*>(p.weight);
  for (int64_t block = 0; block < blocks; ++block) {
    Smem smem(L::kTotal);
    float* a_s = reinterpret_cast<float*>(smem.base + L::kA);
    float* b_s = reinterpret_cast<float*>(smem.base + L::kB);
    float* c_s = reinterpret_cast<float*>(smem.base + L::kC);
    TokenSlot* tok = reinterpret_cast<TokenSlot*>(smem.base + L::kTok);
    ColumnSlot* col = reinterpret_cast<ColumnSlot*>(smem.base + L::kCol);
    const int64_t m0 = block / column_tiles * kBM, n0 = block % column_tiles * kBN;
    std::vector<FmaTile<float, true, true>> mma(kThreads);
    each_thread([&](int tid) {
      fill_tokens(tok, p.g, m0, kBM, p.g.rows, tid);
      mma[tid].zero();
    });
    for (int64_t k0 = 0; k0 < p.g.cols; k0 += kBK) {
      each_thread([&](int tid) { fill_columns(col, p.g, k0, kBK, tid); });
      each_thread([&](int tid) {
        gather_tile<float, kBM, kBK, L::kLDA>(a_s, tok, col, p, tid);
        load_matrix_tile<float, float, kBN, kBK, L::kLDB>(b_s, w, n0, p.embed, k0, p.g.cols, p.g.cols, p.vec_weight,
                                                          tid);
      });
      each_thread([&](int tid) { mma[tid].step(a_s, b_s, tid); });
    }
    each_thread([&](int tid) { mma[tid].store(c_s, tid); });
    each_thread([&](int tid) { forward_epilogue(c_s, tok, m0, n0, p, tid); });
  }
}

// patch_embed3d_grad_weight_kernel<float> over every split, then the split reduction in split order.
void grad_weight(Params p, float* out) {
  using L = Layout<float, false, false>;
  const Splits s = grad_weight_splits(p.g.rows, p.embed, p.g.cols);
  p.tokens_per_split = s.tokens_per_split;
  const int64_t count = p.embed * p.g.cols;
  std::vector<float> partial(s.count > 1 ? static_cast<size_t>(s.count * count) : 0);
  p.grad_weight = s.count > 1 ? partial.data() : out;
  const int64_t embed_tiles = ceil_div(p.embed, kBM);
  const int64_t tiles = embed_tiles * ceil_div(p.g.cols, kBN);
  for (int64_t split = 0; split < s.count; ++split) {
    for (int64_t block = 0; block < tiles; ++block) {
      Smem smem(L::kTotal);
      float* a_s = reinterpret_cast<float*>(smem.base + L::kA);
      float* b_s = reinterpret_cast<float*>(smem.base + L::kB);
      float* c_s = reinterpret_cast<float*>(smem.base + L::kC);
      TokenSlot* tok = reinterpret_cast<TokenSlot*>(smem.base + L::kTok);
      ColumnSlot* col = reinterpret_cast<ColumnSlot*>(smem.base + L::kCol);
      const int64_t m0 = block % embed_tiles * kBM, n0 = block / embed_tiles * kBN;
      const int64_t t_begin = split * p.tokens_per_split;
      const int64_t t_end = min64(t_begin + p.tokens_per_split, p.g.rows);
      std::vector<FmaTile<float, false, false>> mma(kThreads);
      each_thread([&](int tid) {
        fill_columns(col, p.g, n0, kBN, tid);
        mma[tid].zero();
      });
      for (int64_t t0 = t_begin; t0 < t_end; t0 += kBK) {
        each_thread([&](int tid) { fill_tokens(tok, p.g, t0, kBK, t_end, tid); });
        each_thread([&](int tid) {
          load_grad_out_tile<float, kBK, kBM, L::kLDA>(a_s, p, t0, t_end, m0, tid);
          gather_tile<float, kBK, kBN, L::kLDB>(b_s, tok, col, p, tid);
        });
        each_thread([&](int tid) { mma[tid].step(a_s, b_s, tid); });
      }
      each_thread([&](int tid) { mma[tid].store(c_s, tid); });
      each_thread([&](int tid) { grad_weight_epilogue(c_s, m0, n0, p.grad_weight + split * count, p, tid); });
    }
  }
  if (s.count > 1) {
    for (int64_t i = 0; i < count; ++i) {
      float sum = partial[i];
      for (int64_t j = 1; j < s.count; ++j) sum += partial[j * count + i];
      out[i] = sum;
    }
  }
}

// patch_embed3d_grad_volume_kernel<float>, block by block.
void grad_volume(const Params& p) {
  using L = Layout<float, true, false>;
  const int64_t column_tiles = ceil_div(p.g.cols, kBN);
  const int64_t blocks = ceil_div(p.g.rows, kBM) * column_tiles;
  const float* w = static_cast<const float*>(p.weight);
  for (int64_t block = 0; block < blocks; ++block) {
    Smem smem(L::kTotal);
    float* a_s = reinterpret_cast<float*>(smem.base + L::kA);
    float* b_s = reinterpret_cast<float*>(smem.base + L::kB);
    float* c_s = reinterpret_cast<float*>(smem.base + L::kC);
    TokenSlot* tok = reinterpret_cast<TokenSlot*>(smem.base + L::kTok);
    ColumnSlot* col = reinterpret_cast<ColumnSlot*>(smem.base + L::kCol);
    const int64_t m0 = block / column_tiles * kBM, n0 = block % column_tiles * kBN;
    std::vector<FmaTile<float, true, false>> mma(kThreads);
    each_thread([&](int tid) {
      fill_tokens(tok, p.g, m0, kBM, p.g.rows, tid);
      fill_columns(col, p.g, n0, kBN, tid);
      mma[tid].zero();
    });
    for (int64_t e0 = 0; e0 < p.embed; e0 += kBK) {
      each_thread([&](int tid) {
        load_grad_out_tile<float, kBM, kBK, L::kLDA>(a_s, p, m0, p.g.rows, e0, tid);
        load_matrix_tile<float, float, kBK, kBN, L::kLDB>(b_s, w, e0, p.embed, n0, p.g.cols, p.g.cols, p.vec_weight,
                                                          tid);
      });
      each_thread([&](int tid) { mma[tid].step(a_s, b_s, tid); });
    }
    each_thread([&](int tid) { mma[tid].store(c_s, tid); });
    each_thread([&](int tid) { grad_volume_epilogue(c_s, tok, col, p, tid); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: patch_embed3d_emulation IN OUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  const std::vector<int64_t> h = read<int64_t>(in, 16);
  const std::vector<double> window = read<double>(in, 4);
  const int pass = static_cast<int>(h[0]);
  PatchEmbed3dArgs a;
  a.volume_type = volume_type_from_code(static_cast<int>(h[1]));
  a.batch = h[2];
  a.channels = h[3];
  int64_t voxels = a.batch * a.channels, tokens = 1, columns = a.channels;
  for (int i = 0; i < 3; ++i) {
    a.size[i] = h[4 + i];
    a.patch[i] = h[7 + i];
    a.grid[i] = ceil_div(a.size[i], a.patch[i]);
    voxels *= a.size[i];
    tokens *= a.grid[i];
    columns *= a.patch[i];
  }
  a.embed_dim = h[10];
  // As the binding takes them: Python doubles rounded to fp32, the spans computed in double first.
  a.has_window = h[11] != 0;
  a.window_lo = static_cast<float>(window[0]);
  a.window_hi = static_cast<float>(window[1]);
  a.out_lo = static_cast<float>(window[2]);
  a.out_hi = static_cast<float>(window[3]);
  a.window_span = static_cast<float>(window[1] - window[0]);
  a.out_span = static_cast<float>(window[3] - window[2]);
  const int bytes = voxel_bytes(a.volume_type);
  // 16-byte aligned copies, as torch allocates them (the vector gathers need it).
  std::vector<uint4> volume(static_cast<size_t>((voxels * bytes + 15) / 16));
  const std::vector<unsigned char> raw = read<unsigned char>(in, voxels * bytes);
  std::memcpy(volume.data(), raw.data(), raw.size());
  const std::vector<float> weight = read<float>(in, a.embed_dim * columns);
  const std::vector<float> bias = read<float>(in, h[12] ? a.embed_dim : 0);
  const std::vector<float> pos = read<float>(in, h[13] ? tokens * a.embed_dim : 0);
  const std::vector<float> grad_out = read<float>(in, pass != 0 ? a.batch * tokens * a.embed_dim : 0);
  std::fclose(in);

  a.volume = volume.data();
  a.weight = weight.data();
  a.weight_type = DType::kFloat32;
  a.bias = h[12] ? bias.data() : nullptr;
  a.pos_embed = h[13] ? pos.data() : nullptr;
  a.grad_out = grad_out.data();
  a.grad_out_type = DType::kFloat32;
  std::vector<float> out(pass == 0 ? static_cast<size_t>(a.batch * tokens * a.embed_dim)
                                   : pass == 1 ? static_cast<size_t>(a.embed_dim * columns) : 0);
  std::vector<uint4> grad_vol(pass == 2 ? volume.size() : 0);
  a.out = out.data();
  a.out_type = DType::kFloat32;
  a.grad_weight = out.data();
  a.grad_volume = grad_vol.data();
  Params p = make_params(a, pass);
  if (h[14]) p.vec_gather = false;
  if (pass == 0) forward(p);
  else if (pass == 1) grad_weight(p, out.data());
  else grad_volume(p);

  FILE* f = std::fopen(argv[2], "wb");
  if (!f) return 2;
  const void* data = pass == 2 ? static_cast<const void*>(grad_vol.data()) : static_cast<const void*>(out.data());
  const size_t n = pass == 2 ? static_cast<size_t>(voxels * bytes) : out.size() * sizeof(float);
  if (std::fwrite(data, 1, n, f) != n) return 2;
  std::fclose(f);
  std::printf("vec_gather=%d\n", p.vec_gather ? 1 : 0);
  return 0;
}
