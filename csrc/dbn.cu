// BN backward on channels-innermost tensors, fp32 math (twin of fused_resnet.reference.drelu_dbn_reduce /
// dbn_apply / shortcut_pad_backward):
//
//   drelu_dbn_reduce   dz = g·mask(·d);  Σdz, Σdz·x̂ per channel      (dz is never written)
//   dbn_apply          da = s·(dz − Σdz/M − x̂·Σdz·x̂/M)  or  s·dz    (the dReLU recomputed, fused in)
//   residual_grad      the shortcut's gradient: d_main + dz (identity) or + option A's gradient
//
// mask = [y > 0] for the block's closing ReLU (y is stored), [a·s + t > 0] for a ReLU inside the block (the
// BN's own output, recomputed from its pre-BN input a), or none for a BN with no ReLU after it (an open block's
// last: y = bn(a_last)). d: stochastic depth's per-sample scale of the closing's last BN (its output was scaled
// by d before the shortcut joined, so its gradient is d·dz); the shortcut's gradient is unscaled.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace fused_resnet {
namespace {

template <int V>
using Vec = std::integral_constant<int, V>;

template <int VEC>
struct SumAcc {
  float dz[VEC] = {};
  float dz_centered[VEC] = {};  // Σdz·(a − mean); × rstd at finalize

  C10_HOST_DEVICE void merge(const SumAcc& o) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dz[k] += o.dz[k];
      dz_centered[k] += o.dz_centered[k];
    }
  }
};

// Where dz's mask comes from: a compile-time choice, so an unmasked kernel does no mask loads or compares.
enum Mask : int { kMaskBn = 0, kMaskY = 1, kMaskNone = 2 };

// dz for VEC channels starting at c0 of element offset e (a vector never straddles two pixels, so one sample).
template <typename T, int VEC, int MASK, bool SCALED>
C10_HOST_DEVICE inline void masked_grad(const T* g, const T* y, const float* s, const float* t, const float (&a)[VEC],
                                        const SampleScale& d, int64_t e, int64_t c0, float (&dz)[VEC]) {
  load_floats<T, VEC>(g, e, dz);
  float yv[VEC];
  if constexpr (MASK == kMaskY) load_floats<T, VEC>(y, e, yv);
  float dn = 1.f;
  if constexpr (SCALED) dn = d.at(e);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    bool on = true;
    if constexpr (MASK == kMaskY) on = yv[k] > 0.f;
    if constexpr (MASK == kMaskBn) on = affine(a[k], s[c0 + k], t[c0 + k]) > 0.f;
    dz[k] = on ? (SCALED ? dz[k] * dn : dz[k]) : 0.f;
  }
}

template <int M>
using MaskOf = std::integral_constant<int, M>;

template <typename T, int VEC, int MASK, bool SCALED>
struct DreluReduceOp {
  using Acc = SumAcc<VEC>;
  const T* g;
  const T* y;
  const T* a;
  const float* mean;
  const float* s;
  const float* t;
  SampleScale d;
  int64_t C;
  float* p_dz;
  float* p_dz_centered;

  C10_HOST_DEVICE void init(Acc&, int64_t) const {}
  C10_HOST_DEVICE void accumulate(Acc& acc, int64_t row, int64_t group) const {
    const int64_t c0 = group * VEC, e = row * C + c0;
    float av[VEC], dz[VEC];
    load_floats<T, VEC>(a, e, av);
    masked_grad<T, VEC, MASK, SCALED>(g, y, s, t, av, d, e, c0, dz);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc.dz[k] += dz[k];
      acc.dz_centered[k] += dz[k] * (av[k] - mean[c0 + k]);
    }
  }
  C10_HOST_DEVICE void store(const Acc& acc, int64_t part, int64_t group) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      p_dz[part * C + group * VEC + k] = acc.dz[k];
      p_dz_centered[part * C + group * VEC + k] = acc.dz_centered[k];
    }
  }
};

struct DreluFinalizeOp {
  const float* p_dz;
  const float* p_dz_centered;
  const float* rstd;
  int64_t parts;
  int64_t C;
  float* sum_dz;
  float* sum_dz_xhat;

  C10_HOST_DEVICE void operator()(int64_t c) const {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      s1 += p_dz[p * C + c];
      s2 += p_dz_centered[p * C + c];
    }
    sum_dz[c] = s1;
    sum_dz_xhat[c] = s2 * rstd[c];
  }
};

template <typename T, int VEC, int MASK, bool BATCH, bool SCALED>
struct DbnApplyOp {
  const T* g;
  const T* y;
  const T* a;
  const float* mean;
  const float* rstd;
  const float* s;
  const float* t;
  SampleScale d;
  const float* sum_dz;
  const float* sum_dz_xhat;
  float count;
  T* da;
  int64_t C;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t e = i * VEC, c0 = e % C;
    float av[VEC], dz[VEC];
    load_floats<T, VEC>(a, e, av);
    masked_grad<T, VEC, MASK, SCALED>(g, y, s, t, av, d, e, c0, dz);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = c0 + k;
      if constexpr (BATCH) {
        const float xhat = (av[k] - mean[c]) * rstd[c];
        dz[k] = s[c] * (dz[k] - sum_dz[c] / count - xhat * (sum_dz_xhat[c] / count));
      } else {
        dz[k] = s[c] * dz[k];
      }
    }
    store_floats<T, VEC>(da, e, dz);
  }
};

