// Whole-block ops: one residual block's training forward, eval forward and backward, each one C++ op (one Python
// round trip per block). Convolutions run through ATen (cuDNN on CUDA tensors); BN statistics, BN-apply + ReLU,
// the closing scale-shift-add-ReLU and the BN / ReLU backward are this extension's kernels (ops.cpp). Same math,
// same saved tensors and same outputs as fused_resnet.reference.block_forward / block_inference / block_backward:
//
//   forward   a_i = conv_i(r_{i-1});  mean_i, var_i, s_i, t_i = bn_stats(a_i);  r_i = relu(a_i·s_i + t_i)
//             (a temporary, never returned);  y = relu(a_last·s + t + shortcut) in one kernel
//   backward  Σdz, Σdz·x̂ = drelu_dbn_reduce;  da = dbn_apply (the ReLU mask recomputed inside both);
//             dgrad / wgrad through ATen (r_{i-1} recomputed for wgrad);  the shortcut's gradient in one kernel
//
// Work runs in NHWC: an NCHW input is converted on entry; y and dx are returned in the input's layout, the saved
// pre-BN outputs stay NHWC (the layout backward reads them in).
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>

#include "ops.h"
#include "spec.h"

namespace fused_resnet {
namespace {

constexpr auto kNHWC = at::MemoryFormat::ChannelsLast;

at::Tensor nhwc(const at::Tensor& t) { return t.contiguous(kNHWC); }
at::Tensor f32(const at::Tensor& v) { return v.to(at::kFloat).contiguous(); }

// Elements per channel of an [N, C, H, W] tensor: the count behind its BN statistics.
int64_t per_channel(const at::Tensor& a) { return a.size(1) == 0 ? 0 : a.numel() / a.size(1); }

// The layout every output follows (fused_resnet.reference.memory_format_of).
at::MemoryFormat format_of(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(kNHWC) && !x.is_contiguous() ? kNHWC : at::MemoryFormat::Contiguous;
}

at::Tensor conv_fprop(const UnitSpec& u, const at::Tensor& input, const at::Tensor& w) {
  return nhwc(at::convolution(input, w, std::nullopt, u.stride, u.padding, u.dilation, false, {0, 0}, u.groups));
}

void check_block(const char* op, const at::Tensor& x, const BlockSpec& spec,
                 std::initializer_list<size_t> per_unit, bool has_residual) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D [N, C, H, W] input, got ", shape_str(x.sizes()));
  TORCH_CHECK(x.is_cuda() || x.is_cpu(), op, ": expected a CUDA (or CPU) tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": expected float32, float16 or bfloat16, got ", x.scalar_type());
  for (size_t len : per_unit) {
    TORCH_CHECK(len == spec.units.size(), op, ": expected one tensor per unit of the spec (", spec.units.size(),
                ") in every list, got a list of ", len);
  }
  TORCH_CHECK(has_residual == (spec.shortcut == Shortcut::kTensor), op,
              ": a residual tensor is given exactly when the shortcut is a tensor");
}

struct Forward {
  std::vector<at::Tensor> acts, means, variances;
  std::vector<at::Tensor> counts;  // elements behind each unit's statistics (the group's for a synchronised unit)
  at::Tensor y;
};

// Synchronised BN: torch.distributed's collectives, reached through the Python ops fused_resnet::sync_stats and
// fused_resnet::sync_grad_sums (fused_resnet.distributed) between this file's kernels.
// The group's count comes back as a float64 0-d tensor on the device: nothing is read on the host.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sync_stats(const UnitSpec& u, const at::Tensor& mean,
                                                          const at::Tensor& var, int64_t count) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_resnet::sync_stats", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, double,
                                                            int64_t)>();
  const std::vector<at::Tensor> out = op.call(mean, var, count, u.eps, u.sync_group);
  return {out[0].contiguous(), out[1].contiguous(), out[2]};
}

