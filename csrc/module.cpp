// kdext._C: the shared library that holds the ops. Importing it runs the
// static TORCH_LIBRARY registrations; the module itself only reports how it
// was built, so that kdext can refuse to run on a CPU that lacks the
// instruction set the CPU kernels were compiled for, and the lists the Python
// checks share with the C++ ones (kdext/_validate.py); it also lets tests
// switch the CUDA launchers' tuning knobs (read from the environment once per
// process: csrc/include/kdext/cuda/tuning.h, docs/CUDA.md) within one process.
#include <Python.h>

#include "kdext/cuda/tuning.h"
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

// The knobs in force, as {"onchip": bool, "cluster": int, "chunks": int} (0: chosen per shape).
PyObject* cuda_tuning(PyObject*, PyObject*) {
  const kdext::cuda::Tuning& t = kdext::cuda::tuning();
  return Py_BuildValue("{s:O,s:i,s:i}", "onchip", t.onchip ? Py_True : Py_False, "cluster", t.cluster, "chunks",
                       t.chunks);
}

PyObject* set_cuda_tuning(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"onchip", "cluster", "chunks", nullptr};
  int onchip = 1, cluster = 0, chunks = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "pii", const_cast<char**>(names), &onchip, &cluster, &chunks))
    return nullptr;
  if (!kdext::cuda::valid_cluster(cluster)) {
    PyErr_Format(PyExc_ValueError, "cluster must be 0 (chosen per shape), 1, 2, 4, 8 or 16, got %d", cluster);
    return nullptr;
  }
  if (!kdext::cuda::valid_chunks(chunks)) {
    PyErr_Format(PyExc_ValueError, "chunks must be 0 (chosen per shape) or in [1, %d], got %d",
                 kdext::cuda::kMaxForcedChunks, chunks);
    return nullptr;
  }
  kdext::cuda::Tuning t;
  t.onchip = onchip != 0;
  t.cluster = cluster;
  t.chunks = chunks;
  kdext::cuda::set_tuning(t);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "How this kdext._C was built (CPU vector ISA, CUDA) and the divergences it knows, with their parameters."},
    {"_cuda_tuning", cuda_tuning, METH_NOARGS, "The CUDA launchers' tuning knobs in force (docs/CUDA.md)."},
    {"_set_cuda_tuning", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_cuda_tuning)),
     METH_VARARGS | METH_KEYWORDS,
     "_set_cuda_tuning(onchip, cluster, chunks): replaces the CUDA tuning knobs (for tests; docs/CUDA.md)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdext's compiled ops (torch.ops.kdext.*).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
