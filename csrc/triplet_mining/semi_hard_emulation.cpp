// Host emulation of the CUDA semi-hard kernel's thread block: mining::semi_hard_tile of mining_tile.h,
// the very code the kernel runs, with each phase run thread by thread between the barriers and the
// score tile computed by plain fp32 FMA chains (k ascending, as the kernel's fp32 FMA tile
// accumulates). Not part of the build: tests/ops/test_triplet_mining.py compiles it with g++ and
// checks it against the reference on inputs whose dot products are exact, where the GPU must give the
// same triplets, so the tile algorithm (pair slots, sorting, buckets, suffix minima, chunks of kCap
// pairs, ties) is tested without a GPU. What it cannot test: the WMMA tile, shared-memory atomics and
// the barriers themselves.
//
// Usage: semi_hard_emulation IN OUT
//   IN:  int64 n_a, n_c, dim, distance, P; float32 anchors [n_a, dim], candidates [n_c, dim];
//        int64 labels [n_a], candidate labels [n_c], pair_offsets [n_a + 1], pair_positive [P]
//   OUT: int64 negative [P]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "triplet_mining/mining_tile.h"

namespace {

using medvl::mining::kCols;
using medvl::mining::kLDS;
using medvl::mining::kRows;
using medvl::mining::kThreads;

struct HostBlock {
  void sync() {}
  template <class F>
  void each(F&& f) {
    for (int tid = 0; tid < kThreads; ++tid) f(tid);
  }
};

struct HostTiles {
  float* tile;
  const float* a;
  const float* c;
  int64_t a0, n_a, n_c, dim;
  void compute(int64_t b0) {
    for (int r = 0; r < kRows; ++r) {
      for (int col = 0; col < kCols; ++col) {
        float dot = 0.f;
        if (a0 + r < n_a && b0 + col < n_c)
          for (int64_t k = 0; k < dim; ++k) dot = std::fma(a[(a0 + r) * dim + k], c[(b0 + col) * dim + k], dot);
        tile[r * kLDS + col] = dot;
      }
    }
  }
};

template <typename T>
std::vector<T> read(FILE* f, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  if (n > 0 && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) {
    std::fprintf(stderr, "semi_hard_emulation: short input\n");
    std::exit(2);
  }
  return v;
}

// What the kernel's row_norms stores: |x|^2, or max(|x|, 1e-12) for cosine (sqrt correctly rounded).
std::vector<float> norms(const std::vector<float>& x, int64_t n, int64_t dim, bool cosine) {
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < dim; ++k) s = std::fma(x[i * dim + k], x[i * dim + k], s);
    out[i] = cosine ? std::fmax(std::sqrt(s), 1e-12f) : s;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: semi_hard_emulation IN OUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  const std::vector<int64_t> sizes = read<int64_t>(in, 5);
  const int64_t n_a = sizes[0], n_c = sizes[1], dim = sizes[2], pairs = sizes[4];
  const int distance = static_cast<int>(sizes[3]);
  const std::vector<float> anchors = read<float>(in, n_a * dim), candidates = read<float>(in, n_c * dim);
  const std::vector<int64_t> labels = read<int64_t>(in, n_a), c_labels = read<int64_t>(in, n_c);
  const std::vector<int64_t> offsets = read<int64_t>(in, n_a + 1), positive = read<int64_t>(in, pairs);
  std::fclose(in);

  const bool cosine = distance == 2;
  const std::vector<float> a_norm = norms(anchors, n_a, dim, cosine), c_norm = norms(candidates, n_c, dim, cosine);
  std::vector<int64_t> negative(static_cast<size_t>(pairs), -2);  // -2: never written (a bug)
  const medvl::mining::SemiHardProblem problem{n_a, n_c, distance, a_norm.data(), c_norm.data(), labels.data(),
                                               c_labels.data(), offsets.data(), positive.data(), negative.data()};
  std::vector<unsigned char> shared_bytes(medvl::mining::SemiHardSharedBytes::kTotal + 128);
  unsigned char* base = shared_bytes.data();
  while (reinterpret_cast<uintptr_t>(base) % 128) ++base;
  const medvl::mining::SemiHardShared shared = medvl::mining::semi_hard_shared(base);
  std::vector<float> tile(static_cast<size_t>(kRows * kLDS));
  HostBlock block;
  for (int64_t a0 = 0; a0 < n_a; a0 += kRows) {
    // Shared memory is not cleared between blocks on the GPU either: scribble on it.
    for (size_t b = 0; b < shared_bytes.size(); ++b) shared_bytes[b] = static_cast<unsigned char>(b * 131 + a0);
    HostTiles tiles{tile.data(), anchors.data(), candidates.data(), a0, n_a, n_c, dim};
    medvl::mining::semi_hard_tile(block, tiles, tile.data(), problem, shared, a0);
  }
  FILE* out = std::fopen(argv[2], "wb");
  if (!out || std::fwrite(negative.data(), sizeof(int64_t), negative.size(), out) != negative.size()) return 2;
  std::fclose(out);
  return 0;
}