std::tuple<at::Tensor, at::Tensor> sync_grad_sums(const UnitSpec& u, const at::Tensor& sum_dz,
                                                  const at::Tensor& sum_dz_xhat, const at::Tensor& rstd) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_resnet::sync_grad_sums", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            int64_t)>();
  const std::vector<at::Tensor> out = op.call(sum_dz, sum_dz_xhat, rstd, u.sync_group);
  return {out[0].contiguous(), out[1].contiguous()};
}

// A unit without batch_stats normalises with its running statistics (copied to fp32, never aliased).
Forward forward(const BlockSpec& spec, const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                at::TensorList betas, const std::vector<std::optional<at::Tensor>>& running_means,
                const std::vector<std::optional<at::Tensor>>& running_vars, const std::optional<at::Tensor>& residual) {
  const size_t n = spec.units.size(), n_main = spec.n_main();
  const at::Tensor xc = nhwc(x);
  Forward out;
  std::vector<at::Tensor> scales, shifts;
  at::Tensor input = xc;
  for (size_t i = 0; i < n; ++i) {
    if (i == n_main) input = xc;  // the projection shortcut reads the block input
    const UnitSpec& u = spec.units[i];
    at::Tensor a = conv_fprop(u, input, weights[i]);
    const at::Tensor gamma = f32(gammas[i]), beta = f32(betas[i]);
    at::Tensor mean, var, s, t, rstd;
    const int64_t local = per_channel(a);
    at::Tensor count;  // filled on the device: a synchronised spec's forward returns them all
    if (u.batch_stats) {
      std::tie(mean, var, s, t) = bn_stats(a, gamma, beta, u.eps);
      if (u.sync_group != 0) {  // the group's statistics, before anything reads them
        std::tie(mean, var, count) = sync_stats(u, mean, var, local);
        std::tie(s, t, rstd) = bn_scale_shift(gamma, beta, mean, var, u.eps);
      }
    } else {
      TORCH_CHECK(running_means[i].has_value() && running_vars[i].has_value(),
                  "block_forward: unit ", i, " uses running statistics (eval mode) but has none");
      mean = running_means[i]->to(at::kFloat, false, /*copy=*/true).contiguous();
      var = running_vars[i]->to(at::kFloat, false, /*copy=*/true).contiguous();
      std::tie(s, t, rstd) = bn_scale_shift(gamma, beta, mean, var, u.eps);
    }
    if (i + 1 < n_main) input = bn_act(a, s, t, std::nullopt, true, std::nullopt, std::nullopt, {});
    out.acts.push_back(a);
    out.means.push_back(mean);
    out.variances.push_back(var);
    if (spec.synced()) {
      out.counts.push_back(count.defined() ? count
                                           : at::full({}, static_cast<double>(local), a.options().dtype(at::kDouble)));
    }
    scales.push_back(s);
    shifts.push_back(t);
  }
  std::optional<at::Tensor> res, res_scale, res_shift;
  std::vector<int64_t> option_a_stride;
  if (spec.shortcut == Shortcut::kIdentity || spec.shortcut == Shortcut::kOptionA) {
    res = xc;
    if (spec.shortcut == Shortcut::kOptionA) {
      option_a_stride.assign(spec.option_a_stride.begin(), spec.option_a_stride.end());
    }
  } else if (spec.shortcut == Shortcut::kProjection) {
    res = out.acts[n_main];
    res_scale = scales[n_main];
    res_shift = shifts[n_main];
  } else if (spec.shortcut == Shortcut::kTensor) {
    res = nhwc(residual->to(x.scalar_type()));
  }
  out.y = bn_act(out.acts[n_main - 1], scales[n_main - 1], shifts[n_main - 1], res, true, res_scale, res_shift,
                 option_a_stride);
  return out;
}

