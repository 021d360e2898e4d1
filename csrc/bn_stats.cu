// BN statistics, finalize and running-statistics update (twin of fused_resnet.reference.bn_stats /
// scale_shift / bn_running_update). fp32 math throughout; see common.cuh for how a kernel runs on GPU and CPU.
#include <cmath>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace fused_resnet {
namespace {

// Welford accumulator of VEC channels that see the same rows (one count), on shifted data: every value has the
// channel's first value (row 0) subtracted first, so the running mean stays near zero and keeps its precision
// when |mean| >> std (the shift is one per channel, shared by every thread, so partials merge as they are).
template <int VEC>
struct WelfordAcc {
  float n = 0.f;
  float mean[VEC] = {};
  float m2[VEC] = {};
  float shift[VEC] = {};

  C10_HOST_DEVICE void add(const float (&x)[VEC]) {
    n += 1.f;
    const float inv = 1.f / n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = (x[k] - shift[k]) - mean[k];
      mean[k] += d * inv;
      m2[k] += d * ((x[k] - shift[k]) - mean[k]);
    }
  }

  C10_HOST_DEVICE void merge(const WelfordAcc& o) {
    float total = n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      total = n;
      chan_merge(total, mean[k], m2[k], o.n, o.mean[k], o.m2[k]);
    }
    n = total;
  }
};

// Partial pass: per (part, channel) count / mean / M2 into [parts, C] fp32 buffers.
template <typename T, int VEC>
struct StatsPartialOp {
  using Acc = WelfordAcc<VEC>;
  const T* a;
  int64_t C;
  float* p_count;
  float* p_mean;
  float* p_m2;

  C10_HOST_DEVICE void init(Acc& acc, int64_t group) const { load_floats<T, VEC>(a, group * VEC, acc.shift); }
  C10_HOST_DEVICE void accumulate(Acc& acc, int64_t row, int64_t group) const {
    float x[VEC];
    load_floats<T, VEC>(a, row * C + group * VEC, x);
    acc.add(x);
  }
  C10_HOST_DEVICE void store(const Acc& acc, int64_t part, int64_t group) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t idx = part * C + group * VEC + k;
      p_count[idx] = acc.n;
      p_mean[idx] = acc.mean[k];
      p_m2[idx] = acc.m2[k];
    }
  }
};

// Finalize, one channel per index: merge the parts in order, undo the shift, then mean, biased var, s, t.
template <typename T>
struct StatsFinalizeOp {
  const T* a;  // row 0 holds the shift
  const float* p_count;
  const float* p_mean;
  const float* p_m2;
  ChannelParam gamma;
  ChannelParam beta;
  int64_t parts;
  int64_t C;
  float eps;
  float* mean;
  float* var;
  float* scale;
  float* shift;

  C10_HOST_DEVICE void operator()(int64_t c) const {
    float n = 0.f, m = 0.f, m2 = 0.f;
    for (int64_t p = 0; p < parts; ++p) chan_merge(n, m, m2, p_count[p * C + c], p_mean[p * C + c], p_m2[p * C + c]);
    const float v = n > 0.f ? m2 / n : std::numeric_limits<float>::quiet_NaN();
    m = n > 0.f ? m + static_cast<float>(a[c]) : std::numeric_limits<float>::quiet_NaN();
    float s, t, rstd;
    scale_shift(gamma[c], beta[c], m, v, eps, s, t, rstd);
    mean[c] = m;
    var[c] = v;
    scale[c] = s;
    shift[c] = t;
  }
};

// Statistics from per-channel sums a conv epilogue produced (cuDNN's reductions, fp32): mean = Σ/M and
// var = Σx²/M − mean². The difference cancels as mean²/var grows (relative error ≈ fp32 eps · (1 + mean²/var)):
// a channel past kCancellation, or with var ≤ 0, needs the exact shifted Welford statistics of bn_stats instead,
// computed on those channels' lanes only (the others skip every row). Without sums (sum == nullptr) every channel
// takes Welford's (bn_stats itself). The decision is recomputed from the sums on the device wherever it is
// needed: no flag buffer, no launch of its own.
constexpr float kCancellation = 16.f;

struct FromSums {
  const float* sum = nullptr;
  const float* sq_sum = nullptr;
  float count = 0.f;

  C10_HOST_DEVICE void stats(int64_t c, float& m, float& v) const {
    m = sum[c] / count;
    v = sq_sum[c] / count - m * m;
  }
  C10_HOST_DEVICE bool needs_exact(int64_t c) const {
    if (sum == nullptr) return true;
    float m, v;
    stats(c, m, v);
    return !(v > 0.f) || !(m * m <= kCancellation * v);  // NaN-safe
  }
};

template <int VEC>
struct GatedAcc : WelfordAcc<VEC> {
  bool active = false;
};

