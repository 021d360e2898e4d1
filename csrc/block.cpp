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
// An open block (Shortcut::kOpen) closes with y = a_last·s + t (no shortcut, no ReLU: its module closes the block
// in torch): the same closing kernel without its ReLU, and backward starts from dz = dy, unmasked.
//
// Stochastic depth (the training ops' `sample_scale` d [N]): the closing kernel computes
// y = relu(d_n·(a_last·s + t) + shortcut), and backward scales the last main unit's dz = dy·[y > 0] by d_n inside
// its drelu_dbn_reduce and dbn_apply; the shortcut's gradient (the projection's BN included) takes dz unscaled.
//
// A unit reading the block input (the first, the projection) with UnitSpec::avg_pool k convs its average pool
// (pool.cu); backward recomputes the pool for the wgrad rather than saving it, and takes the input's gradient back
// through the pool in one kernel that also adds the rest of dx.
//
// Work runs in NHWC: an NCHW input is converted on entry; y and dx are returned in the input's layout, the saved
// pre-BN outputs stay NHWC (the layout backward reads them in).
//
// Where a unit may (cudnn_fusion.h: float16 / bfloat16 CUDA tensors, built with cudnn-frontend, `graphs` set by
// the backend), its convs run as cuDNN fusion graphs instead: the BN-apply + ReLU of the unit below on the conv's
// operand load (r_{i-1} is not written in the forward), the statistics' sums in the conv's epilogue; in backward
// the dgrad applies the unit below's dReLU, reduces its Σdz, Σdz·x̂ and writes r_{i-1} for this unit's wgrad; in
// eval each unit is one conv + bias (+ shortcut) + ReLU with its BN folded into the weights. A graph cuDNN has no
// engine for leaves that unit's step on the path above (counted in fusion::tallies()).
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>

#include "account.h"
#include "cudnn_fusion.h"
#include "ops.h"
#include "spec.h"

namespace fused_resnet {
namespace {

constexpr auto kNHWC = at::MemoryFormat::ChannelsLast;

// `result`, a layout or dtype conversion of t: a copy kernel where it is not t itself (the launch account's).
at::Tensor converted(const char* what, const at::Tensor& t, const at::Tensor& result) {
  if (!result.is_same(t)) account::launch(what, "copy", {t}, {result});
  return result;
}

at::Tensor nhwc(const at::Tensor& t) { return converted("to channels_last", t, t.contiguous(kNHWC)); }
at::Tensor f32(const at::Tensor& v) { return converted("to float32", v, v.to(at::kFloat).contiguous()); }
// γ or β as the per-channel kernels read it: in its own dtype where that is float32, bf16 or fp16 (ops.cpp's
// check_param), else in float32.
at::Tensor param(const at::Tensor& v) {
  const at::ScalarType t = v.scalar_type();
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) ? converted("contiguous", v, v.contiguous())
                                                                    : f32(v);
}
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  return converted("to the input's layout", t, t.contiguous(fmt));
}

// A running statistic in fp32, always a copy: the running update writes the buffer after the op has read it.
at::Tensor running_f32(const at::Tensor& v) {
  return converted("running statistic copy", v, v.to(at::kFloat, false, /*copy=*/true).contiguous());
}

// Elements per channel of an [N, C, H, W] tensor: the count behind its BN statistics.
int64_t per_channel(const at::Tensor& a) { return a.size(1) == 0 ? 0 : a.numel() / a.size(1); }

// The layout every output follows (fused_resnet.reference.memory_format_of).
at::MemoryFormat format_of(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(kNHWC) && !x.is_contiguous() ? kNHWC : at::MemoryFormat::Contiguous;
}

// A convolution's output as cuDNN writes it for an NHWC input: in NHWC. (ATen's meta convolution, the launch
// account's dry run, answers NCHW, which would count a copy the GPU never makes.)
at::Tensor as_cudnn_writes(const at::Tensor& t) { return t.is_meta() ? t.contiguous(kNHWC) : t; }

at::Tensor conv_fprop(const UnitSpec& u, const at::Tensor& input, const at::Tensor& w) {
  at::Tensor y = as_cudnn_writes(
      at::convolution(input, w, std::nullopt, u.stride, u.padding, u.dilation, false, {0, 0}, u.groups));
  account::launch("conv fprop", "conv", {input, w}, {y}, account::conv_flops(w.sizes(), y.sizes()));
  return nhwc(y);
}

