// cuDNN runtime-fusion graphs (cudnn-frontend's graph API) that the block ops (block.cpp) run in place of
// separate passes, per unit:
//   fprop   [relu(x·scale + shift) on the operand load] → conv → [Σy, Σy² per channel, fp32 reductions]
//                                                               | [+ bias][+ residual][ReLU]   (eval, BN folded)
//   dgrad   conv dgrad → dReLU with the mask of the unit below → that unit's Σdz, Σdz·x̂ (fp32 reductions), and
//           its output relu(a·scale + shift), the input the wgrad of this unit reads
//   wgrad   conv wgrad of a plain operand (the block input, or the dgrad's relu output)
// Each form is one cuDNN has an engine for on sm_90 in float16 and bfloat16 (bench/cudnn_check.py asks cuDNN
// deviceless, tests/backends/test_cudnn_fusion.py keeps it so; docs/CUDA.md has the table and why these forms).
//
// A graph is built once per key (graph, features, shapes, dtype, device, determinism) and kept with its execution
// plan in a bounded cache. A key for which cuDNN offers no engine, or whose plan failed to execute, is remembered
// with cuDNN's message; its calls return nothing and are counted as fallbacks, and the caller runs the unfused
// path for that unit (never a different result). No plan is built while a CUDA graph is being captured: a missing
// one is an error there (build them first: one eager step, or the backend's warm-up).
//
// CPU twins (tests): with set_cpu_twins(true), CPU tensors are eligible and each key's "graph" is its twin, ATen
// ops on the CPU with the graph's exact contract (the same roles read and written, fp32 arithmetic, outputs
// rounded to the activations' dtype), so the block ops' fused paths run in CI without a GPU.
//
// Compiled against cudnn-frontend's headers when setup.py finds them (FUSED_RESNET_WITH_CUDNN_FRONTEND); without
// them every runner reports "not built" and the block ops run the unfused path.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "spec.h"

