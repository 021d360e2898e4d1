// Launchers of the memory-bound kernels. Each runs on the tensors' device: the CUDA kernel on the current stream
// for CUDA tensors, the same kernel body in a host loop for CPU tensors (the CPU test suite's way of exercising
// it). Arguments are validated by the ops (ops.cpp) before a launcher is called: activations channels-innermost
// ([N, C, H, W] channels_last or contiguous [M, C]) in float32 / float16 / bfloat16, per-channel vectors
// contiguous float32 [C].
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fused_resnet {

// bn_stats.cu ---------------------------------------------------------------------------------------------
// Per-channel mean and biased variance of a (fp32 Welford partials merged with Chan's formula), and the BN's
// affine map s = γ·rsqrt(var + eps), t = β − mean·s: returns {mean, var, s, t}.
std::vector<at::Tensor> bn_stats_launch(const at::Tensor& a, const at::Tensor& gamma, const at::Tensor& beta,
                                        double eps);
// bn_stats from the per-channel fp32 Σa and Σa² a conv epilogue produced; channels where that cancels are
// recomputed exactly from a (bn_stats.cu says when).
std::vector<at::Tensor> bn_stats_from_sums_launch(const at::Tensor& a, const at::Tensor& sum, const at::Tensor& sq_sum,
                                                  const at::Tensor& gamma, const at::Tensor& beta, double eps);
// {s, t, rstd} from given statistics (running statistics in eval mode, or saved batch statistics).
std::vector<at::Tensor> bn_scale_shift_launch(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                              const at::Tensor& var, double eps);
// torch's running-statistics update, in place (num_batches_tracked incremented first; momentum = None is the
// cumulative average 1 / num_batches_tracked; running_var receives var·count/(count − 1)).
void bn_running_update_launch(const at::Tensor& running_mean, const at::Tensor& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                              const at::Tensor& var, int64_t count, std::optional<double> momentum);

// bn_act.cu -----------------------------------------------------------------------------------------------
// y = [relu](d_n·(a·s + t) + shortcut), the shortcut being none, `residual` (same shape), residual·rs + rt (a
// projection's pre-BN output through its BN) or, with `option_a_stride` = {s_h, s_w}, option A read in place from the
// block input `residual` [N, C_in, H, W]: residual[n, c, p·s_h, q·s_w] for c < C_in, zero above. d: stochastic
// depth's `sample_scale` [N] (float32, bf16 or fp16, read as float; 1 without it; given only with relu: a
// closing's).
at::Tensor bn_act_launch(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                         const std::optional<at::Tensor>& residual_shift, at::IntArrayRef option_a_stride, bool relu,
                         const std::optional<at::Tensor>& sample_scale);

// dbn.cu --------------------------------------------------------------------------------------------------
// dz = g·mask with mask = [y > 0] when y is given, else [a·s + t > 0] (the BN's own ReLU, recomputed), or no mask
// at all with `mask` false (a BN no ReLU follows: an open block's last; y then absent), times d_n where stochastic
// depth's `sample_scale` d [N] is given (as bn_act reads it; only with y: the closing's last BN); returns
// {Σdz, Σdz·x̂} with x̂ = (a − mean)·rstd. dz is not written.
std::vector<at::Tensor> drelu_dbn_reduce_launch(const at::Tensor& g, const std::optional<at::Tensor>& y,
                                                const at::Tensor& a, const at::Tensor& mean, const at::Tensor& rstd,
                                                const at::Tensor& scale, const at::Tensor& shift,
                                                const std::optional<at::Tensor>& sample_scale, bool mask);
// da = s·(dz − Σdz/M − x̂·Σdz·x̂/M) (batch statistics) or s·dz (fixed statistics), dz recomputed as above.
at::Tensor dbn_apply_launch(const at::Tensor& g, const std::optional<at::Tensor>& y, const at::Tensor& a,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat,
                            bool batch_stats, const std::optional<at::Tensor>& sample_scale, bool mask);
// The shortcut's gradient, shaped like `like` (the block input, or the residual): d_main + dz (identity, tensor
// shortcut without d_main) or, with option_a_stride, d_main + option A's gradient (dz[n, c, h/s_h, w/s_w] where both
// divide, c < C_in). dz = dy·[y > 0]; out in like's dtype.
at::Tensor residual_grad_launch(const std::optional<at::Tensor>& d_main, const at::Tensor& dy, const at::Tensor& y,
                                const at::Tensor& like, at::IntArrayRef option_a_stride);

// pool.cu -------------------------------------------------------------------------------------------------
// AvgPool2d(k, k, ceil_mode=True, count_include_pad=False) of x [N, C, H, W]: y [N, C, ceil(H/k), ceil(W/k)] in
// x's dtype, each window summed in fp32 and divided by its in-bounds count.
at::Tensor avg_pool_launch(const at::Tensor& x, int64_t k);
// The pool's gradient at its input, shaped like `like` (the pooled input): d_main + d_pooled[n, c, h/k, w/k] /
// count of that window, without d_main when none is given; out in like's dtype.
at::Tensor avg_pool_grad_add_launch(const std::optional<at::Tensor>& d_main, const at::Tensor& d_pooled,
                                    const at::Tensor& like, int64_t k);

}  // namespace fused_resnet