// The conv input of a unit reading the block input: xc itself, or its average pool (UnitSpec::avg_pool). One
// unit of a block pools at most (BlockSpec::parse), so each op call pools once.
at::Tensor block_input_of(const UnitSpec& u, const at::Tensor& xc) {
  return u.avg_pool == 1 ? xc : avg_pool(xc, u.avg_pool);
}

void check_block(const char* op, const at::Tensor& x, const BlockSpec& spec,
                 std::initializer_list<size_t> per_unit, bool has_residual) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D [N, C, H, W] input, got ", shape_str(x.sizes()));
  // meta: the launch account's dry run (the *_account ops)
  TORCH_CHECK(x.is_cuda() || x.is_cpu() || x.is_meta(), op, ": expected a CUDA (or CPU) tensor, got one on ",
              x.device());
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

// What the closing kernel adds before the final ReLU: the block input (option A: strided and zero-padded in the
// kernel), the projection's pre-BN output with its scale and shift, a given tensor, or nothing.
struct ShortcutInput {
  std::optional<at::Tensor> res, scale, shift;
  std::vector<int64_t> option_a_stride;
};

// proj_* are the projection unit's a, s, t (read for a projection shortcut only)
ShortcutInput shortcut_input(const BlockSpec& spec, const at::Tensor& xc, const std::optional<at::Tensor>& residual,
                             const at::Tensor& proj_a, const at::Tensor& proj_s, const at::Tensor& proj_t) {
  ShortcutInput sc;
  if (spec.shortcut == Shortcut::kIdentity || spec.shortcut == Shortcut::kOptionA) {
    sc.res = xc;
    if (spec.shortcut == Shortcut::kOptionA) {
      sc.option_a_stride.assign(spec.option_a_stride.begin(), spec.option_a_stride.end());
    }
  } else if (spec.shortcut == Shortcut::kProjection) {
    sc = ShortcutInput{proj_a, proj_s, proj_t, {}};
  } else if (spec.shortcut == Shortcut::kTensor) {
    sc.res = nhwc(residual->to(xc.scalar_type()));
  }
  return sc;
}

// r = relu(a·s + t): a unit's BN-apply + ReLU, the next conv's input
at::Tensor bn_relu(const at::Tensor& a, const at::Tensor& s, const at::Tensor& t) {
  return bn_act(a, s, t, std::nullopt, true, std::nullopt, std::nullopt, {});
}

// y = relu([d_n·](a·s + t) + shortcut), one kernel; an open block's y = a·s + t (no shortcut, no ReLU)
at::Tensor close_block(const BlockSpec& spec, const at::Tensor& a, const at::Tensor& s, const at::Tensor& t,
                       const ShortcutInput& sc, const std::optional<at::Tensor>& sample_scale = std::nullopt) {
  return bn_act(a, s, t, sc.res, spec.final_relu(), sc.scale, sc.shift, sc.option_a_stride, sample_scale);
}

// d as the kernels take it: in its own dtype where that is float32, bf16 or fp16 (ops.cpp's check_sample_scale),
// else in float32; checked against the block input first. An open block has no closing for d to scale: its module
// applies its drop_path in torch (fused_resnet.backends.registry.Capabilities refuses the pair too).
std::optional<at::Tensor> sample_scale_of(const char* op, const BlockSpec& spec,
                                          const std::optional<at::Tensor>& sample_scale, const at::Tensor& x) {
  if (!sample_scale.has_value()) return std::nullopt;
  TORCH_CHECK(spec.final_relu(), op, ": an open block (shortcut 5: y = bn(a_last), no closing) takes no "
              "sample_scale (stochastic depth scales a closing)");
  const at::Tensor& d = *sample_scale;
  TORCH_CHECK(d.dim() == 1 && d.size(0) == x.size(0) && d.device() == x.device() && d.is_floating_point(), op,
              ": expected sample_scale (stochastic depth's per-sample scale) as a floating [", x.size(0),
              "] tensor on ", x.device(), ", got ", d.scalar_type(), " ", shape_str(d.sizes()), " on ", d.device());
  return param(d);
}

