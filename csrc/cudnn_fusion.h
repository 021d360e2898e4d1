// cuDNN runtime-fusion graphs (cudnn-frontend's graph API) that the block ops (block.cpp) run in place of
// separate passes, per unit:
//   fprop   [relu(x·scale + shift) on the operand load] → conv → [genstats: Σy, Σy² per channel, fp32]
//                                                               | [+ bias][+ residual][ReLU]   (eval, BN folded)
//   dgrad   conv dgrad → dReLU with the mask of the unit below → dBN weight (that unit's Σdz, Σdz·x̂)
//   wgrad   [relu(x·scale + shift) on the operand load] → conv wgrad
// A graph is built once per key (graph, features, shapes, dtype, device) and kept with its execution plan. A key
// for which cuDNN offers no engine is remembered with cuDNN's message; its calls return nothing and are counted
// as fallbacks, and the caller runs the unfused path for that unit (never a different result). A built graph
// that then fails to execute raises: that is an error, not a missing engine.
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

// relu(x·scale + shift), the BN-apply + ReLU of the unit that produced x, computed on the conv's operand load
struct Prologue {
  at::Tensor scale, shift;  // fp32 [C]
};

// "cudnn-frontend <version>" when compiled with it, else "not built: <why>".
std::string build_info();
bool built();
// The process-wide switch (initially FUSED_RESNET_CUDNN_FUSION != "0"); returns the previous value.
bool set_enabled(bool on);
bool enabled();
// Tests' knobs. Refused: behave as if cuDNN had no engine for this graph (its calls fall back, counted). CPU
// probe: CPU tensors are eligible, so the block ops ask for graphs on a machine without a GPU, every build fails
// (no device) and every call takes the counted fallback: the bookkeeping and the fallback paths run in CI.
void set_refused(Graph g, bool refused);
bool set_cpu_probe(bool on);

// Why a unit's conv may not use fusion graphs for the block input x and the weight w; nullopt when it may.
std::optional<std::string> ineligible(const at::Tensor& x, const at::Tensor& w, const UnitSpec& u);

// y = conv(operand, w) [+ bias][+ residual][ReLU], with `stats` also Σy and Σy² per channel (fp32 [K]).
// nullopt: no engine for this key (counted); the caller computes it unfused.
struct FpropOut {
  at::Tensor y, sum, sq_sum;
};
std::optional<FpropOut> fprop(const UnitSpec& u, const at::Tensor& x, const at::Tensor& w,
                              const std::optional<Prologue>& prologue, bool stats,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              bool relu);

// The unit below's BN, as its backward reads it: the mask is (a − mean)·rstd·gamma + beta > 0 (fp32 [C] each).
struct BelowBN {
  at::Tensor mean, rstd, gamma, beta;
};

// dz = dReLU(dgrad(dy, w)) with the mask of the unit below (a: its pre-BN output, the conv's input before its
// BN-apply + ReLU), and that unit's BN sums Σdz and Σdz·x̂ (fp32 [C]).
struct DgradOut {
  at::Tensor dz, sum_dz, sum_dz_xhat;
};
std::optional<DgradOut> dgrad_drelu_dbn(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& w,
                                        const at::Tensor& a, const BelowBN& below);

// dw = wgrad(dy, operand) in w's layout and dtype.
std::optional<at::Tensor> wgrad(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                const std::optional<Prologue>& prologue);

// The key a graph is cached under: its label ("fprop+prologue+stats"), dtype, sizes, conv geometry, device.
std::string key(const std::string& label, at::IntArrayRef x_sizes, at::IntArrayRef w_sizes, const UnitSpec& u,
                at::ScalarType dtype, int64_t device);

// What an fprop graph adds to the conv (fusion_validate's `features`; the labels' words).
enum Feature : int64_t { kPrologue = 1, kStats = 2, kBias = 4, kResidual = 8, kRelu = 16 };

// Builds a graph's description without a GPU and runs cudnn-frontend's validate(): {"" or its message, the
// description as cudnn-frontend's JSON}. x_sizes: the conv input's (for dgrad, the unit below's activations);
// features: Feature bits (dgrad takes none, wgrad kPrologue).
std::pair<std::string, std::string> validate(Graph g, int64_t features, at::IntArrayRef x_sizes,
                                             at::IntArrayRef w_sizes, const UnitSpec& u, at::ScalarType dtype);

// Deviceless checks: the properties of the current GPU as cuDNN's JSON (needs the GPU), and, from such JSON on any
// machine, whether cuDNN has an engine for a graph on that GPU: "" or cuDNN's message (heuristics, support and
// plan build run without a device).
std::string device_properties();
std::string support(const std::string& device_properties, Graph g, int64_t features, at::IntArrayRef x_sizes,
                    at::IntArrayRef w_sizes, const UnitSpec& u, at::ScalarType dtype);

// Per graph label: calls that ran fused, calls that fell back; and every key without an engine, with why.
std::vector<std::tuple<std::string, int64_t, int64_t>> tallies();
std::vector<std::tuple<std::string, std::string>> unsupported();
void reset();

}  // namespace fusion
}  // namespace fused_resnet
