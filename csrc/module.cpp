// The Python module stellar._C: importing it registers the ops (static initializers of
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL) and exposes what was built, for `stellar info`.
#include <Python.h>

#include "stellar_build_info.h"

#ifndef STELLAR_TORCH_VERSION
#define STELLAR_TORCH_VERSION "unknown"
#endif
#ifndef STELLAR_CUDA_ARCH_LIST
#define STELLAR_CUDA_ARCH_LIST ""
#endif
#ifndef STELLAR_CUDA_VERSION
#define STELLAR_CUDA_VERSION ""
#endif

// A marker stellar/_ext.py can find in the shared object's bytes without loading it, so a
// library built for another torch (which may fail to load at all) still names its version.
extern "C" {
__attribute__((used)) const char stellar_build_marker[] =
    "STELLAR_BUILT_FOR_TORCH=" STELLAR_TORCH_VERSION ";";
}

static struct PyModuleDef stellar_module = {
    PyModuleDef_HEAD_INIT, "_C", "stellar's C++/CUDA extension (ops under torch.ops.stellar)", -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&stellar_module);
  if (m == nullptr) return nullptr;
#ifdef STELLAR_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", STELLAR_TORCH_VERSION) < 0 ||
      PyModule_AddObject(m, "WITH_CUDA", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_VERSION", STELLAR_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCH_LIST", STELLAR_CUDA_ARCH_LIST) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
