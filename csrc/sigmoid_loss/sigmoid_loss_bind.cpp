// medvl._C entry points of the sigmoid loss.
#include "bind.h"
#include "sigmoid_loss/sigmoid_loss.h"

namespace medvl {
namespace bind {
namespace {

SigmoidLossArgs sigmoid_loss_args(const py::kwargs& kwargs, const char* entry) {
  Keywords k(kwargs, entry);
  SigmoidLossArgs a;
  a.image = k.pointer<const void>("image");
  a.text = k.pointer<const void>("text");
  a.n_image = k.value<int64_t>("n_image");
  a.n_text = k.value<int64_t>("n_text");
  a.dim = k.value<int64_t>("dim");
  a.dtype = dtype_from_code(k.value<int>("dtype"));
  a.logit_scale = k.pointer<const float>("logit_scale");
  a.logit_bias = k.pointer<const float>("logit_bias");
  const int target = k.value<int>("target");
  if (target < 0 || target > 2) throw std::invalid_argument(std::string("medvl: ") + entry + ": unknown target code");
  a.target = static_cast<SigmoidTarget>(target);
  a.diagonal_is_pair = k.value<bool>("diagonal_is_pair");
  a.image_labels = k.pointer<const int64_t>("image_labels");
  a.text_labels = k.pointer<const int64_t>("text_labels");
  a.image_bits = k.pointer<const int32_t>("image_bits");
  a.text_bits = k.pointer<const int32_t>("text_bits");
  a.label_words = k.value<int64_t>("label_words");
  a.compute_grad = k.value<bool>("compute_grad");
  a.row_loss = k.pointer<float>("row_loss");
  a.row_gsum = k.pointer<float>("row_gsum");
  a.grad_image = k.pointer<float>("grad_image");
  a.grad_text = k.pointer<float>("grad_text");
  a.workspace = k.pointer<void>("workspace");
  a.workspace_bytes = k.value<size_t>("workspace_bytes");
  k.done();
  return a;
}

}  // namespace

void bind_sigmoid_loss(py::module_& m) {
  m.def("sigmoid_loss_cpu_workspace_bytes", &sigmoid_loss_cpu_workspace_bytes, py::arg("n_image"), py::arg("n_text"),
        py::arg("dim"), py::arg("compute_grad"), py::arg("threads"));
  m.def(
      "sigmoid_loss_cpu",
      [](int threads, const py::kwargs& kwargs) {
        const SigmoidLossArgs args = sigmoid_loss_args(kwargs, "sigmoid_loss_cpu");
        py::gil_scoped_release release;
        sigmoid_loss_cpu(args, threads);
      },
      py::arg("threads"));
#ifdef MEDVL_WITH_CUDA
  m.def("sigmoid_loss_cuda_workspace_bytes", &sigmoid_loss_cuda_workspace_bytes, py::arg("n_image"),
        py::arg("n_text"), py::arg("dim"), py::arg("compute_grad"));
  m.def(
      "sigmoid_loss_cuda",
      [](uintptr_t stream, const py::kwargs& kwargs) {
        const SigmoidLossArgs args = sigmoid_loss_args(kwargs, "sigmoid_loss_cuda");
        py::gil_scoped_release release;
        sigmoid_loss_cuda(args, reinterpret_cast<void*>(stream));
      },
      py::arg("stream"));
#endif
}

}  // namespace bind
}  // namespace medvl