std::vector<std::optional<at::Tensor>> optionals(const c10::List<std::optional<at::Tensor>>& list) {
  std::vector<std::optional<at::Tensor>> out;
  for (const auto& v : list) out.push_back(v);
  return out;
}

std::vector<std::optional<at::Tensor>> optionals(at::TensorList list) {
  return std::vector<std::optional<at::Tensor>>(list.begin(), list.end());
}

}  // namespace

std::vector<at::Tensor> block_forward(const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                                      at::TensorList betas, const c10::List<std::optional<at::Tensor>>& running_means,
                                      const c10::List<std::optional<at::Tensor>>& running_vars,
                                      const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                                      at::ArrayRef<double> spec_floats) {
  const BlockSpec spec = BlockSpec::parse("block_forward", spec_ints, spec_floats);
  check_block("block_forward", x, spec,
              {weights.size(), gammas.size(), betas.size(), running_means.size(), running_vars.size()},
              residual.has_value());
  Forward f = forward(spec, x, weights, gammas, betas, optionals(running_means), optionals(running_vars), residual);
  std::vector<at::Tensor> out{f.y.contiguous(format_of(x))};
  out.insert(out.end(), f.acts.begin(), f.acts.end());  // NHWC, as backward reads them
  out.insert(out.end(), f.means.begin(), f.means.end());
  out.insert(out.end(), f.variances.begin(), f.variances.end());
  if (spec.synced()) out.push_back(at::stack(f.counts));  // fused_resnet.tensors.Forward.counts
  return out;
}

at::Tensor block_inference(const at::Tensor& x, at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                           at::TensorList running_means, at::TensorList running_vars,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                           at::ArrayRef<double> spec_floats) {
  BlockSpec spec = BlockSpec::parse("block_inference", spec_ints, spec_floats);
  check_block("block_inference", x, spec,
              {weights.size(), gammas.size(), betas.size(), running_means.size(), running_vars.size()},
              residual.has_value());
  for (auto& u : spec.units) u.batch_stats = false;  // eval: running statistics
  Forward f = forward(spec, x, weights, gammas, betas, optionals(running_means), optionals(running_vars), residual);
  return f.y.contiguous(format_of(x));
}