template <typename T, int VEC, bool HAS_MAIN, bool OPTION_A>
struct ResidualGradOp {
  const T* d_main;  // like out
  const T* dy;      // [N, P, Q, C_y]
  const T* y;
  T* out;           // [N, H, W, C_x]
  int64_t C_x, C_y, H, W, P, Q, stride_h, stride_w;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t e = i * VEC, c0 = e % C_x;
    float acc[VEC];
    if constexpr (HAS_MAIN) {
      load_floats<T, VEC>(d_main, e, acc);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    }
    int64_t src = e;
    bool hit = true;
    if constexpr (OPTION_A) {
      const int64_t m = e / C_x;
      const int64_t w = m % W, h = (m / W) % H, n = m / (H * W);
      hit = h % stride_h == 0 && w % stride_w == 0;
      src = ((n * P + h / stride_h) * Q + w / stride_w) * C_y + c0;
    }
    if (hit) {
      float g[VEC], yv[VEC];
      load_floats<T, VEC>(dy, src, g);
      load_floats<T, VEC>(y, src, yv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += yv[k] > 0.f ? g[k] : 0.f;
    }
    store_floats<T, VEC>(out, e, acc);
  }
};

// `run(mask mode, scaled)` with the kernel variant a call needs. Only the closing's mask [y > 0] comes with a
// per-sample scale (the ops refuse one without y, and y without the mask), so the scaled kernels are built with
// kMaskY alone.
template <typename Run>
void with_mask_mode(bool scaled, bool has_y, bool mask, const Run& run) {
  if (scaled) run(MaskOf<kMaskY>{}, std::true_type{});
  else if (has_y) run(MaskOf<kMaskY>{}, std::false_type{});
  else if (mask) run(MaskOf<kMaskBn>{}, std::false_type{});
  else run(MaskOf<kMaskNone>{}, std::false_type{});
}

}  // namespace

std::vector<at::Tensor> drelu_dbn_reduce_launch(const at::Tensor& g, const std::optional<at::Tensor>& y,
                                                const at::Tensor& a, const at::Tensor& mean, const at::Tensor& rstd,
                                                const at::Tensor& scale, const at::Tensor& shift,
                                                const std::optional<at::Tensor>& sample_scale, bool mask) {
  const Runs runs = runs_on(a);
  const c10::OptionalDeviceGuard guard(a.device());
  const int64_t C = a.size(1);
  const int64_t M = C == 0 ? 0 : a.numel() / C;
  const auto f32 = mean.options();
  at::Tensor sum_dz = at::empty({C}, f32), sum_dz_xhat = at::empty({C}, f32);
  const SampleScale d = sample_scale_over(sample_scale, a);
  FR_DISPATCH_FLOATING(a.scalar_type(), "drelu_dbn_reduce", [&] {
    using T = scalar_t;
    const T* pg = read_ptr<T>(g);
    const T* py = y.has_value() ? read_ptr<T>(*y) : nullptr;
    const T* pa = read_ptr<T>(a);
    auto run = [&](auto vec, auto mask_mode, auto scaled) {
      constexpr int V = decltype(vec)::value;
      const int64_t groups = C / V;
      const ReduceGeometry geo = reduce_geometry(M, groups, runs);
      at::Tensor partials = at::empty({2, geo.parts, C}, f32);
      float* p1 = write_ptr<float>(partials[0]);
      float* p2 = write_ptr<float>(partials[1]);
      reduce_partials(DreluReduceOp<T, V, decltype(mask_mode)::value, decltype(scaled)::value>{
                          pg, py, pa, read_ptr<float>(mean), read_ptr<float>(scale), read_ptr<float>(shift), d, C,
                          p1, p2},
                      M, groups, runs, geo);
      account::launch("drelu_dbn_reduce partials", "reduction",
                      {g, y.value_or(at::Tensor()), a, mean, scale, shift, sample_scale.value_or(at::Tensor())},
                      {partials});
      for_each_index(DreluFinalizeOp{p1, p2, read_ptr<float>(rstd), geo.parts, C, write_ptr<float>(sum_dz),
                                     write_ptr<float>(sum_dz_xhat)},
                     C, runs);
      account::launch("drelu_dbn_reduce finalize", "elementwise", {partials, rstd}, {sum_dz, sum_dz_xhat});
    };
    auto with_vec = [&](auto vec) {
      with_mask_mode(sample_scale.has_value(), py != nullptr, mask,
                     [&](auto mask_mode, auto scaled) { run(vec, mask_mode, scaled); });
    };
    constexpr int VEC = 16 / sizeof(T);
    if (vector_width<T>(C, {pg, py, pa}) == VEC) with_vec(Vec<VEC>{}); else with_vec(Vec<1>{});
  });
  return {sum_dz, sum_dz_xhat};
}

