// Every op of the extension: schemas (namespace fused_resnet_C), argument checks and dispatcher registration.
// Checks live here, compiled by the host compiler; the .cu files hold kernels and their launchers only.
// Also the Python module object (fused_resnet._C): importing it loads this library and registers the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <Python.h>

#include <optional>
#include <string>

#include "bn_act.h"

namespace fused_resnet {
namespace {

// Shapes are formatted by hand: streaming an IntArrayRef into a TORCH_CHECK message crashed (SIGSEGV while
// raising) with torch 2.11 headers and g++ 13.3 on the H100 machine, while dtype/device/plain messages raised fine.
std::string shape_str(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

bool channels_innermost(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) || (x.dim() == 2 && x.is_contiguous());
}

}  // namespace

at::Tensor bn_act(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(a.is_cuda(), "bn_act: expected a CUDA tensor, got one on ", a.device());
  TORCH_CHECK(channels_innermost(a), "bn_act: expected a channels_last (NHWC) 4-D or contiguous [M, C] tensor, ",
              "got sizes ", shape_str(a.sizes()), " strides ", shape_str(a.strides()));
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
              "bn_act: expected float32, float16 or bfloat16 activations, got ", a.scalar_type());
  const int64_t C = a.size(1);  // [N, C, H, W] or [M, C]
  for (const at::Tensor* v : {&scale, &shift}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == C && v->is_contiguous() &&
                    v->device() == a.device(),
                "bn_act: expected scale and shift as contiguous float32 [", C, "] tensors on ", a.device(),
                ", got ", v->scalar_type(), " ", shape_str(v->sizes()), " on ", v->device());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == a.sizes() && residual->scalar_type() == a.scalar_type() &&
                    residual->device() == a.device() && channels_innermost(*residual),
                "bn_act: expected the residual with the activations' sizes, dtype, device and layout");
  }
  at::Tensor y = at::empty_like(a);  // keeps channels_last
  bn_act_launch(a, scale, shift, residual, y, relu);
  return y;
}

TORCH_LIBRARY(fused_resnet_C, m) {
  m.def("bn_act(Tensor a, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) { m.impl("bn_act", &bn_act); }

// CPU tensors get a clear error from the first check instead of the dispatcher's "not implemented" (and CI
// exercises the extension's error path without a GPU).
TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) { m.impl("bn_act", &bn_act); }

}  // namespace fused_resnet

#define FR_STR2(x) #x
#define FR_STR(x) FR_STR2(x)
#define FR_CAT2(a, b) a##b
#define FR_CAT(a, b) FR_CAT2(a, b)

static PyModuleDef fused_resnet_module = {PyModuleDef_HEAD_INIT, FR_STR(TORCH_EXTENSION_NAME),
                                          "fused_resnet CUDA kernels (ops under torch.ops.fused_resnet_C)", -1,
                                          nullptr};

PyMODINIT_FUNC FR_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fused_resnet_module); }
