#pragma once
// What the per-op binding files share. Python passes each entry point its arguments by keyword
// (pointers as integers: tensor.data_ptr()); an op's arguments are read in one function that the CPU
// and the CUDA entry points share, and a missing or unexpected keyword names the entry and the key.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>

namespace medvl {
namespace bind {

namespace py = pybind11;

class Keywords {
 public:
  Keywords(const py::kwargs& kwargs, const char* entry) : kwargs_(kwargs), entry_(entry) {}

  template <typename T>
  T* pointer(const char* key) { return reinterpret_cast<T*>(take(key).cast<uintptr_t>()); }

  template <typename T>
  T value(const char* key) { return take(key).cast<T>(); }

  // Every keyword was read: a name Python got wrong is an error, not an argument silently left at 0.
  void done() const {
    if (used_.size() == kwargs_.size()) return;  // take() read only names that exist: nothing unexpected
    for (const auto& item : kwargs_) {
      const std::string key = py::str(item.first);
      if (!used_.count(key))
        throw std::invalid_argument(std::string("medvl: ") + entry_ + ": unexpected argument '" + key + "'");
    }
  }

 private:
  py::object take(const char* key) {
    if (!kwargs_.contains(key))
      throw std::invalid_argument(std::string("medvl: ") + entry_ + ": missing argument '" + key + "'");
    used_.insert(key);
    return kwargs_[key];
  }

  const py::kwargs& kwargs_;
  const char* entry_;
  std::set<std::string> used_;
};

void bind_sigmoid_loss(py::module_& m);
void bind_triplet_mining(py::module_& m);
void bind_patch_embed3d(py::module_& m);

}  // namespace bind
}  // namespace medvl