std::vector<at::Tensor> block_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                       at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                                       at::TensorList acts, at::TensorList means, at::TensorList variances,
                                       at::IntArrayRef spec_ints, at::ArrayRef<double> spec_floats,
                                       bool need_input_grad, const std::optional<at::Tensor>& counts) {
  const BlockSpec spec = BlockSpec::parse("block_backward", spec_ints, spec_floats);
  TORCH_CHECK(!spec.synced() || (counts.has_value() && counts->numel() == static_cast<int64_t>(spec.units.size())),
              "block_backward: a synchronised spec needs the forward's counts, one per unit");
  const size_t n = spec.units.size(), n_main = spec.n_main();
  check_block("block_backward", x, spec,
              {weights.size(), gammas.size(), betas.size(), acts.size(), means.size(), variances.size()},
              spec.shortcut == Shortcut::kTensor);
  const at::Tensor xc = nhwc(x), yc = nhwc(y), dyc = nhwc(dy.to(y.scalar_type()));
  std::vector<at::Tensor> a(n), mean(n), s(n), t(n), rstd(n), dws(n), dgammas(n), dbetas(n);
  for (size_t i = 0; i < n; ++i) {
    a[i] = nhwc(acts[i]);
    mean[i] = f32(means[i]);
    std::tie(s[i], t[i], rstd[i]) =
        bn_scale_shift(f32(gammas[i]), f32(betas[i]), mean[i], f32(variances[i]), spec.units[i].eps);
  }
  // Unit i's BN + ReLU backward and its conv's dgrad / wgrad: g is the gradient at the unit's ReLU output, the
  // mask [y > 0] when `mask_y` is given, else [a_i·s_i + t_i > 0].
  auto unit_backward = [&](size_t i, const at::Tensor& g, const std::optional<at::Tensor>& mask_y,
                           const at::Tensor& input, bool need_inp) {
    const UnitSpec& u = spec.units[i];
    auto [sum_dz, sum_dz_xhat] = drelu_dbn_reduce(g, mask_y, a[i], mean[i], rstd[i], s[i], t[i]);
    dgammas[i] = sum_dz_xhat.to(gammas[i].scalar_type());  // this rank's sums, as torch's SyncBatchNorm gives
    dbetas[i] = sum_dz.to(betas[i].scalar_type());
    if (u.sync_group != 0 && u.batch_stats) {
      std::tie(sum_dz, sum_dz_xhat) = sync_grad_sums(u, sum_dz, sum_dz_xhat, rstd[i]);
      // dbn_apply divides by this rank's count: the group's sums scaled by local / group count give Σ/M_group
      // (the group count stays on the device)
      const double local = static_cast<double>(per_channel(a[i]));
      const at::Tensor ratio = at::reciprocal((*counts)[i]).mul_(local).to(at::kFloat);
      sum_dz = sum_dz * ratio;
      sum_dz_xhat = sum_dz_xhat * ratio;
    }
    const at::Tensor da = dbn_apply(g, mask_y, a[i], mean[i], rstd[i], s[i], t[i], sum_dz, sum_dz_xhat, u.batch_stats);
    auto [d_inp, dw, unused] = at::convolution_backward(da, input, weights[i], std::nullopt, u.stride, u.padding,
                                                        u.dilation, false, {0, 0}, u.groups, {need_inp, true, false});
    dws[i] = dw.contiguous(weights[i].suggest_memory_format());
    return d_inp.defined() ? nhwc(d_inp) : d_inp;
  };
  // The projection's unit first, then the main path's from the last: every backend reduces synchronised
  // statistics in this order (fused_resnet.reference.block_backward).
  at::Tensor d_sc;
  if (spec.shortcut == Shortcut::kProjection) d_sc = unit_backward(n_main, dyc, yc, xc, need_input_grad);
  at::Tensor g = dyc, dx;
  std::optional<at::Tensor> mask_y = yc;
  for (size_t i = n_main; i-- > 0;) {
    const at::Tensor input = i > 0 ? bn_act(a[i - 1], s[i - 1], t[i - 1], std::nullopt, true, std::nullopt,
                                            std::nullopt, {})  // r_{i-1}, recomputed
                                   : xc;
    at::Tensor d = unit_backward(i, g, mask_y, input, i > 0 || need_input_grad);
    if (i > 0) {
      g = d;
      mask_y = std::nullopt;  // the next unit's own ReLU
    } else {
      dx = d;
    }
  }
  at::Tensor d_residual;
  const std::vector<int64_t> option_a_stride(spec.option_a_stride.begin(), spec.option_a_stride.end());
  if (spec.shortcut == Shortcut::kIdentity && need_input_grad) {
    dx = residual_grad(dx, dyc, yc, xc, {});
  } else if (spec.shortcut == Shortcut::kOptionA && need_input_grad) {
    dx = residual_grad(dx, dyc, yc, xc, option_a_stride);
  } else if (spec.shortcut == Shortcut::kTensor) {
    d_residual = residual_grad(std::nullopt, dyc, yc, yc, {});
  } else if (spec.shortcut == Shortcut::kProjection && need_input_grad) {
    dx = at::add(dx, d_sc);
  }
  const auto fmt = format_of(x);
  std::vector<at::Tensor> out{dx.defined() ? dx.contiguous(fmt) : x.new_empty({0}),
                              d_residual.defined() ? d_residual.contiguous(fmt) : x.new_empty({0})};
  out.insert(out.end(), dws.begin(), dws.end());
  out.insert(out.end(), dgammas.begin(), dgammas.end());
  out.insert(out.end(), dbetas.begin(), dbetas.end());
  return out;
}

}  // namespace fused_resnet