namespace fused_resnet {
namespace fusion {

enum class Graph : int { kFprop = 0, kDgrad = 1, kWgrad = 2 };
constexpr int kGraphs = 3;
const char* graph_name(Graph g);

// What an fprop graph adds to the conv (the labels' words); dgrad and wgrad take none.
enum Feature : int64_t { kPrologue = 1, kStats = 2, kBias = 4, kResidual = 8, kRelu = 16 };

// One graph a block op asks for: its kind and features, the conv input's sizes (for dgrad: the unit below's
// activations, the dgrad's output) and the filter's, the unit's geometry, the activations' dtype.
struct Request {
  Graph graph;
  int64_t features;
  std::vector<int64_t> x, w;
  UnitSpec unit;
  at::ScalarType dtype;
  bool deterministic = false;  // deterministic reductions and engines only (torch's determinism flags)
  int64_t unit_index = 0;      // the unit of the block asking (block_requests); not part of the key
};
std::string label(Graph g, int64_t features);
// Whether torch asks for deterministic algorithms now (use_deterministic_algorithms, cudnn.deterministic).
bool deterministic_now();
// Whether a training unit's fprop graph also reduces its BN statistics: not in deterministic mode, where cuDNN
// has no fprop engine with deterministic reductions on sm_90 and the extension's fixed-order kernel reduces them.
bool stats_in_graph(const UnitSpec& u);
// The key a graph is cached under: label, dtype, sizes, conv geometry, device, determinism.
std::string key(const Request& r, const at::Device& device);

// "cudnn-frontend <version>" when compiled with it, else "not built: <why>".
std::string build_info();
bool built();
// Tests' knobs. Refused: behave as if cuDNN had no engine for this graph kind (kAtBuild: its calls fall back,
// counted), or as if its built graphs failed to execute (kAtExecute: the key loses its graph, the call falls
// back). CPU twins: CPU tensors are eligible and run each graph's CPU twin.
enum class Refusal : int { kNone = 0, kAtBuild = 1, kAtExecute = 2 };
void set_refused(Graph g, Refusal at);
bool set_cpu_twins(bool on);
// At most this many keys are kept (least recently used go first); returns the previous bound.
int64_t set_capacity(int64_t keys);

// Why a unit's conv may not use fusion graphs for the block input x and the weight w; nullopt when it may.
// `graphs`: the backend's choice (false for cuda-unfused).
std::optional<std::string> ineligible(const at::Tensor& x, const at::Tensor& w, const UnitSpec& u, bool graphs);

// The graphs block_forward (train), block_backward (train) or block_inference (eval) ask for, for x's sizes and
// dtype and the units' filter sizes, assuming every unit eligible by its configuration runs its graphs (x's
// device is not asked: x and the weights may be meta tensors): the list the warm-up builds, a CUDA graph capture
// checks and the deviceless engine check asks about. block.cpp's calls must stay this list (a test runs the
// blocks and compares).
std::vector<Request> block_requests(const BlockSpec& spec, const at::Tensor& x, at::TensorList weights, bool graphs,
                                    bool train);
// The key of a request on x's device.
std::string key_on(const Request& r, const at::Tensor& x);
// Builds the plans of these requests on x's device (never inside a capture); returns the keys without an engine.
std::vector<std::string> prepare(const std::vector<Request>& requests, const at::Tensor& x);
// The keys of these requests with no plan built (or known to have none) on x's device.
std::vector<std::string> missing(const std::vector<Request>& requests, const at::Tensor& x);

// y = conv(operand, w) [+ bias][+ residual][ReLU]; with `sums` (zeroed fp32 [K] buffers the graph accumulates
// into: zeroed_sums) also Σy and Σy² per channel. nullopt: no engine for this key (counted); the caller computes
// it unfused.
struct Sums {
  at::Tensor sum, sq_sum;
};
struct FpropOut {
  at::Tensor y, sum, sq_sum;
};
struct Prologue {  // relu(x·scale + shift): the BN-apply + ReLU of the unit that produced x (fp32 [C] each)
  at::Tensor scale, shift;
};
std::optional<FpropOut> fprop(const UnitSpec& u, const at::Tensor& x, const at::Tensor& w,
                              const std::optional<Prologue>& prologue, const std::optional<Sums>& sums,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              bool relu);
// Zeroed fp32 (Σ, Σ²) buffers for fprop graphs with channel counts `channels`, from one buffer and one fill (each
// [C] view 16-byte aligned, as cuDNN reads its operands): a block's forward zeroes all its units' sums at once.
std::vector<Sums> zeroed_sums(const at::Tensor& like, const std::vector<int64_t>& channels);

// The unit below's BN as its backward reads it: the mask [a·scale + shift > 0] (the forward's BN-apply) and
// x̂ = (a − mean)·rstd for Σdz·x̂ (fp32 [C] each).
struct BelowBN {
  at::Tensor scale, shift, mean, rstd;
};
// dz = dReLU(dgrad(dy, w)) with the mask of the unit below (a: its pre-BN output), that unit's Σdz and Σdz·x̂
// (fp32 [C]), and r = relu(a·scale + shift) in the activations' dtype (this unit's conv input, for its wgrad).
// The sums accumulate into `into` (zeroed: zeroed_sums, {Σdz, Σdz·x̂}) where given, else into two buffers zeroed
// here: a sum the block op returns as dγ or dβ itself must own its storage.
struct DgradOut {
  at::Tensor dz, sum_dz, sum_dz_xhat, r;
};
std::optional<DgradOut> dgrad_drelu_sums(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& w,
                                         const at::Tensor& a, const BelowBN& below,
                                         const std::optional<Sums>& into);

// dw = wgrad(dy, x) in w's layout and dtype.
std::optional<at::Tensor> wgrad(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w);

// Builds a request's description without a GPU and runs cudnn-frontend's validate(): {"" or its message, the
// description as cudnn-frontend's JSON}.
std::pair<std::string, std::string> validate(const Request& r);

// Deviceless engine check for the GPU described by cuDNN's device-properties JSON, on any machine. The SM version
// comes from the properties; r.deterministic keeps deterministic engines only. verdict:
//   "plan"     a precompiled engine's plan was built (no device needed)
//   "runtime"  a runtime-compiled engine passes cuDNN's support check (its plan compiles with NVRTC and loads on
//              the GPU; with `compile`, compiled here too: the build then stops only at loading, for want of a GPU)
//   "none"     cuDNN has no engine for the graph; detail: cuDNN's reasons
//   "unknown"  this environment cannot answer: no engine without runtime compilation, and runtime-compiled ones
//              were not considered (no CUDA driver library to load here)
//   "error"    the properties or the description were refused; detail says which
// detail: the engine's name, or why not.
std::pair<std::string, std::string> support(const std::string& device_properties, const Request& r, bool compile);
// The current GPU's properties as cuDNN's JSON (needs the GPU).
std::string device_properties();

// Per graph label: calls that ran fused, calls that fell back, plans built and the milliseconds they took.
struct Tally {
  int64_t fused = 0, fallback = 0, built = 0;
  double build_ms = 0;
};
std::vector<std::pair<std::string, Tally>> tallies();
// Every key without a graph (no engine, execution failed, refused), with why.
std::vector<std::tuple<std::string, std::string>> unsupported();
void reset();

}  // namespace fusion
}  // namespace fused_resnet
