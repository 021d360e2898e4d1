// Every op of the extension: schemas (namespace fused_resnet_C), argument checks and dispatcher registration.
// Checks live here, compiled by the host compiler; the .cu files hold kernels and their launchers only.
// Every op is registered for CUDA (the kernels) and CPU (the same kernel bodies in host loops, so the CPU test
// suite runs the op logic; not a fast path). Also the Python module object (fused_resnet._C): importing it
// loads this library and registers the ops.
#include "ops.h"

#include <torch/library.h>

#include <Python.h>

#include "account.h"
#include "cudnn_fusion.h"
#include "kernels.h"
#include "spec.h"

namespace fused_resnet {

std::string shape_str(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

bool channels_innermost(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) || (x.dim() == 2 && x.is_contiguous());
}

namespace {

void check_act(const char* op, const char* what, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() || x.is_cpu() || x.is_meta(), op, ": expected ", what, " on a CUDA (or CPU) device, got ",
              x.device());  // meta: the launch account's dry run
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": expected ", what, " in float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(channels_innermost(x), op, ": expected ", what,
              " as a channels_last (NHWC) 4-D or contiguous [M, C] tensor, got sizes ", shape_str(x.sizes()),
              " strides ", shape_str(x.strides()));
}

void check_like(const char* op, const char* what, const at::Tensor& x, const at::Tensor& ref) {
  check_act(op, what, x);
  TORCH_CHECK(x.sizes() == ref.sizes() && x.scalar_type() == ref.scalar_type() && x.device() == ref.device(), op,
              ": expected ", what, " with sizes ", shape_str(ref.sizes()), ", dtype ", ref.scalar_type(), " on ",
              ref.device(), ", got ", shape_str(x.sizes()), ", ", x.scalar_type(), " on ", x.device());
}

void check_vec(const char* op, const char* what, const at::Tensor& v, int64_t C, const at::Device& device) {
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == C && v.is_contiguous() &&
                  v.device() == device,
              op, ": expected ", what, " as a contiguous float32 [", C, "] tensor on ", device, ", got ",
              v.scalar_type(), " ", shape_str(v.sizes()), " on ", v.device());
}

// γ and β: float32, or the low-precision dtype of a bf16 / fp16 model (the kernels read them as float).
void check_param(const char* op, const char* what, const at::Tensor& v, int64_t C, const at::Device& device) {
  const at::ScalarType t = v.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && v.dim() == 1 && v.size(0) == C &&
                  v.is_contiguous() && v.device() == device,
              op, ": expected ", what, " as a contiguous float32, bfloat16 or float16 [", C, "] tensor on ", device,
              ", got ", t, " ", shape_str(v.sizes()), " on ", v.device());
}

// Stochastic depth's per-sample scale d: one value per sample of x (its dim 0), read as float like γ.
void check_sample_scale(const char* op, const at::Tensor& d, const at::Tensor& x) {
  const at::ScalarType t = d.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && d.dim() == 1 && d.size(0) == x.size(0) &&
                  d.is_contiguous() && d.device() == x.device(),
              op, ": expected sample_scale as a contiguous float32, bfloat16 or float16 [", x.size(0),
              "] tensor (one value per sample) on ", x.device(), ", got ", t, " ", shape_str(d.sizes()), " on ",
              d.device());
}

void check_option_a_stride(const char* op, at::IntArrayRef option_a_stride) {
  TORCH_CHECK(option_a_stride.size() == 2 && option_a_stride[0] > 0 && option_a_stride[1] > 0, op,
              ": expected option_a_stride as two positive strides (option A) or empty, got ",
              shape_str(option_a_stride));
}

