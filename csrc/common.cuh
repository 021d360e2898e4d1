// Shared machinery of the memory-bound kernels (included by the .cu files only).
//
// Every kernel is written once, as a functor whose body is __host__ __device__:
//   * elementwise work is op(i) for i in [0, n) — on a CUDA tensor a grid-stride kernel over a grid sized from the
//     SM count, launched on the current stream; on a CPU tensor a parallel host loop running the same body;
//   * per-channel reductions are an accumulator per (row slice, channel vector): on the GPU a 2-D block of
//     (channel-vector lanes × row lanes), each thread accumulating its rows in registers, the block merging its
//     row lanes in shared memory and writing one fp32 partial per block row; on the CPU a loop over the same row
//     slices. A per-channel finalize functor then merges the partials (same code on both).
// The CPU path exists so that the op logic and every kernel body are exercised by the CPU test suite; it is a
// correctness path, not a fast one. On meta tensors nothing runs: that is the launch account's dry run, where the
// launchers record each launch instead (account.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "account.h"

namespace fused_resnet {

// Where a launcher's kernels run, decided by its tensors' device.
enum class Runs { kGpu, kHost, kNowhere };
inline Runs runs_on(const at::Tensor& t) {
  return t.is_cuda() ? Runs::kGpu : t.is_meta() ? Runs::kNowhere : Runs::kHost;
}
// The account sizes partial buffers as on the GPUs it describes (H100 and H200: 132 SMs).
constexpr int64_t kAccountSms = 132;

// A tensor's data for a kernel: nullptr for a meta tensor (the account's dry run runs no kernel to read it).
template <typename T>
const T* read_ptr(const at::Tensor& t) {
  return t.is_meta() ? nullptr : static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* write_ptr(const at::Tensor& t) {
  return t.is_meta() ? nullptr : static_cast<T*>(t.mutable_data_ptr());
}

// A BN parameter vector (γ or β) read as float from the module's own dtype: a bf16 or fp16 model's parameters
// reach the per-channel kernels without a conversion launch per vector per step.
struct ChannelParam {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;

  C10_HOST_DEVICE float operator[](int64_t c) const {
    switch (dtype) {
      case at::kBFloat16:
        return static_cast<float>(static_cast<const at::BFloat16*>(data)[c]);
      case at::kHalf:
        return static_cast<float>(static_cast<const at::Half*>(data)[c]);
      default:
        return static_cast<const float*>(data)[c];
    }
  }
};
inline ChannelParam param_ptr(const at::Tensor& t) { return {read_ptr<void>(t), t.scalar_type()}; }

// Stochastic depth's per-sample scale d [N] as the closing and the BN backward read it: element e of an
// [N, H, W, C] tensor belongs to sample e / per_sample (a 16-byte vector never straddles two pixels, so one sample).
struct SampleScale {
  ChannelParam d;          // in its own dtype, read as float like γ
  int64_t per_sample = 1;  // elements of one sample (H·W·C)

  C10_HOST_DEVICE float at(int64_t e) const { return d[e / per_sample]; }
};

// d for the kernels over `a`: none (never read) without a sample_scale, or for an empty batch.
inline SampleScale sample_scale_over(const std::optional<at::Tensor>& sample_scale, const at::Tensor& a) {
  if (!sample_scale.has_value() || a.size(0) == 0) return {};
  return {param_ptr(*sample_scale), a.numel() / a.size(0)};
}

// 16 bytes of T (VEC = 16 / sizeof(T)), or one element when VEC = 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
C10_HOST_DEVICE inline Pack<T, VEC> load_pack(const T* base, int64_t offset) {
  return *reinterpret_cast<const Pack<T, VEC>*>(base + offset);
}

template <typename T, int VEC>
C10_HOST_DEVICE inline void store_pack(T* base, int64_t offset, const Pack<T, VEC>& p) {
  *reinterpret_cast<Pack<T, VEC>*>(base + offset) = p;
}

template <typename T, int VEC>
C10_HOST_DEVICE inline void load_floats(const T* base, int64_t offset, float (&out)[VEC]) {
  const Pack<T, VEC> p = load_pack<T, VEC>(base, offset);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<float>(p.v[k]);
}

template <typename T, int VEC>
C10_HOST_DEVICE inline void store_floats(T* base, int64_t offset, const float (&in)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<T>(in[k]);
  store_pack<T, VEC>(base, offset, p);
}

// Chan's merge of two (count, mean, M2) partials into the first: exact for any split, no cancellation.
C10_HOST_DEVICE inline void chan_merge(float& n, float& mean, float& m2, float n_b, float mean_b, float m2_b) {
  const float total = n + n_b;
  if (n_b == 0.f || total == 0.f) return;
  const float delta = mean_b - mean;
  const float frac_b = n_b / total;
  mean += delta * frac_b;
  m2 += m2_b + delta * delta * n * frac_b;
  n = total;
}

// a·s + t as one fused multiply-add on host and device alike, so the forward ReLU (bn_act) and the mask the
// backward recomputes from the same a, s, t (dbn.cu) agree bit for bit, whatever the compiler contracts.
C10_HOST_DEVICE inline float affine(float a, float s, float t) {
#ifdef __CUDA_ARCH__
  return fmaf(a, s, t);
#else
  return std::fma(a, s, t);
#endif
}

// BN as a per-channel affine map: s = γ·rstd, t = β − mean·s (fused_resnet.reference.scale_shift).
C10_HOST_DEVICE inline void scale_shift(float gamma, float beta, float mean, float var, float eps, float& s, float& t,
                                        float& rstd) {
#ifdef __CUDA_ARCH__
  rstd = rsqrtf(var + eps);
#else
  rstd = 1.f / std::sqrt(var + eps);
#endif
  s = gamma * rstd;
  t = beta - mean * s;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ------------------------------------------------------------------------------------------------ elementwise
template <typename Op>
__global__ void elementwise_kernel(Op op, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) op(i);
}

// op(i) for every i in [0, n): on the current CUDA stream, in a parallel host loop, or (meta) not at all.
template <typename Op>
void for_each_index(const Op& op, int64_t n, Runs runs) {
  if (n <= 0 || runs == Runs::kNowhere) return;
  if (runs == Runs::kHost) {
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op(i);
    });
    return;
  }
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, static_cast<int64_t>(sm_count()) * 8);
  elementwise_kernel<Op><<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(op, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------ reductions
// Geometry of a per-channel reduction over an [M, C] channels-innermost tensor read as `groups` = C / VEC channel
// vectors: blocks of (lanes × rows) threads; grid (ceil(groups / lanes), parts). Part p covers the row slices
// [(p + k·parts)·rows, … + rows) for k = 0, 1, …; it writes one partial per channel.
struct ReduceGeometry {
  int lanes = 1;
  int rows = 1;
  int64_t lane_blocks = 1;
  int64_t parts = 1;
};

inline ReduceGeometry reduce_geometry(int64_t M, int64_t groups, Runs runs) {
  ReduceGeometry g;
  g.lanes = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(groups, 32)));
  g.rows = std::max(1, 256 / g.lanes);
  g.lane_blocks = std::max<int64_t>(1, (groups + g.lanes - 1) / g.lanes);
  const int64_t target_blocks = runs == Runs::kGpu      ? static_cast<int64_t>(sm_count()) * 4
                                : runs == Runs::kNowhere ? kAccountSms * 4
                                                         : 16;
  const int64_t by_rows = (M + g.rows - 1) / g.rows;
  g.parts = std::max<int64_t>(1, std::min<int64_t>({by_rows, std::max<int64_t>(1, target_blocks / g.lane_blocks),
                                                    65535}));
  return g;
}

