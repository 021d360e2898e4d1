// Python module object of the extension. The ops themselves are registered with the dispatcher by the
// TORCH_LIBRARY blocks of the .cu files when this shared library loads (namespace fused_resnet_C).
#include <Python.h>

#define FR_STR2(x) #x
#define FR_STR(x) FR_STR2(x)
#define FR_CAT2(a, b) a##b
#define FR_CAT(a, b) FR_CAT2(a, b)

static PyModuleDef fused_resnet_module = {PyModuleDef_HEAD_INIT, FR_STR(TORCH_EXTENSION_NAME),
                                          "fused_resnet CUDA kernels (ops under torch.ops.fused_resnet_C)", -1,
                                          nullptr};

PyMODINIT_FUNC FR_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fused_resnet_module); }
