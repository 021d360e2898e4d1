// The extension's ops (schemas in ops.cpp, namespace fused_resnet_C): argument checks, then the launchers of
// kernels.h. The block ops (block.cpp) call these, so a block is checked piece by piece as well.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fused_resnet {

// Formats sizes by hand: streaming an IntArrayRef into a TORCH_CHECK message crashed (SIGSEGV while raising)
// with torch 2.11 headers and g++ 13.3 on the H100 machine.
std::string shape_str(at::IntArrayRef v);
// [N, C, H, W] channels_last or contiguous [M, C].
bool channels_innermost(const at::Tensor& x);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats(const at::Tensor& a, const at::Tensor& gamma,
                                                                    const at::Tensor& beta, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_from_sums(const at::Tensor& a,
                                                                              const at::Tensor& sum,
                                                                              const at::Tensor& sq_sum,
                                                                              const at::Tensor& gamma,
                                                                              const at::Tensor& beta, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps);
void bn_running_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                       const at::Tensor& var, int64_t count, std::optional<double> momentum);
at::Tensor bn_act(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu,
                  const std::optional<at::Tensor>& residual_scale, const std::optional<at::Tensor>& residual_shift,
                  at::IntArrayRef option_a_stride, const std::optional<at::Tensor>& sample_scale = std::nullopt);
std::tuple<at::Tensor, at::Tensor> drelu_dbn_reduce(const at::Tensor& g, const std::optional<at::Tensor>& y,
                                                    const at::Tensor& a, const at::Tensor& mean,
                                                    const at::Tensor& rstd, const at::Tensor& scale,
                                                    const at::Tensor& shift,
                                                    const std::optional<at::Tensor>& sample_scale = std::nullopt,
                                                    bool mask = true);
at::Tensor dbn_apply(const at::Tensor& g, const std::optional<at::Tensor>& y, const at::Tensor& a,
                     const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, bool batch_stats,
                     const std::optional<at::Tensor>& sample_scale = std::nullopt, bool mask = true);
at::Tensor residual_grad(const std::optional<at::Tensor>& d_main, const at::Tensor& dy, const at::Tensor& y,
                         const at::Tensor& like, at::IntArrayRef option_a_stride);
at::Tensor avg_pool(const at::Tensor& x, int64_t k);
at::Tensor avg_pool_grad_add(const std::optional<at::Tensor>& d_main, const at::Tensor& d_pooled,
                             const at::Tensor& like, int64_t k);

// block.cpp: the block ops take the spec as flat lists (spec.h); `graphs`: units may run cuDNN fusion graphs
// (cudnn_fusion.h), false for backend cuda-unfused; `sample_scale`: stochastic depth's per-sample d [N] of the
// training ops (y = relu(d_n·bn(a_last) + shortcut); fused_resnet.backends.reference)
std::vector<at::Tensor> block_forward(const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                                      at::TensorList betas, const c10::List<std::optional<at::Tensor>>& running_means,
                                      const c10::List<std::optional<at::Tensor>>& running_vars,
                                      const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                                      at::ArrayRef<double> spec_floats, bool graphs,
                                      const std::optional<at::Tensor>& sample_scale);
at::Tensor block_inference(const at::Tensor& x, at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                           at::TensorList running_means, at::TensorList running_vars,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                           at::ArrayRef<double> spec_floats, bool graphs);
// eval with BN folded into the weights (W·s, one shift t per unit), as fused_resnet.backends.folding gives them
at::Tensor block_inference_folded(const at::Tensor& x, at::TensorList weights, at::TensorList shifts,
                                  const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                                  at::ArrayRef<double> spec_floats, bool graphs);
std::vector<at::Tensor> block_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                       at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                                       at::TensorList acts, at::TensorList means, at::TensorList variances,
                                       at::IntArrayRef spec_ints, at::ArrayRef<double> spec_floats,
                                       bool need_input_grad, bool graphs,
                                       const std::optional<at::Tensor>& sample_scale,
                                       const std::optional<at::Tensor>& counts);

}  // namespace fused_resnet