// Option A maps x [N, C_in, H, W] onto y [N, C, P, Q]: P = ceil(H / s_h), Q = ceil(W / s_w), C_in <= C.
void check_option_a(const char* op, const at::Tensor& x, const at::Tensor& y, at::IntArrayRef option_a_stride) {
  check_option_a_stride(op, option_a_stride);
  TORCH_CHECK(x.dim() == 4 && y.dim() == 4 && x.size(0) == y.size(0) && x.size(1) <= y.size(1) &&
                  (x.size(2) - 1) / option_a_stride[0] + 1 == y.size(2) &&
                  (x.size(3) - 1) / option_a_stride[1] + 1 == y.size(3),
              op, ": option A maps the block input ", shape_str(x.sizes()), " with stride ",
              shape_str(option_a_stride),
              " onto ", shape_str(y.sizes()), ": expected equal batch, spatial sizes ceil(H / s) and C_in <= C");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats(const at::Tensor& a, const at::Tensor& gamma,
                                                                    const at::Tensor& beta, double eps) {
  check_act("bn_stats", "the activations a", a);
  check_param("bn_stats", "gamma", gamma, a.size(1), a.device());
  check_param("bn_stats", "beta", beta, a.size(1), a.device());
  auto out = bn_stats_launch(a, gamma, beta, eps);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_from_sums(const at::Tensor& a,
                                                                              const at::Tensor& sum,
                                                                              const at::Tensor& sq_sum,
                                                                              const at::Tensor& gamma,
                                                                              const at::Tensor& beta, double eps) {
  const char* op = "bn_stats_from_sums";
  check_act(op, "the activations a", a);
  for (auto [what, v] : {std::pair{"sum", &sum}, {"sq_sum", &sq_sum}}) check_vec(op, what, *v, a.size(1), a.device());
  check_param(op, "gamma", gamma, a.size(1), a.device());
  check_param(op, "beta", beta, a.size(1), a.device());
  auto out = bn_stats_from_sums_launch(a, sum, sq_sum, gamma, beta, eps);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps) {
  TORCH_CHECK(mean.dim() == 1, "bn_scale_shift: expected mean as a 1-D [C] tensor, got ", shape_str(mean.sizes()));
  const int64_t C = mean.size(0);
  check_param("bn_scale_shift", "gamma", gamma, C, mean.device());
  check_param("bn_scale_shift", "beta", beta, C, mean.device());
  check_vec("bn_scale_shift", "mean", mean, C, mean.device());
  check_vec("bn_scale_shift", "var", var, C, mean.device());
  auto out = bn_scale_shift_launch(gamma, beta, mean, var, eps);
  return {out[0], out[1], out[2]};
}

void bn_running_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                       const at::Tensor& var, int64_t count, std::optional<double> momentum) {
  const char* op = "bn_running_update";
  TORCH_CHECK(mean.dim() == 1, op, ": expected mean as a 1-D [C] tensor, got ", shape_str(mean.sizes()));
  const int64_t C = mean.size(0);
  check_vec(op, "mean", mean, C, mean.device());
  check_vec(op, "var", var, C, mean.device());
  for (auto [what, r] : {std::pair{"running_mean", &running_mean}, {"running_var", &running_var}}) {
    TORCH_CHECK(r->dim() == 1 && r->size(0) == C && r->is_contiguous() && r->device() == mean.device() &&
                    (r->scalar_type() == at::kFloat || r->scalar_type() == at::kHalf ||
                     r->scalar_type() == at::kBFloat16),
                op, ": expected ", what, " as a contiguous floating [", C, "] tensor on ", mean.device(), ", got ",
                r->scalar_type(), " ", shape_str(r->sizes()), " on ", r->device());
  }
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(), op,
              ": expected running_mean and running_var of one dtype");
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->device() == mean.device(),
                op, ": expected num_batches_tracked as a one-element int64 tensor on ", mean.device());
  }
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value(), op,
              ": momentum=None (cumulative average) needs num_batches_tracked");
  TORCH_CHECK(count > 1, op, ": expected more than 1 value per channel, got count ", count);
  bn_running_update_launch(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
}

