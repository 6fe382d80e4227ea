// medvl._C entry points of the 3D patch embedding. The workspace sizes take the same arguments as the
// kernels (pointers 0): the sizes depend on the whole problem.
#include "bind.h"
#include "patch_embed3d/patch_embed3d.h"

namespace medvl {
namespace bind {
namespace {

PatchEmbed3dArgs patch_embed3d_args(const py::kwargs& kwargs, const char* entry) {
  Keywords k(kwargs, entry);
  PatchEmbed3dArgs a;
  a.volume = k.pointer<const void>("volume");
  a.volume_type = volume_type_from_code(k.value<int>("volume_type"));
  const auto shape = k.value<std::array<int64_t, 5>>("shape");
  const auto patch = k.value<std::array<int64_t, 3>>("patch");
  const auto grid = k.value<std::array<int64_t, 3>>("grid");
  a.batch = shape[0];
  a.channels = shape[1];
  for (int i = 0; i < 3; ++i) {
    a.size[i] = shape[2 + i];
    a.patch[i] = patch[i];
    a.grid[i] = grid[i];
  }
  a.embed_dim = k.value<int64_t>("embed_dim");
  a.weight = k.pointer<const void>("weight");
  a.weight_type = dtype_from_code(k.value<int>("weight_type"));
  a.bias = k.pointer<const float>("bias");
  a.pos_embed = k.pointer<const float>("pos_embed");
  a.has_window = k.value<bool>("has_window");
  const auto window = k.value<std::array<float, 6>>("window");  // lo, hi, out_lo, out_hi, hi - lo, out_hi - out_lo
  a.window_lo = window[0];
  a.window_hi = window[1];
  a.out_lo = window[2];
  a.out_hi = window[3];
  a.window_span = window[4];
  a.out_span = window[5];
  a.out = k.pointer<void>("out");
  a.out_type = dtype_from_code(k.value<int>("out_type"));
  a.grad_out = k.pointer<const void>("grad_out");
  a.grad_out_type = dtype_from_code(k.value<int>("grad_out_type"));
  a.grad_weight = k.pointer<float>("grad_weight");
  a.grad_volume = k.pointer<void>("grad_volume");
  a.workspace = k.pointer<void>("workspace");
  a.workspace_bytes = k.value<size_t>("workspace_bytes");
  k.done();
  return a;
}

}  // namespace

void bind_patch_embed3d(py::module_& m) {
  m.def(
      "patch_embed3d_cpu_workspace_bytes",
      [](int pass, int threads, const py::kwargs& kwargs) {
        return patch_embed3d_cpu_workspace_bytes(patch_embed3d_args(kwargs, "patch_embed3d_cpu_workspace_bytes"), pass,
                                                 threads);
      },
      py::arg("pass_"), py::arg("threads"));
  m.def(
      "patch_embed3d_cpu",
      [](int pass, int threads, const py::kwargs& kwargs) {
        const PatchEmbed3dArgs args = patch_embed3d_args(kwargs, "patch_embed3d_cpu");
        py::gil_scoped_release release;
        patch_embed3d_cpu(args, pass, threads);
      },
      py::arg("pass_"), py::arg("threads"));
#ifdef MEDVL_WITH_CUDA
  m.def(
      "patch_embed3d_cuda_workspace_bytes",
      [](int pass, const py::kwargs& kwargs) {
        return patch_embed3d_cuda_workspace_bytes(patch_embed3d_args(kwargs, "patch_embed3d_cuda_workspace_bytes"),
                                                  pass);
      },
      py::arg("pass_"));
  m.def(
      "patch_embed3d_cuda",
      [](int pass, uintptr_t stream, const py::kwargs& kwargs) {
        const PatchEmbed3dArgs args = patch_embed3d_args(kwargs, "patch_embed3d_cuda");
        py::gil_scoped_release release;
        patch_embed3d_cuda(args, pass, reinterpret_cast<void*>(stream));
      },
      py::arg("pass_"), py::arg("stream"));
#endif
}

}  // namespace bind
}  // namespace medvl
