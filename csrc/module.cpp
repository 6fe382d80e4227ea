// Python bindings of the compiled core. Pointers cross as integers (tensor.data_ptr()); the
// Python side (medvl/ops) validates shapes, dtypes, devices and contiguity before calling, and
// allocates outputs and workspaces with torch so the caching allocator is used.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <array>
#include <cstdint>
#include <string>

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
                                          const std::array<float, 3>& entity_weights, float score_low,
                                          float score_high, uintptr_t pair_offsets, uintptr_t pair_positive,
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
         std::array<float, 3> entity_weights, float score_low, float score_high, uintptr_t pair_offsets,
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

#ifdef MEDVL_WITH_CUDA
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
         std::array<float, 3> entity_weights, float score_low, float score_high, uintptr_t pair_offsets,
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
