// The compiled core's module: build facts and device queries here, each op's entry points in its own
// binding file (csrc/<op>/<op>_bind.cpp). Pointers cross as integers (tensor.data_ptr()); the
// Python side (medvl/ops) validates shapes, dtypes, devices and contiguity before calling, passes the
// arguments by keyword, and allocates outputs and workspaces with torch (the caching allocator).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <array>
#include <cstdint>
#include <string>

#include "bind.h"
#ifdef MEDVL_WITH_CUDA
#include "common/cuda_info.h"
#endif

namespace py = pybind11;

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

  medvl::bind::bind_sigmoid_loss(m);
  medvl::bind::bind_triplet_mining(m);
  medvl::bind::bind_patch_embed3d(m);
}