// Op provides: `using Acc` (default-constructible: the empty accumulator; C10_HOST_DEVICE merge), and, all
// C10_HOST_DEVICE and const: `void init(Acc&, int64_t group)` (once per thread before its rows),
// `void accumulate(Acc&, int64_t row, int64_t group)` and `void store(const Acc&, int64_t part, int64_t group)`.
template <typename Op>
__global__ void reduce_kernel(Op op, int64_t M, int64_t groups) {
  using Acc = typename Op::Acc;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  Acc* shared = reinterpret_cast<Acc*>(shared_raw);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + tx;
  Acc acc;
  if (group < groups) {
    op.init(acc, group);
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
#pragma unroll 4  // several independent 16-byte loads in flight per thread
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + ty; row < M; row += step) {
      op.accumulate(acc, row, group);
    }
  }
  shared[ty * blockDim.x + tx] = acc;
  __syncthreads();
  int half = 1;
  while (half * 2 < static_cast<int>(blockDim.y)) half *= 2;
  for (; half > 0; half /= 2) {  // tree over the row lanes (any blockDim.y)
    if (ty < half && ty + half < static_cast<int>(blockDim.y)) {
      shared[ty * blockDim.x + tx].merge(shared[(ty + half) * blockDim.x + tx]);
    }
    __syncthreads();
  }
  if (ty == 0 && group < groups) op.store(shared[tx], blockIdx.y, group);
}

