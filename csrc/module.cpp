// Python bindings of the compiled core. Pointers cross as integers (tensor.data_ptr()); the
// Python side (medvl/ops) validates shapes, dtypes, devices and contiguity before calling, and
// allocates outputs and workspaces with torch so the caching allocator is used.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <array>
#include <cstdint>
#include <string>

#include "patch_embed3d/patch_embed3d.h"
#include "sigmoid_loss/sigmoid_loss.h"
#include "triplet_mining/triplet_mining.h"
#ifdef MEDVL_WITH_CUDA
#include "common/cuda_info.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

medvl::SigmoidLossArgs make_sigmoid_loss_args(uintptr_t image, uintptr_t text, int64_t n_image, int64_t n_text,
                                              int64_t dim, int dtype, uintptr_t logit_scale, uintptr_t logit_bias,
                                              int target, bool diagonal_is_pair, uintptr_t image_labels,
                                              uintptr_t text_labels, uintptr_t image_bits, uintptr_t text_bits,
                                              int64_t label_words, bool compute_grad, uintptr_t row_loss,
                                              uintptr_t row_gsum, uintptr_t grad_image, uintptr_t grad_text,
                                              uintptr_t workspace, size_t workspace_bytes) {
  if (target < 0 || target > 2) throw std::invalid_argument("medvl: unknown sigmoid-loss target code");
  medvl::SigmoidLossArgs a;
  a.image = as_ptr<const void>(image);
  a.text = as_ptr<const void>(text);
  a.n_image = n_image;
  a.n_text = n_text;
  a.dim = dim;
  a.dtype = medvl::dtype_from_code(dtype);
  a.logit_scale = as_ptr<const float>(logit_scale);
  a.logit_bias = as_ptr<const float>(logit_bias);
  a.target = static_cast<medvl::SigmoidTarget>(target);
  a.diagonal_is_pair = diagonal_is_pair;
  a.image_labels = as_ptr<const int64_t>(image_labels);
  a.text_labels = as_ptr<const int64_t>(text_labels);
  a.image_bits = as_ptr<const int32_t>(image_bits);
  a.text_bits = as_ptr<const int32_t>(text_bits);
  a.label_words = label_words;
  a.compute_grad = compute_grad;
  a.row_loss = as_ptr<float>(row_loss);
  a.row_gsum = as_ptr<float>(row_gsum);
  a.grad_image = as_ptr<float>(grad_image);
  a.grad_text = as_ptr<float>(grad_text);
  a.workspace = as_ptr<void>(workspace);
  a.workspace_bytes = workspace_bytes;
  return a;
}

#define MEDVL_SIGMOID_LOSS_PY_ARGS                                                                       \
  py::arg("image"), py::arg("text"), py::arg("n_image"), py::arg("n_text"), py::arg("dim"), py::arg("dtype"), \
      py::arg("logit_scale"), py::arg("logit_bias"), py::arg("target"), py::arg("diagonal_is_pair"),        \
      py::arg("image_labels"), py::arg("text_labels"), py::arg("image_bits"), py::arg("text_bits"),         \
      py::arg("label_words"), py::arg("compute_grad"), py::arg("row_loss"), py::arg("row_gsum"),            \
      py::arg("grad_image"), py::arg("grad_text"), py::arg("workspace"), py::arg("workspace_bytes")

medvl::TripletMiningArgs make_mining_args(uintptr_t anchors, uintptr_t candidates, int64_t n_anchor,
                                          int64_t n_candidate, int64_t dim, int dtype, int strategy, int distance,
                                          bool within, uintptr_t labels, uintptr_t candidate_labels,
                                          uintptr_t anchor_bits, uintptr_t candidate_bits,
                                          const std::array<int64_t, 3>& entity_words,
                                          const std::array<double, 3>& entity_weights, double score_low,
                                          double score_high, uintptr_t pair_offsets, uintptr_t pair_positive,
                                          uintptr_t positive, uintptr_t negative, uintptr_t workspace,
                                          size_t workspace_bytes) {
  if (strategy < 0 || strategy > 2) throw std::invalid_argument("medvl: unknown mining strategy code");
  if (distance < 0 || distance > 2) throw std::invalid_argument("medvl: unknown mining distance code");
  medvl::TripletMiningArgs a;
  a.anchors = as_ptr<const void>(anchors);
  a.candidates = as_ptr<const void>(candidates);
  a.n_anchor = n_anchor;
  a.n_candidate = n_candidate;
  a.dim = dim;
  a.dtype = medvl::dtype_from_code(dtype);
  a.strategy = static_cast<medvl::MiningStrategy>(strategy);
  a.distance = static_cast<medvl::MiningDistance>(distance);
  a.within = within;
  a.labels = as_ptr<const int64_t>(labels);
  a.candidate_labels = as_ptr<const int64_t>(candidate_labels);
  a.anchor_bits = as_ptr<const int32_t>(anchor_bits);
  a.candidate_bits = as_ptr<const int32_t>(candidate_bits);
  for (int k = 0; k < 3; ++k) {
    a.entity_words[k] = entity_words[k];
    a.entity_weights[k] = entity_weights[k];
  }
  a.score_low = score_low;
  a.score_high = score_high;
  a.pair_offsets = as_ptr<const int64_t>(pair_offsets);
  a.pair_positive = as_ptr<const int64_t>(pair_positive);
  a.positive = as_ptr<int64_t>(positive);
  a.negative = as_ptr<int64_t>(negative);
  a.workspace = as_ptr<void>(workspace);
  a.workspace_bytes = workspace_bytes;
  return a;
}