// A unit without batch_stats normalises with its running statistics (copied to fp32, never aliased).
Forward forward(const BlockSpec& spec, const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                at::TensorList betas, const std::vector<std::optional<at::Tensor>>& running_means,
                const std::vector<std::optional<at::Tensor>>& running_vars, const std::optional<at::Tensor>& residual,
                bool graphs, const std::optional<at::Tensor>& sample_scale) {
  const size_t n = spec.units.size(), n_main = spec.n_main();
  const at::Tensor xc = nhwc(x);
  Forward out;
  std::vector<at::Tensor> scales, shifts;
  // every fused unit's statistics sums zeroed at once
  std::vector<bool> fuses(n);
  std::vector<int64_t> sum_channels;
  for (size_t i = 0; i < n; ++i) {
    fuses[i] = !fusion::ineligible(xc, weights[i], spec.units[i], graphs);
    if (fuses[i] && fusion::stats_in_graph(spec.units[i])) sum_channels.push_back(weights[i].size(0));
  }
  const std::vector<fusion::Sums> sums = sum_channels.empty() ? std::vector<fusion::Sums>{}
                                                              : fusion::zeroed_sums(xc, sum_channels);
  size_t next_sums = 0;
  for (size_t i = 0; i < n; ++i) {
    const UnitSpec& u = spec.units[i];
    const bool below = i > 0 && i < n_main;  // the conv reads r_{i-1} = relu(a_{i-1}·s + t), else the block input
    const at::Tensor block_input = below ? at::Tensor() : block_input_of(u, xc);
    at::Tensor a, sum, sq_sum;
    if (fuses[i]) {
      const std::optional<fusion::Prologue> prologue =
          below ? std::optional<fusion::Prologue>(fusion::Prologue{scales[i - 1], shifts[i - 1]}) : std::nullopt;
      const std::optional<fusion::Sums> unit_sums =
          fusion::stats_in_graph(u) ? std::optional<fusion::Sums>(sums[next_sums++]) : std::nullopt;
      if (auto f = fusion::fprop(u, below ? out.acts[i - 1] : block_input, weights[i], prologue, unit_sums,
                                 std::nullopt, std::nullopt, false)) {
        std::tie(a, sum, sq_sum) = std::tie(f->y, f->sum, f->sq_sum);
      }
    }
    if (!a.defined()) {
      const at::Tensor input = below ? bn_relu(out.acts[i - 1], scales[i - 1], shifts[i - 1]) : block_input;
      a = conv_fprop(u, input, weights[i]);
    }
    const at::Tensor gamma = param(gammas[i]), beta = param(betas[i]);
    at::Tensor mean, var, s, t, rstd;
    const int64_t local = per_channel(a);
    at::Tensor count;  // filled on the device: a synchronised spec's forward returns them all
    if (u.batch_stats) {
      std::tie(mean, var, s, t) =
          sum.defined() ? bn_stats_from_sums(a, sum, sq_sum, gamma, beta, u.eps) : bn_stats(a, gamma, beta, u.eps);
      if (u.sync_group != 0) {  // the group's statistics, before anything reads them
        std::tie(mean, var, count) = sync_stats(u, mean, var, local);
        std::tie(s, t, rstd) = bn_scale_shift(gamma, beta, mean, var, u.eps);
      }
    } else {
      TORCH_CHECK(running_means[i].has_value() && running_vars[i].has_value(),
                  "block_forward: unit ", i, " uses running statistics (eval mode) but has none");
      mean = running_f32(*running_means[i]);
      var = running_f32(*running_vars[i]);
      std::tie(s, t, rstd) = bn_scale_shift(gamma, beta, mean, var, u.eps);
    }
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
  const ShortcutInput sc = shortcut_input(spec, xc, residual, out.acts.back(), scales.back(), shifts.back());
  out.y = close_block(spec, out.acts[n_main - 1], scales[n_main - 1], shifts[n_main - 1], sc, sample_scale);
  return out;
}

// Eval: unit i is BN(conv(r, W_i)) = conv(r, W_i)·s_i + t_i. A unit that may run a fusion graph runs
// relu?(conv(r, W_i·s_i) + t_i (+ shortcut)) as one; any other unit runs the conv, then the BN-apply kernels.
// `folded`: the weights are already W·s (fused_resnet.backends.folding's cache) and s is all ones; else W·s is
// formed here for the graphs, per call.
at::Tensor inference(const BlockSpec& spec, const at::Tensor& x, at::TensorList weights,
                     const std::vector<at::Tensor>& s, const std::vector<at::Tensor>& t, bool folded,
                     const std::optional<at::Tensor>& residual, bool graphs) {
  const size_t n_main = spec.n_main();
  const at::Tensor xc = nhwc(x);
  // relu?(conv(input, W_i·s_i) + t_i (+ res)) as one graph, or nothing when unit i cannot
  auto fused = [&](size_t i, const at::Tensor& input, const std::optional<at::Tensor>& res,
                   bool relu) -> std::optional<at::Tensor> {
    if (fusion::ineligible(xc, weights[i], spec.units[i], graphs)) return std::nullopt;
    at::Tensor w = weights[i];
    if (!folded) {
      w = (weights[i] * s[i].view({-1, 1, 1, 1})).to(weights[i].scalar_type());
      account::launch("fold W·s", "elementwise", {weights[i], s[i]}, {w});
    }
    auto f = fusion::fprop(spec.units[i], input, w, std::nullopt, std::nullopt, t[i], res, relu);
    return f ? std::optional<at::Tensor>(f->y) : std::nullopt;
  };
  // the projection first: its output is the closing unit's shortcut
  std::optional<at::Tensor> projected;
  at::Tensor proj_a;
  if (spec.shortcut == Shortcut::kProjection) {
    const at::Tensor input = block_input_of(spec.units[n_main], xc);
    projected = fused(n_main, input, std::nullopt, false);
    if (!projected) proj_a = conv_fprop(spec.units[n_main], input, weights[n_main]);
  }
  at::Tensor r = block_input_of(spec.units[0], xc);
  for (size_t i = 0; i + 1 < n_main; ++i) {
    auto f = fused(i, r, std::nullopt, true);
    r = f ? *f : bn_relu(conv_fprop(spec.units[i], r, weights[i]), s[i], t[i]);
  }
  const ShortcutInput sc = projected ? ShortcutInput{projected, std::nullopt, std::nullopt, {}}
                                     : shortcut_input(spec, xc, residual, proj_a, s.back(), t.back());
  const size_t last = n_main - 1;
  if (sc.option_a_stride.empty() && !sc.scale) {  // the closing graph adds a plain tensor
    if (auto y = fused(last, r, sc.res, spec.final_relu())) return *y;
  }
  return close_block(spec, conv_fprop(spec.units[last], r, weights[last]), s[last], t[last], sc);
}

std::vector<std::optional<at::Tensor>> optionals(const c10::List<std::optional<at::Tensor>>& list) {
  std::vector<std::optional<at::Tensor>> out;
  for (const auto& v : list) out.push_back(v);
  return out;
}

}  // namespace