// The Welford pass on the channels that need it.
template <typename T, int VEC>
struct FlaggedStatsPartialOp {
  using Acc = GatedAcc<VEC>;
  StatsPartialOp<T, VEC> exact;
  FromSums sums;

  C10_HOST_DEVICE void init(Acc& acc, int64_t group) const {
    acc.active = false;
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc.active = acc.active || sums.needs_exact(group * VEC + k);
    if (acc.active) exact.init(acc, group);
  }
  C10_HOST_DEVICE void accumulate(Acc& acc, int64_t row, int64_t group) const {
    if (acc.active) exact.accumulate(acc, row, group);
  }
  C10_HOST_DEVICE void store(const Acc& acc, int64_t part, int64_t group) const { exact.store(acc, part, group); }
};

// mean, var, s, t per channel: Welford's merged partials where needed, else from the sums.
template <typename T>
struct FlaggedFinalizeOp {
  StatsFinalizeOp<T> exact;
  FromSums sums;

  C10_HOST_DEVICE void operator()(int64_t c) const {
    if (sums.needs_exact(c)) {
      exact(c);
      return;
    }
    float m, v, s, t, rstd;
    sums.stats(c, m, v);
    scale_shift(exact.gamma[c], exact.beta[c], m, v, exact.eps, s, t, rstd);
    exact.mean[c] = m;
    exact.var[c] = v;
    exact.scale[c] = s;
    exact.shift[c] = t;
  }
};

struct ScaleShiftOp {
  ChannelParam gamma;
  ChannelParam beta;
  const float* mean;
  const float* var;
  float eps;
  float* scale;
  float* shift;
  float* rstd;

  C10_HOST_DEVICE void operator()(int64_t c) const {
    scale_shift(gamma[c], beta[c], mean[c], var[c], eps, scale[c], shift[c], rstd[c]);
  }
};

// Products and sums rounded one at a time (no fused multiply-add), as torch's separate ops round them.
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

template <typename RT>
struct RunningUpdateOp {
  RT* running_mean;
  RT* running_var;
  const int64_t* num_batches_tracked;  // read when cumulative (already incremented); else nullptr
  int64_t* increment;                  // num_batches_tracked, incremented here by channel 0; else nullptr
  const float* mean;
  const float* var;
  float keep;      // 1 − momentum
  float take;      // momentum
  float unbiased;  // count / (count − 1)

  C10_HOST_DEVICE void operator()(int64_t c) const {
    float k = keep, f = take;
    if (num_batches_tracked != nullptr) {  // momentum=None: factor 1/num_batches_tracked, in fp32 as torch
      f = 1.f / static_cast<float>(*num_batches_tracked);
      k = 1.f - f;
    }
    const float rm = static_cast<float>(running_mean[c]);
    const float rv = static_cast<float>(running_var[c]);
    running_mean[c] = static_cast<RT>(add_rn(mul_rn(rm, k), mul_rn(mean[c], f)));
    running_var[c] = static_cast<RT>(add_rn(mul_rn(rv, k), mul_rn(mul_rn(var[c], unbiased), f)));
    if (increment != nullptr && c == 0) *increment += 1;
  }
};

template <int V>
using Vec = std::integral_constant<int, V>;

// mean, var, scale, shift: by the shifted Welford pass over a for the channels that need it (all, without
// sums), from the sums for the others. `sums`: the sum and sq_sum tensors, or undefined.
void welford_stats(const at::Tensor& a, const at::Tensor& gamma, const at::Tensor& beta, double eps,
                   const at::Tensor& sum, const at::Tensor& sq_sum, const std::vector<at::Tensor>& out) {
  const Runs runs = runs_on(a);
  const int64_t rows = a.size(1) == 0 ? 0 : a.numel() / a.size(1);
  const FromSums from_sums = sum.defined() ? FromSums{read_ptr<float>(sum), read_ptr<float>(sq_sum),
                                                      static_cast<float>(rows)}
                                           : FromSums{};
  const int64_t C = a.size(1), M = a.numel() / C;
  FR_DISPATCH_FLOATING(a.scalar_type(), "bn_stats", [&] {
    auto run = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int64_t groups = C / V;
      const ReduceGeometry geo = reduce_geometry(M, groups, runs);
      at::Tensor partials = at::empty({3, geo.parts, C}, out[0].options());
      float* pc = write_ptr<float>(partials[0]);
      float* pm = write_ptr<float>(partials[1]);
      float* p2 = write_ptr<float>(partials[2]);
      const auto* data = read_ptr<scalar_t>(a);
      reduce_partials(FlaggedStatsPartialOp<scalar_t, V>{{data, C, pc, pm, p2}, from_sums}, M, groups, runs, geo);
      // with sums, only the channels that need Welford's read a (the account counts none: that is the data's)
      account::launch(sum.defined() ? "bn_stats exact partials" : "bn_stats partials", "reduction",
                      {sum.defined() ? sum : a, sq_sum}, {partials});
      const StatsFinalizeOp<scalar_t> exact{data, pc, pm, p2, param_ptr(gamma),
                                            param_ptr(beta), geo.parts, C, static_cast<float>(eps),
                                            write_ptr<float>(out[0]), write_ptr<float>(out[1]),
                                            write_ptr<float>(out[2]), write_ptr<float>(out[3])};
      for_each_index(FlaggedFinalizeOp<scalar_t>{exact, from_sums}, C, runs);
      account::launch("bn_stats finalize", "elementwise", {partials, gamma, beta, sum, sq_sum},
                      {out[0], out[1], out[2], out[3]});
    };
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>(C, {read_ptr<scalar_t>(a)}) == VEC) run(Vec<VEC>{}); else run(Vec<1>{});
  });
}

