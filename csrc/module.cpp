// kdext._C: the shared library that holds the ops. Importing it runs the
// static TORCH_LIBRARY registrations; the module itself only reports how it
// was built, so that kdext can refuse to run on a CPU that lacks the
// instruction set the CPU kernels were compiled for, and the lists the Python
// checks share with the C++ ones (kdext/_validate.py).
#include <Python.h>

#include "kdext/divergence.h"

namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kCpuCapability = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kCpuCapability = "AVX2";
#else
constexpr const char* kCpuCapability = "DEFAULT";
#endif

#if defined(KDEXT_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// ((name, parameter name or None), ...) in the order of kdext::kDivergenceNames.
PyObject* divergence_names() {
  constexpr Py_ssize_t n = sizeof(kdext::kDivergenceNames) / sizeof(kdext::kDivergenceNames[0]);
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const auto& e = kdext::kDivergenceNames[i];
    PyObject* pair = e.param ? Py_BuildValue("(ss)", e.name, e.param) : Py_BuildValue("(sO)", e.name, Py_None);
    if (pair == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i, pair);  // steals the reference
  }
  return out;
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* divergences = divergence_names();
  if (divergences == nullptr) return nullptr;
  // "N" hands the reference to the dict.
  return Py_BuildValue("{s:s,s:O,s:N}", "cpu_capability", kCpuCapability, "cuda", kWithCuda ? Py_True : Py_False,
                       "divergences", divergences);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "How this kdext._C was built (CPU vector ISA, CUDA) and the divergences it knows, with their parameters."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdext's compiled ops (torch.ops.kdext.*).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