std::vector<at::Tensor> block_forward(const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                                      at::TensorList betas, const c10::List<std::optional<at::Tensor>>& running_means,
                                      const c10::List<std::optional<at::Tensor>>& running_vars,
                                      const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                                      at::ArrayRef<double> spec_floats, bool graphs,
                                      const std::optional<at::Tensor>& sample_scale) {
  const BlockSpec spec = BlockSpec::parse("block_forward", spec_ints, spec_floats);
  check_block("block_forward", x, spec,
              {weights.size(), gammas.size(), betas.size(), running_means.size(), running_vars.size()},
              residual.has_value());
  Forward f = forward(spec, x, weights, gammas, betas, optionals(running_means), optionals(running_vars), residual,
                      graphs, sample_scale_of("block_forward", spec, sample_scale, x));
  std::vector<at::Tensor> out{in_format(f.y, format_of(x))};
  out.insert(out.end(), f.acts.begin(), f.acts.end());  // NHWC, as backward reads them
  out.insert(out.end(), f.means.begin(), f.means.end());
  out.insert(out.end(), f.variances.begin(), f.variances.end());
  if (spec.synced()) out.push_back(at::stack(f.counts));  // fused_resnet.tensors.Forward.counts
  return out;
}

at::Tensor block_inference(const at::Tensor& x, at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                           at::TensorList running_means, at::TensorList running_vars,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                           at::ArrayRef<double> spec_floats, bool graphs) {
  const BlockSpec spec = BlockSpec::parse("block_inference", spec_ints, spec_floats);
  check_block("block_inference", x, spec,
              {weights.size(), gammas.size(), betas.size(), running_means.size(), running_vars.size()},
              residual.has_value());
  std::vector<at::Tensor> s(spec.units.size()), t(spec.units.size());
  for (size_t i = 0; i < spec.units.size(); ++i) {
    at::Tensor rstd;
    std::tie(s[i], t[i], rstd) = bn_scale_shift(param(gammas[i]), param(betas[i]), f32(running_means[i]),
                                                f32(running_vars[i]), spec.units[i].eps);
  }
  return in_format(inference(spec, x, weights, s, t, false, residual, graphs), format_of(x));
}