at::Tensor bn_act(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu,
                  const std::optional<at::Tensor>& residual_scale, const std::optional<at::Tensor>& residual_shift,
                  at::IntArrayRef option_a_stride, const std::optional<at::Tensor>& sample_scale) {
  const char* op = "bn_act";
  check_act(op, "the activations a", a);
  check_vec(op, "scale", scale, a.size(1), a.device());
  check_vec(op, "shift", shift, a.size(1), a.device());
  TORCH_CHECK(residual_scale.has_value() == residual_shift.has_value(), op,
              ": expected residual_scale and residual_shift together (a projection's BN) or neither");
  if (residual_scale.has_value() || !option_a_stride.empty()) {
    TORCH_CHECK(residual.has_value(), op, ": residual_scale / option_a_stride need a residual");
  }
  TORCH_CHECK(!(residual_scale.has_value() && !option_a_stride.empty()), op,
              ": expected either residual_scale/residual_shift (projection) or option_a_stride (option A), "
              "not both");
  if (residual.has_value()) {
    if (option_a_stride.empty()) {
      check_like(op, "the residual", *residual, a);
    } else {
      check_act(op, "the residual (option A's block input)", *residual);
      TORCH_CHECK(residual->scalar_type() == a.scalar_type() && residual->device() == a.device(), op,
                  ": expected the residual in the activations' dtype and device");
      check_option_a(op, *residual, a, option_a_stride);
    }
    if (residual_scale.has_value()) {
      check_vec(op, "residual_scale", *residual_scale, a.size(1), a.device());
      check_vec(op, "residual_shift", *residual_shift, a.size(1), a.device());
    }
  }
  if (sample_scale.has_value()) {
    check_sample_scale(op, *sample_scale, a);
    TORCH_CHECK(relu, op, ": a sample_scale (stochastic depth) scales a closing, which has its ReLU: expected "
                "relu=True");
  }
  return bn_act_launch(a, scale, shift, residual, residual_scale, residual_shift, option_a_stride, relu,
                       sample_scale);
}