// {mean, var, scale, shift}, fp32 [C]; NaN when a has no values (as torch.var_mean of an empty tensor)
std::vector<at::Tensor> stats_outputs(const at::Tensor& a) {
  const auto f32 = a.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> out;
  for (int k = 0; k < 4; ++k) out.push_back(at::empty({a.size(1)}, f32));
  if (a.numel() == 0) {
    for (auto& v : out) v.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace

std::vector<at::Tensor> bn_stats_launch(const at::Tensor& a, const at::Tensor& gamma, const at::Tensor& beta,
                                        double eps) {
  const c10::OptionalDeviceGuard guard(a.device());
  std::vector<at::Tensor> out = stats_outputs(a);
  if (a.numel() != 0) welford_stats(a, gamma, beta, eps, at::Tensor(), at::Tensor(), out);
  return out;
}

std::vector<at::Tensor> bn_stats_from_sums_launch(const at::Tensor& a, const at::Tensor& sum, const at::Tensor& sq_sum,
                                                  const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const c10::OptionalDeviceGuard guard(a.device());
  std::vector<at::Tensor> out = stats_outputs(a);
  if (a.numel() != 0) welford_stats(a, gamma, beta, eps, sum, sq_sum, out);
  return out;
}

std::vector<at::Tensor> bn_scale_shift_launch(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                              const at::Tensor& var, double eps) {
  const c10::OptionalDeviceGuard guard(mean.device());
  at::Tensor scale = at::empty_like(mean), shift = at::empty_like(mean), rstd = at::empty_like(mean);
  for_each_index(ScaleShiftOp{param_ptr(gamma), param_ptr(beta), read_ptr<float>(mean),
                              read_ptr<float>(var), static_cast<float>(eps), write_ptr<float>(scale),
                              write_ptr<float>(shift), write_ptr<float>(rstd)},
                 mean.numel(), runs_on(mean));
  account::launch("bn_scale_shift", "elementwise", {gamma, beta, mean, var}, {scale, shift, rstd});
  return {scale, shift, rstd};
}

void bn_running_update_launch(const at::Tensor& running_mean, const at::Tensor& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                              const at::Tensor& var, int64_t count, std::optional<double> momentum) {
  const c10::OptionalDeviceGuard guard(mean.device());
  // With a momentum the count is not read here: channel 0 increments it in the same kernel. Cumulative averaging
  // reads it in every channel, incremented first: its own launch (one kernel could not order them across blocks).
  const bool separate = num_batches_tracked.has_value() && (!momentum.has_value() || mean.numel() == 0);
  if (separate) {
    num_batches_tracked->add_(1);
    account::launch("num_batches_tracked += 1", "elementwise", {*num_batches_tracked}, {*num_batches_tracked});
  }
  int64_t* increment = num_batches_tracked.has_value() && !separate ? write_ptr<int64_t>(*num_batches_tracked)
                                                                     : nullptr;
  const int64_t* nbt = momentum.has_value() ? nullptr : read_ptr<int64_t>(*num_batches_tracked);
  const double m = momentum.value_or(0.0);
  const float unbiased = static_cast<float>(static_cast<double>(count) / static_cast<double>(count - 1));
  FR_DISPATCH_FLOATING(running_mean.scalar_type(), "bn_running_update", [&] {
    for_each_index(RunningUpdateOp<scalar_t>{write_ptr<scalar_t>(running_mean), write_ptr<scalar_t>(running_var), nbt,
                                             increment, read_ptr<float>(mean), read_ptr<float>(var),
                                             static_cast<float>(1.0 - m), static_cast<float>(m), unbiased},
                   mean.numel(), runs_on(mean));
  });
  account::launch("bn_running_update", "elementwise", {running_mean, running_var, mean, var},
                  {running_mean, running_var, increment != nullptr ? *num_batches_tracked : at::Tensor()});
}

}  // namespace fused_resnet