at::Tensor dbn_apply_launch(const at::Tensor& g, const std::optional<at::Tensor>& y, const at::Tensor& a,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat,
                            bool batch_stats, const std::optional<at::Tensor>& sample_scale, bool mask) {
  const c10::OptionalDeviceGuard guard(a.device());
  at::Tensor da = at::empty_like(a);
  const int64_t C = a.size(1);
  const float count = C == 0 ? 1.f : static_cast<float>(a.numel() / C);
  const SampleScale d = sample_scale_over(sample_scale, a);
  FR_DISPATCH_FLOATING(a.scalar_type(), "dbn_apply", [&] {
    using T = scalar_t;
    const T* pg = read_ptr<T>(g);
    const T* py = y.has_value() ? read_ptr<T>(*y) : nullptr;
    const T* pa = read_ptr<T>(a);
    T* pd = write_ptr<T>(da);
    auto run = [&](auto vec, auto mask_mode, auto batch, auto scaled) {
      constexpr int V = decltype(vec)::value;
      DbnApplyOp<T, V, decltype(mask_mode)::value, decltype(batch)::value, decltype(scaled)::value> op{
          pg, py, pa, read_ptr<float>(mean), read_ptr<float>(rstd), read_ptr<float>(scale),
          read_ptr<float>(shift), d, read_ptr<float>(sum_dz), read_ptr<float>(sum_dz_xhat),
          count, pd, C};
      for_each_index(op, a.numel() / V, runs_on(a));
    };
    auto with_mask = [&](auto vec, auto batch) {
      with_mask_mode(sample_scale.has_value(), py != nullptr, mask,
                     [&](auto mask_mode, auto scaled) { run(vec, mask_mode, batch, scaled); });
    };
    auto with_vec = [&](auto vec) {
      batch_stats ? with_mask(vec, std::true_type{}) : with_mask(vec, std::false_type{});
    };
    constexpr int VEC = 16 / sizeof(T);
    if (vector_width<T>(C, {pg, py, pa, pd}) == VEC) with_vec(Vec<VEC>{}); else with_vec(Vec<1>{});
  });
  account::launch("dbn_apply", "elementwise",
                  {g, y.value_or(at::Tensor()), a, mean, rstd, scale, shift, sum_dz, sum_dz_xhat,
                   sample_scale.value_or(at::Tensor())},
                  {da});
  return da;
}

at::Tensor residual_grad_launch(const std::optional<at::Tensor>& d_main, const at::Tensor& dy, const at::Tensor& y,
                                const at::Tensor& like, at::IntArrayRef option_a_stride) {
  const c10::OptionalDeviceGuard guard(dy.device());
  at::Tensor out = at::empty_like(like);
  const bool option_a = !option_a_stride.empty();
  FR_DISPATCH_FLOATING(dy.scalar_type(), "residual_grad", [&] {
    using T = scalar_t;
    ResidualGradOp<T, 1, false, false> args{
        d_main.has_value() ? read_ptr<T>(*d_main) : nullptr,
        read_ptr<T>(dy), read_ptr<T>(y),
        write_ptr<T>(out), like.size(1), dy.size(1), 1, 1, 1, 1, 1, 1};
    if (option_a) {
      args.H = like.size(2);
      args.W = like.size(3);
      args.P = dy.size(2);
      args.Q = dy.size(3);
      args.stride_h = option_a_stride[0];
      args.stride_w = option_a_stride[1];
    }
    auto run = [&](auto vec, auto has_main, auto is_option_a) {
      constexpr int V = decltype(vec)::value;
      ResidualGradOp<T, V, decltype(has_main)::value, decltype(is_option_a)::value> op{
          args.d_main, args.dy, args.y, args.out, args.C_x, args.C_y, args.H, args.W, args.P, args.Q,
          args.stride_h, args.stride_w};
      for_each_index(op, out.numel() / V, runs_on(out));
    };
    auto with_vec = [&](auto vec) {
      if (args.d_main != nullptr) {
        option_a ? run(vec, std::true_type{}, std::true_type{}) : run(vec, std::true_type{}, std::false_type{});
      } else {
        option_a ? run(vec, std::false_type{}, std::true_type{}) : run(vec, std::false_type{}, std::false_type{});
      }
    };
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = vector_width<T>(args.C_x, {args.d_main, args.dy, args.y, args.out}) == VEC &&
                     args.C_y % VEC == 0;
    if (vec) with_vec(Vec<VEC>{}); else with_vec(Vec<1>{});
  });
  account::launch("residual_grad", "elementwise", {d_main.value_or(at::Tensor()), dy, y}, {out});
  return out;
}

}  // namespace fused_resnet
