// bn_act: BN-apply (scale-shift) + shortcut add + optional ReLU on channels-innermost activations, fp32 math:
//
//   y[m, c] = relu(d[n]·(a[m, c]·s[c] + t[c]) + sc[m, c])
//   sc = 0 | r[m, c] | r[m, c]·rs[c] + rt[c] (projection through its BN) | option A read in place from x
//   d  = 1, or stochastic depth's per-sample scale (n: m's sample), applied before the shortcut joins
//
// Twin of kernels/bn_act.py and fused_resnet.reference.bn_act. 16-byte vectors when the channel counts and every
// pointer allow it (a vector then never straddles two pixels), one element otherwise.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"
#include "spec.h"

namespace fused_resnet {
namespace {

template <typename T, int VEC, int RES, bool RELU, bool SCALED>
struct BnActOp {
  const T* a;
  const float* s;
  const float* t;
  const T* r;  // residual [M, C], projection output [M, C] or block input [N, H, W, C_in] (option A)
  const float* rs;
  const float* rt;
  T* y;
  int64_t C;
  SampleScale d;  // stochastic depth's (SCALED only)
  // option A geometry: output P×Q, input H×W×C_in, strides
  int64_t P, Q, H, W, C_in, stride_h, stride_w;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t e = i * VEC;
    const int64_t c0 = e % C;
    float z[VEC];
    load_floats<T, VEC>(a, e, z);
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = affine(z[k], s[c0 + k], t[c0 + k]);
    if constexpr (SCALED) {
      const float dn = d.at(e);
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] *= dn;
    }
    if constexpr (RES == kResidualTensor || RES == kResidualAffine) {
      float res[VEC];
      load_floats<T, VEC>(r, e, res);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[k] += RES == kResidualAffine ? affine(res[k], rs[c0 + k], rt[c0 + k]) : res[k];
      }
    }
    if constexpr (RES == kResidualOptionA) {
      if (c0 < C_in) {  // C_in is a multiple of VEC: the vector is wholly inside or wholly outside
        const int64_t m = e / C;
        const int64_t q = m % Q, p = (m / Q) % P, n = m / (P * Q);
        float res[VEC];
        load_floats<T, VEC>(r, ((n * H + p * stride_h) * W + q * stride_w) * C_in + c0, res);
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[k] += res[k];
      }
    }
    if constexpr (RELU) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = (z[k] > 0.f || z[k] != z[k]) ? z[k] : 0.f;  // NaN stays NaN, as torch.relu
    }
    store_floats<T, VEC>(y, e, z);
  }
};

template <typename T>
using BnActArgs = BnActOp<T, 1, kResidualNone, false, false>;

template <typename T, int VEC, int RES, bool RELU, bool SCALED>
void run(const BnActArgs<T>& args, int64_t n, Runs runs) {
  BnActOp<T, VEC, RES, RELU, SCALED> op{args.a, args.s, args.t, args.r, args.rs, args.rt, args.y, args.C,
                                        args.d, args.P, args.Q, args.H, args.W, args.C_in,
                                        args.stride_h, args.stride_w};
  for_each_index(op, n / VEC, runs);
}

// Only a closing takes a per-sample scale, and every closing has its ReLU: the scaled kernels are built with it
// alone (the op refuses a scale without relu).
template <typename T, int VEC, int RES>
void run_relu(const BnActArgs<T>& args, bool relu, bool scaled, int64_t n, Runs runs) {
  if (scaled) run<T, VEC, RES, true, true>(args, n, runs);
  else if (relu) run<T, VEC, RES, true, false>(args, n, runs);
  else run<T, VEC, RES, false, false>(args, n, runs);
}

template <typename T, int VEC>
void run_mode(const BnActArgs<T>& args, int res, bool relu, bool scaled, int64_t n, Runs runs) {
  switch (res) {
    case kResidualNone: run_relu<T, VEC, kResidualNone>(args, relu, scaled, n, runs); break;
    case kResidualTensor: run_relu<T, VEC, kResidualTensor>(args, relu, scaled, n, runs); break;
    case kResidualAffine: run_relu<T, VEC, kResidualAffine>(args, relu, scaled, n, runs); break;
    default: run_relu<T, VEC, kResidualOptionA>(args, relu, scaled, n, runs); break;
  }
}

}  // namespace

at::Tensor bn_act_launch(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                         const std::optional<at::Tensor>& residual_shift, at::IntArrayRef option_a_stride,
                         bool relu, const std::optional<at::Tensor>& sample_scale) {
  const c10::OptionalDeviceGuard guard(a.device());
  at::Tensor y = at::empty_like(a);  // keeps channels_last
  const int64_t C = a.size(1);
  const bool option_a = !option_a_stride.empty();
  const int res = !residual.has_value()       ? kResidualNone
                  : option_a                  ? kResidualOptionA
                  : residual_scale.has_value() ? kResidualAffine
                                              : kResidualTensor;
  FR_DISPATCH_FLOATING(a.scalar_type(), "bn_act", [&] {
    using T = scalar_t;
    BnActArgs<T> args{read_ptr<T>(a),
                      read_ptr<float>(scale), read_ptr<float>(shift),
                      nullptr, nullptr, nullptr, write_ptr<T>(y),
                      C, sample_scale_over(sample_scale, a), 1, 1, 1, 1, 0, 1, 1};
    int64_t c_in = C;
    if (residual.has_value()) {
      args.r = read_ptr<T>(*residual);
      if (res == kResidualAffine) {
        args.rs = read_ptr<float>(*residual_scale);
        args.rt = read_ptr<float>(*residual_shift);
      }
      if (option_a) {  // a: [N, C, P, Q], residual: [N, C_in, H, W], both channels_last
        args.P = a.size(2);
        args.Q = a.size(3);
        args.H = residual->size(2);
        args.W = residual->size(3);
        args.C_in = c_in = residual->size(1);
        args.stride_h = option_a_stride[0];
        args.stride_w = option_a_stride[1];
      }
    }
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = vector_width<T>(C, {args.a, args.y, args.r}) == VEC && c_in % VEC == 0;
    const bool scaled = sample_scale.has_value();
    if (vec) run_mode<T, VEC>(args, res, relu, scaled, a.numel(), runs_on(a));
    else run_mode<T, 1>(args, res, relu, scaled, a.numel(), runs_on(a));
  });
  account::launch("bn_act", "elementwise",
                  {a, scale, shift, residual.value_or(at::Tensor()), residual_scale.value_or(at::Tensor()),
                   residual_shift.value_or(at::Tensor()), sample_scale.value_or(at::Tensor())},
                  {y});
  return y;
}

}  // namespace fused_resnet
