// The pybind11 module fastedit._C: non-tensor helpers only. Tensor ops are not bound here; they
// are registered with the dispatcher (csrc/ops.cpp, csrc/cpu/, csrc/cuda/) when this shared
// library is loaded, and are called as torch.ops.fastedit.<name>.
//
// What the build knows (version, build system, CUDA) comes from fastedit_build_config.h, which
// setup.py and CMakeLists.txt both generate from csrc/build_config.h.in.

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>

#include <string>

#include "editor_step_math.h"
#include "fastedit_build_config.h"

#if FASTEDIT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;

namespace {

std::string compiler_name() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::list split_arch_list(const std::string& text) {
  py::list archs;
  std::string item;
  for (char c : text + ";") {
    if (c == ';' || c == ' ' || c == ',') {
      if (!item.empty()) archs.append(item);
      item.clear();
    } else {
      item.push_back(c);
    }
  }
  return archs;
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTEDIT_VERSION;
  info["torch_version"] = TORCH_VERSION;  // the torch headers this module was compiled against
  info["compiler"] = compiler_name();
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  info["build_system"] = FASTEDIT_BUILD_SYSTEM;
#ifdef NDEBUG
  info["debug"] = false;
#else
  info["debug"] = true;
#endif

#if FASTEDIT_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
#endif
  info["cuda_archs"] = split_arch_list(FASTEDIT_CUDA_ARCH_LIST);

#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
#endif
#if AT_PARALLEL_OPENMP
  info["parallel_backend"] = "OpenMP";
#elif AT_PARALLEL_NATIVE
  info["parallel_backend"] = "native";
#else
  info["parallel_backend"] = "unknown";
#endif
  // True when at::parallel_for in this module's kernels really runs on several threads (with the
  // OpenMP backend that needs -fopenmp at compile time; without it the loops run serially).
#ifdef INTRA_OP_PARALLEL
  info["intra_op_parallel"] = true;
#else
  info["intra_op_parallel"] = false;
#endif
  info["num_threads"] = static_cast<long>(at::get_num_threads());

  // The ops of csrc/ops.cpp, and the rule ids of fastedit::editor_step_ by editor name (the
  // step::Rule enum); tests/packaging/test_extension.py checks both against fastedit/ops/_table.py.
  py::list ops;
  ops.append("edit_constraint");
  ops.append("editor_step_");
  ops.append("edit_metrics");
  info["ops"] = ops;
  py::dict rules;
  rules["gd"] = static_cast<long>(fastedit::step::kGD);
  rules["scaled_gd"] = static_cast<long>(fastedit::step::kScaledGD);
  rules["rprop"] = static_cast<long>(fastedit::step::kSign);
  rules["rmsprop"] = static_cast<long>(fastedit::step::kRMSProp);
  rules["momentum"] = static_cast<long>(fastedit::step::kMomentum);
  rules["adam"] = static_cast<long>(fastedit::step::kAdam);
  info["rules"] = rules;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fastedit's compiled extension. Tensor ops are registered as torch.ops.fastedit.* when this "
      "module is imported; use fastedit.ops._extension to load it safely.";
  m.def("build_info", &build_info,
        "How this extension was built: version, torch version, compiler, CUDA and OpenMP support.");

  // The ops are registered by now (static initialisers ran when this library was loaded). Their
  // Python parts (fake kernels, autograd) live next to each op in fastedit/ops/<op>.py, and
  // fastedit.ops registers them all: call it here too, so that a direct `import fastedit._C`
  // gives complete ops. Outside the fastedit package (a module built by CMake and loaded on its
  // own) there is nothing to register.
  try {
    py::module_::import("fastedit.ops").attr("_register_python_parts")();
  } catch (py::error_already_set& error) {
    if (!error.matches(PyExc_ModuleNotFoundError)) {
      PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                       "fastedit._C: could not register the Python parts of its ops: %s",
                       error.what());
    }
  }
}