#define MEDVL_MINING_PY_ARGS                                                                                   \
  py::arg("anchors"), py::arg("candidates"), py::arg("n_anchor"), py::arg("n_candidate"), py::arg("dim"),        \
      py::arg("dtype"), py::arg("strategy"), py::arg("distance"), py::arg("within"), py::arg("labels"),          \
      py::arg("candidate_labels"), py::arg("anchor_bits"), py::arg("candidate_bits"), py::arg("entity_words"),   \
      py::arg("entity_weights"), py::arg("score_low"), py::arg("score_high"), py::arg("pair_offsets"),           \
      py::arg("pair_positive"), py::arg("positive"), py::arg("negative"), py::arg("workspace"),                  \
      py::arg("workspace_bytes")

medvl::PatchEmbed3dArgs make_patch_embed3d_args(uintptr_t volume, int volume_type, const std::array<int64_t, 5>& shape,
                                                const std::array<int64_t, 3>& patch,
                                                const std::array<int64_t, 3>& grid, int64_t embed_dim,
                                                uintptr_t weight, int weight_type, uintptr_t bias, uintptr_t pos_embed,
                                                bool has_window, const std::array<float, 6>& window, uintptr_t out,
                                                int out_type, uintptr_t grad_out, int grad_out_type,
                                                uintptr_t grad_weight, uintptr_t grad_volume, uintptr_t workspace,
                                                size_t workspace_bytes) {
  medvl::PatchEmbed3dArgs a;
  a.volume = as_ptr<const void>(volume);
  a.volume_type = medvl::volume_type_from_code(volume_type);
  a.batch = shape[0];
  a.channels = shape[1];
  for (int i = 0; i < 3; ++i) {
    a.size[i] = shape[2 + i];
    a.patch[i] = patch[i];
    a.grid[i] = grid[i];
  }
  a.embed_dim = embed_dim;
  a.weight = as_ptr<const void>(weight);
  a.weight_type = medvl::dtype_from_code(weight_type);
  a.bias = as_ptr<const float>(bias);
  a.pos_embed = as_ptr<const float>(pos_embed);
  a.has_window = has_window;
  a.window_lo = window[0];
  a.window_hi = window[1];
  a.out_lo = window[2];
  a.out_hi = window[3];
  a.window_span = window[4];
  a.out_span = window[5];
  a.out = as_ptr<void>(out);
  a.out_type = medvl::dtype_from_code(out_type);
  a.grad_out = as_ptr<const void>(grad_out);
  a.grad_out_type = medvl::dtype_from_code(grad_out_type);
  a.grad_weight = as_ptr<float>(grad_weight);
  a.grad_volume = as_ptr<void>(grad_volume);
  a.workspace = as_ptr<void>(workspace);
  a.workspace_bytes = workspace_bytes;
  return a;
}

#define MEDVL_PATCH_EMBED3D_PY_ARGS                                                                           \
  py::arg("volume"), py::arg("volume_type"), py::arg("shape"), py::arg("patch"), py::arg("grid"),               \
      py::arg("embed_dim"), py::arg("weight"), py::arg("weight_type"), py::arg("bias"), py::arg("pos_embed"),   \
      py::arg("has_window"), py::arg("window"), py::arg("out"), py::arg("out_type"), py::arg("grad_out"),       \
      py::arg("grad_out_type"), py::arg("grad_weight"), py::arg("grad_volume"), py::arg("workspace"),           \
      py::arg("workspace_bytes"), py::arg("pass_")