namespace {
void check_dbn_args(const char* op, const at::Tensor& g, const std::optional<at::Tensor>& y, const at::Tensor& a,
                    std::initializer_list<std::pair<const char*, const at::Tensor*>> vectors,
                    const std::optional<at::Tensor>& sample_scale, bool mask) {
  check_act(op, "the pre-BN activations a", a);
  check_like(op, "the gradient g", g, a);
  if (y.has_value()) check_like(op, "the ReLU output y", *y, a);
  for (auto [what, v] : vectors) check_vec(op, what, *v, a.size(1), a.device());
  if (sample_scale.has_value()) {
    check_sample_scale(op, *sample_scale, a);
    TORCH_CHECK(y.has_value(), op, ": a sample_scale (stochastic depth) scales the closing's last BN, whose mask "
                "is [y > 0]: expected y");
  }
  TORCH_CHECK(mask || !y.has_value(), op, ": mask=False (a BN no ReLU follows: an open block's last) takes no y, "
              "whose [y > 0] it would not apply");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> drelu_dbn_reduce(const at::Tensor& g, const std::optional<at::Tensor>& y,
                                                    const at::Tensor& a, const at::Tensor& mean,
                                                    const at::Tensor& rstd, const at::Tensor& scale,
                                                    const at::Tensor& shift,
                                                    const std::optional<at::Tensor>& sample_scale, bool mask) {
  check_dbn_args("drelu_dbn_reduce", g, y, a,
                 {{"mean", &mean}, {"rstd", &rstd}, {"scale", &scale}, {"shift", &shift}}, sample_scale, mask);
  auto out = drelu_dbn_reduce_launch(g, y, a, mean, rstd, scale, shift, sample_scale, mask);
  return {out[0], out[1]};
}

at::Tensor dbn_apply(const at::Tensor& g, const std::optional<at::Tensor>& y, const at::Tensor& a,
                     const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, bool batch_stats,
                     const std::optional<at::Tensor>& sample_scale, bool mask) {
  check_dbn_args("dbn_apply", g, y, a,
                 {{"mean", &mean}, {"rstd", &rstd}, {"scale", &scale}, {"shift", &shift}, {"sum_dz", &sum_dz},
                  {"sum_dz_xhat", &sum_dz_xhat}},
                 sample_scale, mask);
  return dbn_apply_launch(g, y, a, mean, rstd, scale, shift, sum_dz, sum_dz_xhat, batch_stats, sample_scale, mask);
}

at::Tensor residual_grad(const std::optional<at::Tensor>& d_main, const at::Tensor& dy, const at::Tensor& y,
                         const at::Tensor& like, at::IntArrayRef option_a_stride) {
  const char* op = "residual_grad";
  check_act(op, "dy", dy);
  check_like(op, "the block output y", y, dy);
  check_act(op, "the input-shaped tensor `like`", like);
  TORCH_CHECK(like.scalar_type() == dy.scalar_type() && like.device() == dy.device(), op,
              ": expected `like` in dy's dtype and device");
  if (option_a_stride.empty()) {
    TORCH_CHECK(like.sizes() == dy.sizes(), op, ": an identity shortcut needs the input's sizes ",
                shape_str(like.sizes()), " to equal the output's ", shape_str(dy.sizes()));
  } else {
    check_option_a(op, like, dy, option_a_stride);
  }
  if (d_main.has_value()) check_like(op, "d_main", *d_main, like);
  return residual_grad_launch(d_main, dy, y, like, option_a_stride);
}

namespace {
void check_pool(const char* op, const at::Tensor& x, int64_t k) {
  check_act(op, "the pooled input", x);
  TORCH_CHECK(x.dim() == 4, op, ": expected the pooled input as a 4-D [N, C, H, W] tensor, got sizes ",
              shape_str(x.sizes()));
  TORCH_CHECK(k >= 1, op, ": expected a pool size k >= 1, got ", k);
}
}  // namespace

at::Tensor avg_pool(const at::Tensor& x, int64_t k) {
  check_pool("avg_pool", x, k);
  return avg_pool_launch(x, k);
}

at::Tensor avg_pool_grad_add(const std::optional<at::Tensor>& d_main, const at::Tensor& d_pooled,
                             const at::Tensor& like, int64_t k) {
  const char* op = "avg_pool_grad_add";
  check_pool(op, like, k);
  check_act(op, "d_pooled", d_pooled);
  const std::vector<int64_t> pooled{like.size(0), like.size(1), pooled_size(like.size(2), k),
                                    pooled_size(like.size(3), k)};
  TORCH_CHECK(d_pooled.sizes() == at::IntArrayRef(pooled) && d_pooled.scalar_type() == like.scalar_type() &&
                  d_pooled.device() == like.device(),
              op, ": expected d_pooled with sizes ", shape_str(pooled), " (the pool of ", shape_str(like.sizes()),
              " with k = ", k, "), dtype ", like.scalar_type(), " on ", like.device(), ", got ",
              shape_str(d_pooled.sizes()), ", ", d_pooled.scalar_type(), " on ", d_pooled.device());
  if (d_main.has_value()) check_like(op, "d_main", *d_main, like);
  return avg_pool_grad_add_launch(d_main, d_pooled, like, k);
}

// ------------------------------------------------------------------ the launch account (account.h)
namespace {

std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>,
           std::vector<int64_t>>
account_take() {
  std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>,
             std::vector<int64_t>> out;
  for (const account::Record& r : account::take()) {
    std::get<0>(out).push_back(r.name);
    std::get<1>(out).push_back(r.kind);
    std::get<2>(out).push_back(r.reads);
    std::get<3>(out).push_back(r.writes);
    std::get<4>(out).push_back(r.flops);
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------ cuDNN fusion graphs (cudnn_fusion.h)
namespace {

fusion::Graph graph_named(const std::string& name) {
  for (int g = 0; g < fusion::kGraphs; ++g) {
    if (name == fusion::graph_name(static_cast<fusion::Graph>(g))) return static_cast<fusion::Graph>(g);
  }
  TORCH_CHECK_VALUE(false, "unknown fusion graph '", name, "' (fprop, dgrad or wgrad)");
}

// A request given as schema arguments (the checks' ops name one graph by its parts).
fusion::Request request_of(const char* op, const std::string& graph, int64_t features, at::IntArrayRef x_sizes,
                           at::IntArrayRef w_sizes, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, at::ScalarType dtype, bool deterministic = false) {
  TORCH_CHECK_VALUE(x_sizes.size() == 4 && w_sizes.size() == 4, op, ": expected [N, C, H, W] and [K, C, R, S] "
                    "sizes, got ", shape_str(x_sizes), " and ", shape_str(w_sizes));
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": expected two strides, paddings and dilations");
  const UnitSpec u{{stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]}, 1, true, 1e-5, 0, 1};
  return {graph_named(graph), features, x_sizes.vec(), w_sizes.vec(), u, dtype, deterministic};
}

std::string fusion_info() { return fusion::built() ? "built (" + fusion::build_info() + ")" : fusion::build_info(); }

void fusion_set_refused(const std::string& graph, const std::string& at) {
  TORCH_CHECK_VALUE(at == "" || at == "build" || at == "execute", "fusion_set_refused: expected at = '' (none), "
                    "'build' or 'execute', got '", at, "'");
  fusion::set_refused(graph_named(graph), at == "build"     ? fusion::Refusal::kAtBuild
                                          : at == "execute" ? fusion::Refusal::kAtExecute
                                                            : fusion::Refusal::kNone);
}

bool fusion_set_cpu_twins(bool on) { return fusion::set_cpu_twins(on); }

int64_t fusion_set_capacity(int64_t keys) { return fusion::set_capacity(keys); }

std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
           std::vector<double>>
fusion_tallies() {
  std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
             std::vector<double>> out;
  for (const auto& [label, t] : fusion::tallies()) {
    std::get<0>(out).push_back(label);
    std::get<1>(out).push_back(t.fused);
    std::get<2>(out).push_back(t.fallback);
    std::get<3>(out).push_back(t.built);
    std::get<4>(out).push_back(t.build_ms);
  }
  return out;
}

std::tuple<std::vector<std::string>, std::vector<std::string>> fusion_unsupported() {
  std::tuple<std::vector<std::string>, std::vector<std::string>> out;
  for (const auto& [k, why] : fusion::unsupported()) {
    std::get<0>(out).push_back(k);
    std::get<1>(out).push_back(why);
  }
  return out;
}

void fusion_reset() { fusion::reset(); }

std::string fusion_key(const std::string& graph, int64_t features, at::IntArrayRef x_sizes, at::IntArrayRef w_sizes,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       at::ScalarType dtype, const std::string& device, bool deterministic) {
  return fusion::key(
      request_of("fusion_key", graph, features, x_sizes, w_sizes, stride, padding, dilation, dtype, deterministic),
      at::Device(device));
}

std::tuple<std::string, std::string> fusion_validate(const std::string& graph, int64_t features,
                                                     at::IntArrayRef x_sizes, at::IntArrayRef w_sizes,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, at::ScalarType dtype) {
  return fusion::validate(
      request_of("fusion_validate", graph, features, x_sizes, w_sizes, stride, padding, dilation, dtype));
}

std::string fusion_device_properties() { return fusion::device_properties(); }

std::tuple<std::string, std::string> fusion_support(const std::string& device_properties, const std::string& graph,
                                                    int64_t features, at::IntArrayRef x_sizes,
                                                    at::IntArrayRef w_sizes, at::IntArrayRef stride,
                                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                                    at::ScalarType dtype, bool deterministic, bool compile) {
  return fusion::support(device_properties,
                         request_of("fusion_support", graph, features, x_sizes, w_sizes, stride, padding, dilation,
                                    dtype, deterministic),
                         compile);
}

// Per unit of a block: "" when its convs may run fusion graphs for this input, else why not.
std::vector<std::string> fusion_plan(const at::Tensor& x, at::TensorList weights, at::IntArrayRef spec_ints,
                                     at::ArrayRef<double> spec_floats, bool graphs) {
  const BlockSpec spec = BlockSpec::parse("fusion_plan", spec_ints, spec_floats);
  TORCH_CHECK(weights.size() == spec.units.size(), "fusion_plan: expected one weight per unit (",
              spec.units.size(), "), got ", weights.size());
  std::vector<std::string> out;
  for (size_t i = 0; i < spec.units.size(); ++i) {
    out.push_back(fusion::ineligible(x, weights[i], spec.units[i], graphs).value_or(""));
  }
  return out;
}

std::vector<fusion::Request> requests_of(const char* op, const at::Tensor& x, at::TensorList weights,
                                         at::IntArrayRef spec_ints, at::ArrayRef<double> spec_floats, bool graphs,
                                         bool train) {
  return fusion::block_requests(BlockSpec::parse(op, spec_ints, spec_floats), x, weights, graphs, train);
}

// A block's requests as parallel lists: graph names, features, the asking unit's index, the key on x's device,
// and 14 sizes per request: x (4), w (4), stride, padding, dilation (2 each).
std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>, std::vector<std::string>,
           std::vector<int64_t>>
fusion_requests(const at::Tensor& x, at::TensorList weights, at::IntArrayRef spec_ints,
                at::ArrayRef<double> spec_floats, bool graphs, bool train) {
  std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>, std::vector<std::string>,
             std::vector<int64_t>> out;
  for (const fusion::Request& r : requests_of("fusion_requests", x, weights, spec_ints, spec_floats, graphs, train)) {
    std::get<0>(out).push_back(fusion::graph_name(r.graph));
    std::get<1>(out).push_back(r.features);
    std::get<2>(out).push_back(r.unit_index);
    std::get<3>(out).push_back(fusion::key_on(r, x));
    auto& sizes = std::get<4>(out);
    sizes.insert(sizes.end(), r.x.begin(), r.x.end());
    sizes.insert(sizes.end(), r.w.begin(), r.w.end());
    for (const auto& geometry : {r.unit.stride, r.unit.padding, r.unit.dilation}) {
      sizes.insert(sizes.end(), geometry.begin(), geometry.end());
    }
  }
  return out;
}

std::vector<std::string> fusion_prepare(const at::Tensor& x, at::TensorList weights, at::IntArrayRef spec_ints,
                                        at::ArrayRef<double> spec_floats, bool graphs, bool train) {
  return fusion::prepare(requests_of("fusion_prepare", x, weights, spec_ints, spec_floats, graphs, train), x);
}

std::vector<std::string> fusion_missing(const at::Tensor& x, at::TensorList weights, at::IntArrayRef spec_ints,
                                        at::ArrayRef<double> spec_floats, bool graphs, bool train) {
  return fusion::missing(requests_of("fusion_missing", x, weights, spec_ints, spec_floats, graphs, train), x);
}

}  // namespace

TORCH_LIBRARY(fused_resnet_C, m) {
  m.def("bn_stats(Tensor a, Tensor gamma, Tensor beta, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_stats_from_sums(Tensor a, Tensor sum, Tensor sq_sum, Tensor gamma, Tensor beta, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_scale_shift(Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bn_running_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor mean, Tensor var, int count, float? momentum) -> ()");
  m.def("bn_act(Tensor a, Tensor scale, Tensor shift, Tensor? residual, bool relu, Tensor? residual_scale=None, "
        "Tensor? residual_shift=None, int[] option_a_stride=[], Tensor? sample_scale=None) -> Tensor");
  // mask=False: dz = g, no ReLU after the BN (an open block's last unit)
  m.def("drelu_dbn_reduce(Tensor g, Tensor? y, Tensor a, Tensor mean, Tensor rstd, Tensor scale, Tensor shift, "
        "Tensor? sample_scale=None, bool mask=True) -> (Tensor, Tensor)");
  m.def("dbn_apply(Tensor g, Tensor? y, Tensor a, Tensor mean, Tensor rstd, Tensor scale, Tensor shift, "
        "Tensor sum_dz, Tensor sum_dz_xhat, bool batch_stats, Tensor? sample_scale=None, bool mask=True) -> Tensor");
  m.def("residual_grad(Tensor? d_main, Tensor dy, Tensor y, Tensor like, int[] option_a_stride) -> Tensor");
  m.def("avg_pool(Tensor x, int k) -> Tensor");
  m.def("avg_pool_grad_add(Tensor? d_main, Tensor d_pooled, Tensor like, int k) -> Tensor");
  // The block ops' inputs are fused_resnet.tensors.FORWARD_INPUTS / BACKWARD_INPUTS (tests check the names), then
  // graphs, in the training ops stochastic depth's sample_scale, and backward's counts: the trailing arguments in
  // the fused_resnet:: ops' order (fused_resnet.tensors.block_autograd passes them on as the forward got them).
  // The forward's sample_scale has no default, as in fused_resnet::block_forward: torch 2.11's autograd checks
  // the backward's results against the inputs as passed, a defaulted one left out.
  // Each also exists as <name>_account: the same function as a catch-all kernel, so that meta tensors reach it
  // (the op itself sends them to its fake) — the launch account's dry run (account.h).
  const std::vector<std::pair<std::string, std::string>> block_ops{
      {"block_forward", "(Tensor x, Tensor[] weights, Tensor[] gammas, Tensor[] betas, Tensor?[] running_means, "
                        "Tensor?[] running_vars, Tensor? residual, int[] spec, float[] spec_floats, bool graphs, "
                        "Tensor? sample_scale) -> Tensor[]"},
      {"block_inference", "(Tensor x, Tensor[] weights, Tensor[] gammas, Tensor[] betas, Tensor[] running_means, "
                          "Tensor[] running_vars, Tensor? residual, int[] spec, float[] spec_floats, bool graphs) "
                          "-> Tensor"},
      {"block_inference_folded", "(Tensor x, Tensor[] weights, Tensor[] shifts, Tensor? residual, int[] spec, "
                                 "float[] spec_floats, bool graphs) -> Tensor"},
      {"block_backward", "(Tensor dy, Tensor x, Tensor y, Tensor[] weights, Tensor[] gammas, Tensor[] betas, "
                         "Tensor[] acts, Tensor[] means, Tensor[] variances, int[] spec, float[] spec_floats, "
                         "bool need_input_grad, bool graphs, Tensor? sample_scale=None, Tensor? counts=None) "
                         "-> Tensor[]"},
  };
  for (const auto& [name, args] : block_ops) m.def((name + args).c_str());
  m.def(("block_forward_account" + block_ops[0].second).c_str(), &block_forward);
  m.def(("block_inference_account" + block_ops[1].second).c_str(), &block_inference);
  m.def(("block_inference_folded_account" + block_ops[2].second).c_str(), &block_inference_folded);
  m.def(("block_backward_account" + block_ops[3].second).c_str(), &block_backward);
  m.def("bn_running_update_account(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? "
        "num_batches_tracked, Tensor mean, Tensor var, int count, float? momentum) -> ()", &bn_running_update);
  m.def("account_take() -> (str[], str[], int[], int[], int[])", &account_take);
  m.def("account_set_recording(bool on) -> bool", &account::set_recording);
  // cuDNN fusion graphs: state and checks of cudnn_fusion.cpp (no tensors computed)
  m.def("fusion_info() -> str", &fusion_info);
  m.def("fusion_set_refused(str graph, str at) -> ()", &fusion_set_refused);
  m.def("fusion_set_cpu_twins(bool on) -> bool", &fusion_set_cpu_twins);
  m.def("fusion_set_capacity(int keys) -> int", &fusion_set_capacity);
  m.def("fusion_tallies() -> (str[], int[], int[], int[], float[])", &fusion_tallies);
  m.def("fusion_unsupported() -> (str[], str[])", &fusion_unsupported);
  m.def("fusion_reset() -> ()", &fusion_reset);
  m.def("fusion_key(str graph, int features, int[] x_sizes, int[] w_sizes, int[] stride, int[] padding, "
        "int[] dilation, ScalarType dtype, str device, bool deterministic) -> str", &fusion_key);
  m.def("fusion_validate(str graph, int features, int[] x_sizes, int[] w_sizes, int[] stride, int[] padding, "
        "int[] dilation, ScalarType dtype) -> (str, str)", &fusion_validate);
  m.def("fusion_device_properties() -> str", &fusion_device_properties);
  m.def("fusion_support(str device_properties, str graph, int features, int[] x_sizes, int[] w_sizes, "
        "int[] stride, int[] padding, int[] dilation, ScalarType dtype, bool deterministic, bool compile) "
        "-> (str, str)", &fusion_support);
  m.def("fusion_plan(Tensor x, Tensor[] weights, int[] spec, float[] spec_floats, bool graphs) -> str[]",
        &fusion_plan);
  // a block's graphs (block_requests): listed, built ahead (never inside a capture), or those not built yet
  m.def("fusion_requests(Tensor x, Tensor[] weights, int[] spec, float[] spec_floats, bool graphs, bool train) "
        "-> (str[], int[], int[], str[], int[])", &fusion_requests);
  m.def("fusion_prepare(Tensor x, Tensor[] weights, int[] spec, float[] spec_floats, bool graphs, bool train) "
        "-> str[]", &fusion_prepare);
  m.def("fusion_missing(Tensor x, Tensor[] weights, int[] spec, float[] spec_floats, bool graphs, bool train) "
        "-> str[]", &fusion_missing);
}

#define FR_IMPL_ALL(m)                                       \
  m.impl("bn_stats", &bn_stats);                             \
  m.impl("bn_stats_from_sums", &bn_stats_from_sums);         \
  m.impl("bn_scale_shift", &bn_scale_shift);                 \
  m.impl("bn_running_update", &bn_running_update);           \
  m.impl("bn_act", &bn_act);                                 \
  m.impl("drelu_dbn_reduce", &drelu_dbn_reduce);             \
  m.impl("dbn_apply", &dbn_apply);                           \
  m.impl("residual_grad", &residual_grad);                   \
  m.impl("avg_pool", &avg_pool);                             \
  m.impl("avg_pool_grad_add", &avg_pool_grad_add);           \
  m.impl("block_forward", &block_forward);                   \
  m.impl("block_inference", &block_inference);               \
  m.impl("block_inference_folded", &block_inference_folded); \
  m.impl("block_backward", &block_backward)

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) { FR_IMPL_ALL(m); }
TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) { FR_IMPL_ALL(m); }

}  // namespace fused_resnet

#define FR_STR2(x) #x
#define FR_STR(x) FR_STR2(x)
#define FR_CAT2(a, b) a##b
#define FR_CAT(a, b) FR_CAT2(a, b)

static PyModuleDef fused_resnet_module = {PyModuleDef_HEAD_INIT, FR_STR(TORCH_EXTENSION_NAME),
                                          "fused_resnet CUDA kernels (ops under torch.ops.fused_resnet_C)", -1,
                                          nullptr};

PyMODINIT_FUNC FR_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fused_resnet_module); }
