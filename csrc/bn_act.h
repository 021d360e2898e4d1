// bn_act: y = relu(a * s + t [+ r]) per channel on NHWC activations (see bn_act.cu for the kernel).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace fused_resnet {

// Launches the kernel on the current stream. Inputs are validated by the op (ops.cpp): a and r channels
// innermost (channels_last 4-D or contiguous [M, C]) with the same sizes and dtype (float32/float16/bfloat16),
// s and t contiguous float32 [C], y allocated like a.
void bn_act_launch(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                   const std::optional<at::Tensor>& residual, at::Tensor& y, bool relu);

}  // namespace fused_resnet
