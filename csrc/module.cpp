// kdext._C: the shared library that holds the ops. Importing it runs the
// static TORCH_LIBRARY registrations; the module itself only reports how it
// was built, so that kdext can refuse to run on a CPU that lacks the
// instruction set the CPU kernels were compiled for.
#include <Python.h>

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

PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:O}", "cpu_capability", kCpuCapability, "cuda", kWithCuda ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this kdext._C was built: CPU vector ISA and CUDA."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdext's compiled ops (torch.ops.kdext.*).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
