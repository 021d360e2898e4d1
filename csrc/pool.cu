// The average pool a unit may read the block input through (UnitSpec::avg_pool; timm's "-d" shortcut), on
// channels-innermost tensors, fp32 math (twin of fused_resnet.reference.pool / pool_backward):
//
//   avg_pool             y[n, p, q, c] = Σ x[n, h, w, c] / count over the window h in [p·k, min(p·k + k, H)),
//                                          w likewise: ceil_mode's partial last windows, count_include_pad=False
//   avg_pool_grad_add    dx[n, h, w, c] = d_main[n, h, w, c] + dy[n, h/k, w/k, c] / count(h/k, w/k)
//
// The windows do not overlap (stride = kernel), so every input element has exactly one pooled element: the
// backward is a gather, one output element per thread, with no atomics and the gradient of the rest of the block
// (d_main) added in the same pass. The sum runs in the window's row-major order and is divided once, as torch's
// avg_pool2d does, so a float32 pool matches it bit for bit.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"
#include "spec.h"

namespace fused_resnet {
namespace {

template <int V>
using Vec = std::integral_constant<int, V>;

// A window's extent along one axis (`size` >= 1: every window starts inside, as ceil_mode's do).
C10_HOST_DEVICE inline int64_t window_end(int64_t j, int64_t k, int64_t size) {
  return j * k + k < size ? j * k + k : size;
}

// The divisor of pooled pixel (p, q): its window's in-bounds elements (count_include_pad=False).
C10_HOST_DEVICE inline float window_count(int64_t p, int64_t q, int64_t k, int64_t H, int64_t W) {
  return static_cast<float>((window_end(p, k, H) - p * k) * (window_end(q, k, W) - q * k));
}

template <typename T, int VEC>
struct AvgPoolOp {
  const T* x;  // [N, H, W, C]
  T* y;        // [N, P, Q, C]
  int64_t C, H, W, P, Q, k;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t e = i * VEC, c0 = e % C, m = e / C;
    const int64_t q = m % Q, p = (m / Q) % P, n = m / (P * Q);
    const int64_t h1 = window_end(p, k, H), w1 = window_end(q, k, W);
    float acc[VEC] = {};
    for (int64_t h = p * k; h < h1; ++h) {
      for (int64_t w = q * k; w < w1; ++w) {
        float v[VEC];
        load_floats<T, VEC>(x, ((n * H + h) * W + w) * C + c0, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += v[j];
      }
    }
    const float count = window_count(p, q, k, H, W);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] /= count;
    store_floats<T, VEC>(y, e, acc);
  }
};

template <typename T, int VEC, bool HAS_MAIN>
struct AvgPoolGradAddOp {
  const T* d_main;  // like out
  const T* dy;      // [N, P, Q, C]
  T* out;           // [N, H, W, C]
  int64_t C, H, W, P, Q, k;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t e = i * VEC, c0 = e % C, m = e / C;
    const int64_t w = m % W, h = (m / W) % H, n = m / (H * W);
    const int64_t p = h / k, q = w / k;
    const float count = window_count(p, q, k, H, W);
    float g[VEC];
    load_floats<T, VEC>(dy, ((n * P + p) * Q + q) * C + c0, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] /= count;
    if constexpr (HAS_MAIN) {
      float d[VEC];
      load_floats<T, VEC>(d_main, e, d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] += d[j];
    }
    store_floats<T, VEC>(out, e, g);
  }
};

}  // namespace

at::Tensor avg_pool_launch(const at::Tensor& x, int64_t k) {
  const c10::OptionalDeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t P = pooled_size(H, k), Q = pooled_size(W, k);
  at::Tensor y = at::empty({N, C, P, Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  FR_DISPATCH_FLOATING(x.scalar_type(), "avg_pool", [&] {
    using T = scalar_t;
    const T* px = read_ptr<T>(x);
    T* py = write_ptr<T>(y);
    auto run = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      for_each_index(AvgPoolOp<T, V>{px, py, C, H, W, P, Q, k}, y.numel() / V, runs_on(y));
    };
    constexpr int VEC = 16 / sizeof(T);
    if (vector_width<T>(C, {px, py}) == VEC) run(Vec<VEC>{}); else run(Vec<1>{});
  });
  account::launch("avg_pool", "elementwise", {x}, {y});
  return y;
}

at::Tensor avg_pool_grad_add_launch(const std::optional<at::Tensor>& d_main, const at::Tensor& d_pooled,
                                    const at::Tensor& like, int64_t k) {
  const c10::OptionalDeviceGuard guard(like.device());
  at::Tensor out = at::empty_like(like);  // keeps channels_last
  const int64_t C = like.size(1), H = like.size(2), W = like.size(3);
  FR_DISPATCH_FLOATING(like.scalar_type(), "avg_pool_grad_add", [&] {
    using T = scalar_t;
    const T* pm = d_main.has_value() ? read_ptr<T>(*d_main) : nullptr;
    const T* pd = read_ptr<T>(d_pooled);
    T* po = write_ptr<T>(out);
    auto run = [&](auto vec, auto has_main) {
      constexpr int V = decltype(vec)::value;
      AvgPoolGradAddOp<T, V, decltype(has_main)::value> op{pm, pd, po, C, H, W, d_pooled.size(2), d_pooled.size(3),
                                                           k};
      for_each_index(op, out.numel() / V, runs_on(out));
    };
    auto with_vec = [&](auto vec) {
      d_main.has_value() ? run(vec, std::true_type{}) : run(vec, std::false_type{});
    };
    constexpr int VEC = 16 / sizeof(T);
    if (vector_width<T>(C, {pm, pd, po}) == VEC) with_vec(Vec<VEC>{}); else with_vec(Vec<1>{});
  });
  account::launch("avg_pool_grad_add", "elementwise", {d_main.value_or(at::Tensor()), d_pooled}, {out});
  return out;
}

}  // namespace fused_resnet
