// The Python module gansparse._C. Importing it runs the static torch.library registrations of
// the other translation units; the module itself only reports how it was built.
#include <Python.h>

#include "cpu_parallel.h"

// torch's build tools define TORCH_EXTENSION_NAME: _C from setup.py, another name for a JIT build.
#define GS_CONCAT_(a, b) a##b
#define GS_CONCAT(a, b) GS_CONCAT_(a, b)
#define GS_STR_(a) #a
#define GS_STR(a) GS_STR_(a)

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, GS_STR(TORCH_EXTENSION_NAME), "gansparse compiled kernels.", -1,
                          nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC GS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#if defined(GS_WITH_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cpu_isa", gansparse::cpu_isa()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
