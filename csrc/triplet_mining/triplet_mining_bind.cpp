// medvl._C entry points of triplet mining.
#include "bind.h"
#include "triplet_mining/triplet_mining.h"

namespace medvl {
namespace bind {
namespace {

TripletMiningArgs triplet_mining_args(const py::kwargs& kwargs, const char* entry) {
  Keywords k(kwargs, entry);
  TripletMiningArgs a;
  const int strategy = k.value<int>("strategy");
  const int distance = k.value<int>("distance");
  if (strategy < 0 || strategy > 2 || distance < 0 || distance > 2)
    throw std::invalid_argument(std::string("medvl: ") + entry + ": unknown mining strategy or distance code");
  a.anchors = k.pointer<const void>("anchors");
  a.candidates = k.pointer<const void>("candidates");
  a.n_anchor = k.value<int64_t>("n_anchor");
  a.n_candidate = k.value<int64_t>("n_candidate");
  a.dim = k.value<int64_t>("dim");
  a.dtype = dtype_from_code(k.value<int>("dtype"));
  a.strategy = static_cast<MiningStrategy>(strategy);
  a.distance = static_cast<MiningDistance>(distance);
  a.within = k.value<bool>("within");
  a.labels = k.pointer<const int64_t>("labels");
  a.candidate_labels = k.pointer<const int64_t>("candidate_labels");
  a.anchor_bits = k.pointer<const int32_t>("anchor_bits");
  a.candidate_bits = k.pointer<const int32_t>("candidate_bits");
  const auto words = k.value<std::array<int64_t, 3>>("entity_words");
  const auto weights = k.value<std::array<double, 3>>("entity_weights");
  for (int i = 0; i < 3; ++i) {
    a.entity_words[i] = words[i];
    a.entity_weights[i] = weights[i];
  }
  a.score_low = k.value<double>("score_low");
  a.score_high = k.value<double>("score_high");
  a.pair_offsets = k.pointer<const int64_t>("pair_offsets");
  a.pair_positive = k.pointer<const int64_t>("pair_positive");
  a.positive = k.pointer<int64_t>("positive");
  a.negative = k.pointer<int64_t>("negative");
  a.workspace = k.pointer<void>("workspace");
  a.workspace_bytes = k.value<size_t>("workspace_bytes");
  k.done();
  return a;
}

}  // namespace

void bind_triplet_mining(py::module_& m) {
  m.def("triplet_mining_cpu_workspace_bytes", &triplet_mining_cpu_workspace_bytes, py::arg("n_anchor"),
        py::arg("n_candidate"), py::arg("dim"), py::arg("strategy"), py::arg("max_pairs_per_anchor"),
        py::arg("threads"));
  m.def(
      "triplet_mining_cpu",
      [](int threads, const py::kwargs& kwargs) {
        const TripletMiningArgs args = triplet_mining_args(kwargs, "triplet_mining_cpu");
        py::gil_scoped_release release;
        triplet_mining_cpu(args, threads);
      },
      py::arg("threads"));
#ifdef MEDVL_WITH_CUDA
  m.def("triplet_mining_cuda_workspace_bytes", &triplet_mining_cuda_workspace_bytes, py::arg("n_anchor"),
        py::arg("n_candidate"), py::arg("dim"), py::arg("strategy"), py::arg("max_pairs_per_anchor"));
  m.def(
      "triplet_mining_cuda",
      [](uintptr_t stream, const py::kwargs& kwargs) {
        const TripletMiningArgs args = triplet_mining_args(kwargs, "triplet_mining_cuda");
        py::gil_scoped_release release;
        triplet_mining_cuda(args, reinterpret_cast<void*>(stream));
      },
      py::arg("stream"));
#endif
}

}  // namespace bind
}  // namespace medvl
