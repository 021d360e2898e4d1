// bn_act: BN-apply (scale-shift) + optional residual add + optional ReLU on NHWC activations.
//
//   y[m, c] = relu(a[m, c] * s[c] + t[c] + r[m, c])      m over N*H*W, c innermost; fp32 math
//
// Twin of kernels/bn_act.py and fused_resnet.reference.bn_act. 16-byte vector loads/stores when the channel
// count and every pointer allow it (a vector then never straddles two pixels), scalar otherwise; grid-stride
// loop over a grid sized from the SM count; launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace fused_resnet {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, bool HAS_RES, bool RELU>
__global__ void bn_act_kernel(const T* __restrict__ a,      // [M, C] activations
                              const float* __restrict__ s,  // [C] scale
                              const float* __restrict__ t,  // [C] shift
                              const T* __restrict__ r,      // [M, C] residual (HAS_RES only)
                              T* __restrict__ y,            // [M, C] output
                              int64_t n_vec,                // M * C / VEC
                              int64_t C) {
  using P = Pack<T, VEC>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const int64_t c0 = (i * VEC) % C;
    const P pa = reinterpret_cast<const P*>(a)[i];
    P pr;
    if constexpr (HAS_RES) pr = reinterpret_cast<const P*>(r)[i];
    P out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float z = static_cast<float>(pa.v[k]) * __ldg(s + c0 + k) + __ldg(t + c0 + k);
      if constexpr (HAS_RES) z += static_cast<float>(pr.v[k]);
      if constexpr (RELU) z = fmaxf(z, 0.f);
      out.v[k] = static_cast<T>(z);
    }
    reinterpret_cast<P*>(y)[i] = out;
  }
}

bool channels_innermost(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) || (x.dim() == 2 && x.is_contiguous());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int VEC>
void launch(const at::Tensor& a, const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& r,
            at::Tensor& y, bool relu, int64_t C) {
  const int64_t n_vec = a.numel() / VEC;
  if (n_vec == 0) return;
  const int threads = 256;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n_vec + threads - 1) / threads, static_cast<int64_t>(sms) * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* pa = a.const_data_ptr<T>();
  const T* pr = r.has_value() ? r->const_data_ptr<T>() : nullptr;
  T* py = y.mutable_data_ptr<T>();
  const float* ps = s.const_data_ptr<float>();
  const float* pt = t.const_data_ptr<float>();
#define FR_LAUNCH(HAS_RES, RELU) \
  bn_act_kernel<T, VEC, HAS_RES, RELU><<<blocks, threads, 0, stream>>>(pa, ps, pt, pr, py, n_vec, C)
  if (r.has_value()) {
    if (relu) FR_LAUNCH(true, true); else FR_LAUNCH(true, false);
  } else {
    if (relu) FR_LAUNCH(false, true); else FR_LAUNCH(false, false);
  }
#undef FR_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor bn_act(const at::Tensor& a, const at::Tensor& scale, const at::Tensor& shift,
                  const c10::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(a.is_cuda(), "bn_act: expected a CUDA tensor, got one on ", a.device());
  TORCH_CHECK(channels_innermost(a), "bn_act: expected a channels_last (NHWC) 4-D or contiguous [M, C] tensor, got ",
              "sizes ", a.sizes(), " strides ", a.strides());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
              "bn_act: expected float32, float16 or bfloat16 activations, got ", a.scalar_type());
  const int64_t C = a.size(1);  // [N, C, H, W] or [M, C]
  for (const at::Tensor* v : {&scale, &shift}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == C && v->is_contiguous() &&
                    v->device() == a.device(),
                "bn_act: expected scale and shift as contiguous float32 [", C, "] tensors on ", a.device(), ", got ",
                v->scalar_type(), " ", v->sizes(), " on ", v->device());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == a.sizes() && residual->scalar_type() == a.scalar_type() &&
                    residual->device() == a.device() && channels_innermost(*residual),
                "bn_act: expected the residual with the activations' sizes, dtype, device and layout");
  }
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor y = at::empty_like(a);  // keeps channels_last
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec_ok = C % VEC == 0 && aligned16(a.const_data_ptr()) && aligned16(y.const_data_ptr()) &&
                        (!residual.has_value() || aligned16(residual->const_data_ptr()));
    if (vec_ok) {
      launch<T, VEC>(a, scale, shift, residual, y, relu, C);
    } else {
      launch<T, 1>(a, scale, shift, residual, y, relu, C);
    }
  };
  switch (a.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return y;
}

TORCH_LIBRARY(fused_resnet_C, m) {
  m.def("bn_act(Tensor a, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) { m.impl("bn_act", &bn_act); }

}  // namespace fused_resnet