#define MEDVL_PATCH_EMBED3D_LAMBDA_ARGS                                                                       \
  uintptr_t volume, int volume_type, std::array<int64_t, 5> shape, std::array<int64_t, 3> patch,                \
      std::array<int64_t, 3> grid, int64_t embed_dim, uintptr_t weight, int weight_type, uintptr_t bias,        \
      uintptr_t pos_embed, bool has_window, std::array<float, 6> window, uintptr_t out, int out_type,           \
      uintptr_t grad_out, int grad_out_type, uintptr_t grad_weight, uintptr_t grad_volume, uintptr_t workspace, \
      size_t workspace_bytes, int pass

#define MEDVL_PATCH_EMBED3D_MAKE_ARGS                                                                        \
  make_patch_embed3d_args(volume, volume_type, shape, patch, grid, embed_dim, weight, weight_type, bias,       \
                          pos_embed, has_window, window, out, out_type, grad_out, grad_out_type, grad_weight,  \
                          grad_volume, workspace, workspace_bytes)

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "medvl compiled core (C++/OpenMP, optional CUDA); no libtorch dependency";
  m.attr("cuda_compiled") = py::bool_(
#ifdef MEDVL_WITH_CUDA
      true
#else
      false
#endif
  );
  m.attr("cuda_archs") = py::str(MEDVL_CUDA_ARCHS);
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });

#ifdef MEDVL_WITH_CUDA
  m.def("cuda_device_count", []() {
    std::string why;
    const int count = medvl::cuda_device_count(&why);
    return py::make_tuple(count, why);
  });
  m.def("cuda_device_capability", [](int device) {
    std::string why;
    std::string capability = medvl::cuda_device_capability(device, &why);
    return py::make_tuple(capability, why);
  });
#endif

  m.def("sigmoid_loss_cpu_workspace_bytes", &medvl::sigmoid_loss_cpu_workspace_bytes, py::arg("n_image"),
        py::arg("n_text"), py::arg("dim"), py::arg("compute_grad"), py::arg("threads"));
  m.def(
      "sigmoid_loss_cpu",
      [](uintptr_t image, uintptr_t text, int64_t n_image, int64_t n_text, int64_t dim, int dtype,
         uintptr_t logit_scale, uintptr_t logit_bias, int target, bool diagonal_is_pair, uintptr_t image_labels,
         uintptr_t text_labels, uintptr_t image_bits, uintptr_t text_bits, int64_t label_words, bool compute_grad,
         uintptr_t row_loss, uintptr_t row_gsum, uintptr_t grad_image, uintptr_t grad_text, uintptr_t workspace,
         size_t workspace_bytes, int threads) {
        const auto args = make_sigmoid_loss_args(image, text, n_image, n_text, dim, dtype, logit_scale, logit_bias,
                                                 target, diagonal_is_pair, image_labels, text_labels, image_bits,
                                                 text_bits, label_words, compute_grad, row_loss, row_gsum,
                                                 grad_image, grad_text, workspace, workspace_bytes);
        py::gil_scoped_release release;
        medvl::sigmoid_loss_cpu(args, threads);
      },
      MEDVL_SIGMOID_LOSS_PY_ARGS, py::arg("threads"));

  m.def("triplet_mining_cpu_workspace_bytes", &medvl::triplet_mining_cpu_workspace_bytes, py::arg("n_anchor"),
        py::arg("n_candidate"), py::arg("dim"), py::arg("strategy"), py::arg("max_pairs_per_anchor"),
        py::arg("threads"));
  m.def(
      "triplet_mining_cpu",
      [](uintptr_t anchors, uintptr_t candidates, int64_t n_anchor, int64_t n_candidate, int64_t dim, int dtype,
         int strategy, int distance, bool within, uintptr_t labels, uintptr_t candidate_labels,
         uintptr_t anchor_bits, uintptr_t candidate_bits, std::array<int64_t, 3> entity_words,
         std::array<double, 3> entity_weights, double score_low, double score_high, uintptr_t pair_offsets,
         uintptr_t pair_positive, uintptr_t positive, uintptr_t negative, uintptr_t workspace,
         size_t workspace_bytes, int threads) {
        const auto args = make_mining_args(anchors, candidates, n_anchor, n_candidate, dim, dtype, strategy, distance,
                                           within, labels, candidate_labels, anchor_bits, candidate_bits,
                                           entity_words, entity_weights, score_low, score_high, pair_offsets,
                                           pair_positive, positive, negative, workspace, workspace_bytes);
        py::gil_scoped_release release;
        medvl::triplet_mining_cpu(args, threads);
      },
      MEDVL_MINING_PY_ARGS, py::arg("threads"));

  // Workspace sizes: call with the pointers 0 and workspace_bytes 0.
  m.def(
      "patch_embed3d_cpu_workspace_bytes",
      [](MEDVL_PATCH_EMBED3D_LAMBDA_ARGS, int threads) {
        return medvl::patch_embed3d_cpu_workspace_bytes(MEDVL_PATCH_EMBED3D_MAKE_ARGS, pass, threads);
      },
      MEDVL_PATCH_EMBED3D_PY_ARGS, py::arg("threads"));
  m.def(
      "patch_embed3d_cpu",
      [](MEDVL_PATCH_EMBED3D_LAMBDA_ARGS, int threads) {
        const auto args = MEDVL_PATCH_EMBED3D_MAKE_ARGS;
        py::gil_scoped_release release;
        medvl::patch_embed3d_cpu(args, pass, threads);
      },
      MEDVL_PATCH_EMBED3D_PY_ARGS, py::arg("threads"));