// Runs the partial pass over the geometry `g` (from reduce_geometry; the caller's finalize reads g.parts).
template <typename Op>
void reduce_partials(const Op& op, int64_t M, int64_t groups, Runs runs, const ReduceGeometry& g) {
  if (groups == 0 || runs == Runs::kNowhere) return;  // no channels: the finalize has no channel to write either
  if (runs == Runs::kHost) {  // the kernel's algorithm, thread by thread: per row lane an accumulator, then the same tree
    at::parallel_for(0, g.parts * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<typename Op::Acc> lanes(g.rows);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t part = job / groups, group = job % groups;
        for (int ty = 0; ty < g.rows; ++ty) {
          lanes[ty] = typename Op::Acc();
          op.init(lanes[ty], group);
          for (int64_t row = part * g.rows + ty; row < M; row += g.parts * g.rows) op.accumulate(lanes[ty], row, group);
        }
        int half = 1;
        while (half * 2 < g.rows) half *= 2;
        for (; half > 0; half /= 2) {
          for (int ty = 0; ty < half && ty + half < g.rows; ++ty) lanes[ty].merge(lanes[ty + half]);
        }
        op.store(lanes[0], part, group);
      }
    });
    return;
  }
  const dim3 block(g.lanes, g.rows);
  const dim3 grid(static_cast<unsigned>(g.lane_blocks), static_cast<unsigned>(g.parts));
  const size_t shared = sizeof(typename Op::Acc) * g.lanes * g.rows;
  reduce_kernel<Op><<<grid, block, shared, at::cuda::getCurrentCUDAStream()>>>(op, M, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The channel-vector width for an [M, C] pass over `tensors` (data pointers): 16-byte vectors when C and every
// pointer allow it, else 1.
template <typename T>
int vector_width(int64_t C, std::initializer_list<const void*> pointers) {
  constexpr int VEC = 16 / sizeof(T);
  if (C % VEC != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && !aligned16(p)) return 1;
  }
  return VEC;
}

}  // namespace fused_resnet

// FR_DISPATCH_FLOATING(dtype, name, ...): runs the body with `scalar_t` = float, at::Half or at::BFloat16.
#define FR_DISPATCH_FLOATING(DTYPE, NAME, ...)                                                   \
  [&] {                                                                                          \
    switch (DTYPE) {                                                                             \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                         \
      case at::kHalf: { using scalar_t = at::Half; return __VA_ARGS__(); }                       \
      case at::kBFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); }               \
      default: TORCH_CHECK(false, NAME, ": expected float32, float16 or bfloat16, got ", DTYPE); \
    }                                                                                            \
  }()