at::Tensor block_inference_folded(const at::Tensor& x, at::TensorList weights, at::TensorList shifts,
                                  const std::optional<at::Tensor>& residual, at::IntArrayRef spec_ints,
                                  at::ArrayRef<double> spec_floats, bool graphs) {
  const BlockSpec spec = BlockSpec::parse("block_inference_folded", spec_ints, spec_floats);
  check_block("block_inference_folded", x, spec, {weights.size(), shifts.size()}, residual.has_value());
  std::vector<at::Tensor> s, t;
  for (size_t i = 0; i < spec.units.size(); ++i) {
    t.push_back(f32(shifts[i]));
    TORCH_CHECK(t[i].dim() == 1 && t[i].size(0) == weights[i].size(0), "block_inference_folded: expected shift ", i,
                " as a [", weights[i].size(0), "] vector (one per output channel), got ", shape_str(t[i].sizes()));
    s.push_back(at::ones_like(t[i]));
    account::launch("ones", "elementwise", {}, {s.back()});
  }
  return in_format(inference(spec, x, weights, s, t, true, residual, graphs), format_of(x));
}

std::vector<at::Tensor> block_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                       at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                                       at::TensorList acts, at::TensorList means, at::TensorList variances,
                                       at::IntArrayRef spec_ints, at::ArrayRef<double> spec_floats,
                                       bool need_input_grad, bool graphs,
                                       const std::optional<at::Tensor>& sample_scale,
                                       const std::optional<at::Tensor>& counts) {
  const BlockSpec spec = BlockSpec::parse("block_backward", spec_ints, spec_floats);
  TORCH_CHECK(!spec.synced() || (counts.has_value() && counts->numel() == static_cast<int64_t>(spec.units.size())),
              "block_backward: a synchronised spec needs the forward's counts, one per unit");
  const size_t n = spec.units.size(), n_main = spec.n_main();
  check_block("block_backward", x, spec,
              {weights.size(), gammas.size(), betas.size(), acts.size(), means.size(), variances.size()},
              spec.shortcut == Shortcut::kTensor);
  const std::optional<at::Tensor> d = sample_scale_of("block_backward", spec, sample_scale, x);
  // an open block's y is never read (no final ReLU to mask with, no shortcut): not converted either
  const at::Tensor xc = nhwc(x), yc = spec.final_relu() ? nhwc(y) : y;
  const at::Tensor dyc = nhwc(converted("to y's dtype", dy, dy.to(y.scalar_type())));
  std::vector<at::Tensor> a(n), mean(n), s(n), t(n), rstd(n), dws(n), dgammas(n), dbetas(n);
  for (size_t i = 0; i < n; ++i) {
    a[i] = nhwc(acts[i]);
    mean[i] = f32(means[i]);
    std::tie(s[i], t[i], rstd[i]) =
        bn_scale_shift(param(gammas[i]), param(betas[i]), mean[i], f32(variances[i]), spec.units[i].eps);
  }
  // Unit i's BN + ReLU backward: da_i from g, the gradient at the unit's ReLU output, with the mask [y > 0] when
  // `mask_y` is given, else [a_i·s_i + t_i > 0], or none without `mask` (an open block's last unit: no ReLU), and
  // dz scaled per sample by `scale` where given (the last main unit's under stochastic depth). `sums`: Σdz, Σdz·x̂
  // already reduced by the fused dgrad above.
  struct Sums {
    at::Tensor dz, dz_xhat;
  };
  auto unit_da = [&](size_t i, const at::Tensor& g, const std::optional<at::Tensor>& mask_y,
                     std::optional<Sums> sums, const std::optional<at::Tensor>& scale, bool mask) {
    const UnitSpec& u = spec.units[i];
    if (!sums) {
      auto [sum_dz, sum_dz_xhat] = drelu_dbn_reduce(g, mask_y, a[i], mean[i], rstd[i], s[i], t[i], scale, mask);
      sums = Sums{sum_dz, sum_dz_xhat};
    }
    auto [sum_dz, sum_dz_xhat] = *sums;
    // this rank's sums, as torch's SyncBatchNorm gives
    dgammas[i] = converted("dγ to γ's dtype", sum_dz_xhat, sum_dz_xhat.to(gammas[i].scalar_type()));
    dbetas[i] = converted("dβ to β's dtype", sum_dz, sum_dz.to(betas[i].scalar_type()));
    if (u.sync_group != 0 && u.batch_stats) {
      std::tie(sum_dz, sum_dz_xhat) = sync_grad_sums(u, sum_dz, sum_dz_xhat, rstd[i]);
      // dbn_apply divides by this rank's count: the group's sums scaled by local / group count give Σ/M_group
      // (the group count stays on the device)
      const double local = static_cast<double>(per_channel(a[i]));
      const at::Tensor ratio = at::reciprocal((*counts)[i]).mul_(local).to(at::kFloat);
      sum_dz = sum_dz * ratio;
      sum_dz_xhat = sum_dz_xhat * ratio;
    }
    return dbn_apply(g, mask_y, a[i], mean[i], rstd[i], s[i], t[i], sum_dz, sum_dz_xhat, u.batch_stats, scale,
                     mask);
  };
  // Unit i's conv backward: dw_i, and when need_inp the gradient at its input — the block input, or
  // r_below = relu(a_below·s + t). Fused, dgrad also applies the unit below's dReLU, reduces its sums and writes
  // r_below, which the wgrad then reads (else r_below is recomputed for the wgrad).
  // The fused dgrads' sums of units 0 .. n_main − 2 in one zeroed buffer (one fill per block) where the block
  // returns dγ and dβ as conversions of them (a bf16 / fp16 model); float32 parameters take the sums themselves
  // as dγ and dβ, which must then own their storage (dgrad_drelu_sums zeroes two buffers).
  std::vector<std::optional<fusion::Sums>> grad_sums(n);
  {
    std::vector<size_t> shared;
    std::vector<int64_t> channels;
    for (size_t b = 0; b + 1 < n_main; ++b) {
      if (gammas[b].scalar_type() != at::kFloat && betas[b].scalar_type() != at::kFloat &&
          !fusion::ineligible(xc, weights[b + 1], spec.units[b + 1], graphs) &&
          !fusion::ineligible(xc, weights[b], spec.units[b], graphs)) {
        shared.push_back(b);
        channels.push_back(a[b].size(1));
      }
    }
    if (shared.size() > 1) {
      const std::vector<fusion::Sums> zeroed = fusion::zeroed_sums(xc, channels);
      for (size_t k = 0; k < shared.size(); ++k) grad_sums[shared[k]] = zeroed[k];
    }
  }
  auto conv_backward = [&](size_t i, const at::Tensor& da, std::optional<size_t> below,
                           bool need_inp) -> std::pair<at::Tensor, std::optional<Sums>> {
    const UnitSpec& u = spec.units[i];
    const bool may_fuse = !fusion::ineligible(xc, weights[i], u, graphs);
    at::Tensor dw, d_inp, r_below;
    std::optional<Sums> sums;
    if (may_fuse && need_inp && below && !fusion::ineligible(xc, weights[*below], spec.units[*below], graphs)) {
      const size_t b = *below;
      if (auto f = fusion::dgrad_drelu_sums(u, da, weights[i], a[b], {s[b], t[b], mean[b], rstd[b]}, grad_sums[b])) {
        d_inp = f->dz;
        sums = Sums{f->sum_dz, f->sum_dz_xhat};
        r_below = f->r;
      }
    }
    if (below && !r_below.defined()) r_below = bn_relu(a[*below], s[*below], t[*below]);
    const at::Tensor input = below ? r_below : block_input_of(u, xc);  // the conv's real input: every wgrad's
    if (may_fuse) {
      if (auto f = fusion::wgrad(u, da, input, weights[i])) dw = *f;
    }
    const bool dgrad = need_inp && !d_inp.defined(), wgrad = !dw.defined();
    if (dgrad || wgrad) {
      auto [d, w_grad, unused] = at::convolution_backward(da, input, weights[i], std::nullopt, u.stride, u.padding,
                                                          u.dilation, false, {0, 0}, u.groups, {dgrad, wgrad, false});
      const int64_t flops = account::conv_flops(weights[i].sizes(), da.sizes());
      if (dgrad) {
        account::launch("conv dgrad", "conv", {da, weights[i]}, {d}, flops);
        d_inp = nhwc(as_cudnn_writes(d));
      }
      if (wgrad) {
        account::launch("conv wgrad", "conv", {da, input}, {w_grad}, flops);
        dw = w_grad;
      }
    }
    dws[i] = converted("to the weight's layout", dw, dw.contiguous(weights[i].suggest_memory_format()));
    return {d_inp, sums};
  };
  // The projection's unit first, then the main path's from the last: every backend reduces synchronised
  // statistics in this order (fused_resnet.reference.block_backward).
  at::Tensor d_sc;
  if (spec.shortcut == Shortcut::kProjection) {
    d_sc = conv_backward(n_main, unit_da(n_main, dyc, yc, std::nullopt, std::nullopt, true), std::nullopt,
                         need_input_grad).first;
  }
  at::Tensor g = dyc, dx;
  std::optional<at::Tensor> mask_y = spec.final_relu() ? std::optional<at::Tensor>(yc) : std::nullopt;
  std::optional<Sums> sums;
  for (size_t i = n_main; i-- > 0;) {
    const bool last = i == n_main - 1;
    const at::Tensor da = unit_da(i, g, mask_y, sums, last ? d : std::nullopt, !last || spec.final_relu());
    auto [d, below_sums] = conv_backward(i, da, i > 0 ? std::optional<size_t>(i - 1) : std::nullopt,
                                         i > 0 || need_input_grad);
    if (i > 0) {
      g = d;
      mask_y = std::nullopt;  // the next unit's own ReLU
      sums = below_sums;
    } else {
      dx = d;
    }
  }
  // dx and d_sc are the gradients at unit 0's and the projection's conv inputs: pooled where the unit pools
  if (need_input_grad && spec.units[0].avg_pool > 1) {
    dx = avg_pool_grad_add(std::nullopt, dx, xc, spec.units[0].avg_pool);
  }
  at::Tensor d_residual;
  const std::vector<int64_t> option_a_stride(spec.option_a_stride.begin(), spec.option_a_stride.end());
  if (spec.shortcut == Shortcut::kIdentity && need_input_grad) {
    dx = residual_grad(dx, dyc, yc, xc, {});
  } else if (spec.shortcut == Shortcut::kOptionA && need_input_grad) {
    dx = residual_grad(dx, dyc, yc, xc, option_a_stride);
  } else if (spec.shortcut == Shortcut::kTensor) {
    d_residual = residual_grad(std::nullopt, dyc, yc, yc, {});
  } else if (spec.shortcut == Shortcut::kProjection && need_input_grad && spec.units[n_main].avg_pool > 1) {
    dx = avg_pool_grad_add(dx, d_sc, xc, spec.units[n_main].avg_pool);  // unpooled and added in one pass
  } else if (spec.shortcut == Shortcut::kProjection && need_input_grad) {
    dx = at::add(dx, d_sc);
    account::launch("add the projection's gradient", "elementwise", {dx, d_sc}, {dx});
  }
  const auto fmt = format_of(x);
  std::vector<at::Tensor> out{dx.defined() ? in_format(dx, fmt) : x.new_empty({0}),
                              d_residual.defined() ? in_format(d_residual, fmt) : x.new_empty({0})};
  out.insert(out.end(), dws.begin(), dws.end());
  out.insert(out.end(), dgammas.begin(), dgammas.end());
  out.insert(out.end(), dbetas.begin(), dbetas.end());
  return out;
}

}  // namespace fused_resnet