#ifdef MEDVL_WITH_CUDA
  m.def(
      "patch_embed3d_cuda_workspace_bytes",
      [](MEDVL_PATCH_EMBED3D_LAMBDA_ARGS) {
        return medvl::patch_embed3d_cuda_workspace_bytes(MEDVL_PATCH_EMBED3D_MAKE_ARGS, pass);
      },
      MEDVL_PATCH_EMBED3D_PY_ARGS);
  m.def(
      "patch_embed3d_cuda",
      [](MEDVL_PATCH_EMBED3D_LAMBDA_ARGS, uintptr_t stream) {
        const auto args = MEDVL_PATCH_EMBED3D_MAKE_ARGS;
        py::gil_scoped_release release;
        medvl::patch_embed3d_cuda(args, pass, reinterpret_cast<void*>(stream));
      },
      MEDVL_PATCH_EMBED3D_PY_ARGS, py::arg("stream"));
  m.def("sigmoid_loss_cuda_workspace_bytes", &medvl::sigmoid_loss_cuda_workspace_bytes, py::arg("n_image"),
        py::arg("n_text"), py::arg("dim"), py::arg("compute_grad"));
  m.def(
      "sigmoid_loss_cuda",
      [](uintptr_t image, uintptr_t text, int64_t n_image, int64_t n_text, int64_t dim, int dtype,
         uintptr_t logit_scale, uintptr_t logit_bias, int target, bool diagonal_is_pair, uintptr_t image_labels,
         uintptr_t text_labels, uintptr_t image_bits, uintptr_t text_bits, int64_t label_words, bool compute_grad,
         uintptr_t row_loss, uintptr_t row_gsum, uintptr_t grad_image, uintptr_t grad_text, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        const auto args = make_sigmoid_loss_args(image, text, n_image, n_text, dim, dtype, logit_scale, logit_bias,
                                                 target, diagonal_is_pair, image_labels, text_labels, image_bits,
                                                 text_bits, label_words, compute_grad, row_loss, row_gsum,
                                                 grad_image, grad_text, workspace, workspace_bytes);
        py::gil_scoped_release release;
        medvl::sigmoid_loss_cuda(args, reinterpret_cast<void*>(stream));
      },
      MEDVL_SIGMOID_LOSS_PY_ARGS, py::arg("stream"));
  m.def("triplet_mining_cuda_workspace_bytes", &medvl::triplet_mining_cuda_workspace_bytes, py::arg("n_anchor"),
        py::arg("n_candidate"), py::arg("dim"), py::arg("strategy"), py::arg("max_pairs_per_anchor"));
  m.def(
      "triplet_mining_cuda",
      [](uintptr_t anchors, uintptr_t candidates, int64_t n_anchor, int64_t n_candidate, int64_t dim, int dtype,
         int strategy, int distance, bool within, uintptr_t labels, uintptr_t candidate_labels,
         uintptr_t anchor_bits, uintptr_t candidate_bits, std::array<int64_t, 3> entity_words,
         std::array<double, 3> entity_weights, double score_low, double score_high, uintptr_t pair_offsets,
         uintptr_t pair_positive, uintptr_t positive, uintptr_t negative, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        const auto args = make_mining_args(anchors, candidates, n_anchor, n_candidate, dim, dtype, strategy, distance,
                                           within, labels, candidate_labels, anchor_bits, candidate_bits,
                                           entity_words, entity_weights, score_low, score_high, pair_offsets,
                                           pair_positive, positive, negative, workspace, workspace_bytes);
        py::gil_scoped_release release;
        medvl::triplet_mining_cuda(args, reinterpret_cast<void*>(stream));
      },
      MEDVL_MINING_PY_ARGS, py::arg("stream"));
#endif
}
