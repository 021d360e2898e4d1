// cuDNN runtime-fusion graphs for the block ops: see cudnn_fusion.h for what each graph computes.
//
// cudnn-frontend is header-only; it reaches cuDNN through dlopen/dlsym (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING),
// bound here to the libcudnn.so.9 torch has already loaded, so the extension links no cuDNN of its own and uses
// exactly torch's. The handle is ATen's (per device and thread, bound to the current stream).
//
// Why these graph forms (measured deviceless for sm_90 with cuDNN 9.24 and cudnn-frontend 1.32; docs/CUDA.md):
// the BN statistics are two fp32 ADD reductions of the conv output, not the frontend's genstats node, whose math
// precision reaches cuDNN as the wrong enum (the runtime-fusion engine refuses it in bfloat16); the unit below's
// Σdz, Σdz·x̂ are reductions too, not dbn_weight (whose engines take half filters only); the wgrad reads a plain
// operand because cuDNN's wgrad with a BN-apply prologue exists for half inputs with half scales only — the dgrad
// graph, which applies the same BN for its ReLU mask, writes that operand instead.
#include "cudnn_fusion.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <exception>
#include <thread>
#include <unordered_map>

#include "account.h"
#include "ops.h"  // shape_str

#ifdef FUSED_RESNET_WITH_CUDNN_FRONTEND
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cudnn_frontend.h>
#include <dlfcn.h>

namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;  // declared by cudnn-frontend's shim; set by load_cudnn()
}  // namespace cudnn_frontend
#endif

namespace fused_resnet {
namespace fusion {

const char* graph_name(Graph g) {
  switch (g) {
    case Graph::kFprop: return "fprop";
    case Graph::kDgrad: return "dgrad";
    case Graph::kWgrad: return "wgrad";
  }
  return "?";
}

std::string label(Graph g, int64_t features) {
  std::string s = graph_name(g);
  if (features & kPrologue) s += "+prologue";
  if (features & kStats) s += "+stats";
  if (features & kBias) s += "+bias";
  if (features & kResidual) s += "+residual";
  if (features & kRelu) s += "+relu";
  if (g == Graph::kDgrad) s += "+drelu+dbn";
  return s;
}

namespace {

constexpr auto kNHWC = at::MemoryFormat::ChannelsLast;

std::array<std::atomic<int>, kGraphs> g_refused{};
std::atomic<bool> g_cpu_twins{false};

std::mutex g_tally_mutex;
std::map<std::string, Tally> g_tallies;           // by graph label
std::map<std::string, std::string> g_unsupported;  // key → why it has no graph

void count(const std::string& lbl, bool fused) {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  Tally& t = g_tallies[lbl];
  ++(fused ? t.fused : t.fallback);
}

void remember_unsupported(const std::string& k, const std::string& why) {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  g_unsupported[k] = why;
}

std::string join(at::IntArrayRef v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "x" : "") + std::to_string(v[i]);
  return s;
}

std::array<int64_t, 2> conv_out(at::IntArrayRef x, at::IntArrayRef w, const UnitSpec& u) {
  std::array<int64_t, 2> out{};
  for (int d = 0; d < 2; ++d) {
    out[d] = (x[2 + d] + 2 * u.padding[d] - u.dilation[d] * (w[2 + d] - 1) - 1) / u.stride[d] + 1;
  }
  return out;
}

std::vector<int64_t> conv_out_sizes(at::IntArrayRef x, at::IntArrayRef w, const UnitSpec& u) {
  const auto pq = conv_out(x, w, u);
  return {x[0], w[0], pq[0], pq[1]};
}

// cuDNN reads operands with vector loads: every pointer 16-byte aligned, every tensor dense in its layout.
at::Tensor dense(const at::Tensor& t, at::MemoryFormat fmt) {
  at::Tensor c = t.contiguous(fmt);
  if (!c.is_meta() && reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone(fmt);
  if (!c.is_same(t)) account::launch("dense copy for cuDNN", "copy", {t}, {c});
  return c;
}

at::Tensor vec32(const at::Tensor& v) { return dense(v.to(at::kFloat), at::MemoryFormat::Contiguous); }


int64_t capacity_from_env() {
  const char* v = std::getenv("FUSED_RESNET_CUDNN_PLAN_CACHE");
  return v != nullptr && std::atoll(v) > 0 ? std::atoll(v) : 2048;
}
std::atomic<int64_t> g_capacity{capacity_from_env()};

}  // namespace

bool deterministic_now() {
  return at::globalContext().deterministicAlgorithms() || at::globalContext().deterministicCuDNN();
}

bool stats_in_graph(const UnitSpec& u) { return u.batch_stats && !deterministic_now(); }

std::string key(const Request& r, const at::Device& device) {
  const UnitSpec& u = r.unit;
  return label(r.graph, r.features) + " " + c10::toString(r.dtype) + " x" + join(r.x) + " w" + join(r.w) + " s" +
         join(u.stride) + " p" + join(u.padding) + " d" + join(u.dilation) + " " + device.str() +
         (r.deterministic ? " deterministic" : "");
}

std::string key_on(const Request& r, const at::Tensor& x) { return key(r, x.device()); }

void set_refused(Graph g, Refusal at) { g_refused[static_cast<int>(g)].store(static_cast<int>(at)); }
bool set_cpu_twins(bool on) { return g_cpu_twins.exchange(on); }
int64_t set_capacity(int64_t keys) {
  TORCH_CHECK_VALUE(keys >= 1, "cudnn fusion: the plan cache needs room for at least one key, got ", keys);
  return g_capacity.exchange(keys);
}

std::vector<std::pair<std::string, Tally>> tallies() {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  return {g_tallies.begin(), g_tallies.end()};
}

std::vector<std::tuple<std::string, std::string>> unsupported() {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  return {g_unsupported.begin(), g_unsupported.end()};
}

namespace {

// Why a unit's conv may not use fusion graphs, from what the graphs need of the configuration (not the device).
std::optional<std::string> config_ineligible(const at::Tensor& x, const at::Tensor& w, const UnitSpec& u,
                                             bool graphs) {
  if (!graphs) return std::string("cuDNN fusion graphs off (backend cuda-unfused)");
  if (!built()) return "cudnn fusion " + build_info();
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) {
    const std::string name = x.scalar_type() == at::kFloat ? "float32" : c10::toString(x.scalar_type());
    return "dtype " + name + " (the fusion graphs run float16 and bfloat16)";
  }
  if (w.scalar_type() != x.scalar_type()) return std::string("weight dtype differs from the input's");
  if (x.dim() != 4) return std::string("not a 2-D convolution");
  if (u.groups != 1) return std::string("grouped convolution");
  if (u.sync_group != 0) return std::string("synchronised BatchNorm (its statistics cross processes)");
  if (x.size(0) == 0) return std::string("empty batch");
  return std::nullopt;
}

}  // namespace

std::optional<std::string> ineligible(const at::Tensor& x, const at::Tensor& w, const UnitSpec& u, bool graphs) {
  if (auto why = config_ineligible(x, w, u, graphs)) return why;
  // meta tensors: the launch account's dry run, which counts each unit's graphs as planned for the GPU
  if (!x.is_cuda() && !x.is_meta() && !(x.is_cpu() && g_cpu_twins.load())) {
    return std::string("tensors on ") + x.device().str() + " (cuDNN runs on CUDA tensors)";
  }
  return std::nullopt;
}

std::vector<Request> block_requests(const BlockSpec& spec, const at::Tensor& x, at::TensorList weights, bool graphs,
                                    bool train) {
  TORCH_CHECK(x.dim() == 4 && weights.size() == spec.units.size(), "cudnn fusion: expected a 4-D input and one "
              "weight per unit (", spec.units.size(), "), got ", shape_str(x.sizes()), " and ", weights.size());
  const size_t n = spec.units.size(), n_main = spec.n_main();
  std::vector<std::vector<int64_t>> in(n);  // each unit's conv input sizes
  std::vector<bool> eligible(n);
  for (size_t i = 0; i < n; ++i) {
    const bool reads_below = i > 0 && i < n_main;
    in[i] = reads_below ? conv_out_sizes(in[i - 1], weights[i - 1].sizes(), spec.units[i - 1]) : x.sizes().vec();
    if (!reads_below && spec.units[i].avg_pool > 1) {  // the conv reads the block input pooled (ceil_mode)
      const int64_t k = spec.units[i].avg_pool;
      in[i][2] = pooled_size(in[i][2], k);
      in[i][3] = pooled_size(in[i][3], k);
    }
    eligible[i] = !config_ineligible(x, weights[i], spec.units[i], graphs);
  }
  std::vector<Request> out;
  const bool deterministic = deterministic_now();
  auto add = [&](size_t i, Graph g, int64_t features) {
    if (eligible[i]) {
      out.push_back({g, features, in[i], weights[i].sizes().vec(), spec.units[i], x.scalar_type(), deterministic,
                     static_cast<int64_t>(i)});
    }
  };
  if (train) {  // block_forward, then block_backward
    for (size_t i = 0; i < n; ++i) {
      const bool reads_below = i > 0 && i < n_main;
      add(i, Graph::kFprop, (reads_below ? kPrologue : 0) | (stats_in_graph(spec.units[i]) ? kStats : 0));
    }
    if (spec.shortcut == Shortcut::kProjection) add(n_main, Graph::kWgrad, 0);
    for (size_t i = n_main; i-- > 0;) {
      if (i > 0 && eligible[i - 1]) add(i, Graph::kDgrad, 0);
      add(i, Graph::kWgrad, 0);
    }
    return out;
  }
  // block_inference: the projection (its output is the closing unit's shortcut), the chain, the closing unit
  if (spec.shortcut == Shortcut::kProjection) add(n_main, Graph::kFprop, kBias);
  for (size_t i = 0; i + 1 < n_main; ++i) add(i, Graph::kFprop, kBias | kRelu);
  if (spec.shortcut != Shortcut::kOptionA) {  // option A's zero-padded shortcut closes in the extension's kernel
    // an open block's closing unit ends in its BN (no shortcut, no ReLU: its module closes the block)
    const bool open = spec.shortcut == Shortcut::kOpen;
    add(n_main - 1, Graph::kFprop,
        kBias | (open ? 0 : kRelu) | (spec.shortcut == Shortcut::kNone || open ? 0 : kResidual));
  }
  return out;
}

std::vector<Sums> zeroed_sums(const at::Tensor& like, const std::vector<int64_t>& channels) {
  int64_t total = 0;
  for (int64_t c : channels) total += 2 * ((c + 3) / 4 * 4);
  const at::Tensor buffer = at::zeros({std::max<int64_t>(total, 1)}, like.options().dtype(at::kFloat));
  account::launch("zero the sums", "elementwise", {}, {buffer});
  std::vector<Sums> out;
  int64_t offset = 0;
  for (int64_t c : channels) {
    const int64_t stride = (c + 3) / 4 * 4;
    out.push_back({buffer.narrow(0, offset, c), buffer.narrow(0, offset + stride, c)});
    offset += 2 * stride;
  }
  return out;
}

#ifdef FUSED_RESNET_WITH_CUDNN_FRONTEND

namespace fe = cudnn_frontend;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

namespace {

// Binds cudnn-frontend to the cuDNN in this process (torch's); nullopt when it could.
std::optional<std::string> load_cudnn() {
  static const std::optional<std::string> why = []() -> std::optional<std::string> {
    void* handle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);
    if (handle == nullptr) handle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
    if (handle == nullptr) return std::string("libcudnn.so.9 could not be opened: ") + dlerror();
    cudnn_frontend::cudnn_dlhandle = handle;
    return std::nullopt;
  }();
  return why;
}

fe::DataType_t io_type(at::ScalarType t) {
  return t == at::kBFloat16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
}

// A graph description and its tensors by role ("x", "w", "y", ...).
struct Description {
  std::shared_ptr<fe::graph::Graph> graph = std::make_shared<fe::graph::Graph>();
  std::map<std::string, TensorAttr> t;
  int64_t workspace = 0;

  fe::DataType_t io;
  bool deterministic = false;

  explicit Description(at::ScalarType dtype, bool deterministic_ = false)
      : io(io_type(dtype)), deterministic(deterministic_) {
    graph->set_io_data_type(io)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
  }

  // [N, C, H, W] (or [K, C, R, S]) in NHWC order
  TensorAttr activation(const std::string& role, at::IntArrayRef d) {
    return t[role] = graph->tensor(fe::graph::Tensor_attributes()
                                       .set_name(role)
                                       .set_dim({d[0], d[1], d[2], d[3]})
                                       .set_stride({d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]}));
  }

  // fp32 [C] per-channel vector
  TensorAttr channels(const std::string& role, int64_t C) {
    return t[role] = graph->tensor(fe::graph::Tensor_attributes()
                                       .set_name(role)
                                       .set_dim({1, C, 1, 1})
                                       .set_stride({C, 1, C, C})
                                       .set_data_type(fe::DataType_t::FLOAT));
  }

  void output(const std::string& role, const TensorAttr& v, at::IntArrayRef d) {
    v->set_output(true).set_dim({d[0], d[1], d[2], d[3]}).set_stride({d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]});
    t[role] = v;
  }

  void channels_output(const std::string& role, const TensorAttr& v, int64_t C) {
    v->set_output(true).set_dim({1, C, 1, 1}).set_stride({C, 1, C, C}).set_data_type(fe::DataType_t::FLOAT);
    t[role] = v;
  }

  TensorAttr pointwise(const TensorAttr& a, const TensorAttr& b, fe::PointwiseMode_t mode) {
    return graph->pointwise(a, b, fe::graph::Pointwise_attributes().set_mode(mode));
  }

  TensorAttr relu(const TensorAttr& a) {
    return graph->pointwise(a, fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::RELU_FWD));
  }

  // a·scale + shift: a BN applied as the forward's per-channel affine map
  TensorAttr affine(const TensorAttr& a, int64_t C) {
    return pointwise(pointwise(a, channels("scale", C), fe::PointwiseMode_t::MUL), channels("shift", C),
                     fe::PointwiseMode_t::ADD);
  }

  // Σ over N, H, W per channel, accumulated in fp32, written as `role` (into zeros: the engines may accumulate
  // with atomics, unless a deterministic reduction is asked for)
  void channel_sum(const std::string& role, const TensorAttr& v, int64_t C) {
    channels_output(role, graph->reduction(v, fe::graph::Reduction_attributes()
                                                  .set_mode(fe::ReductionMode_t::ADD)
                                                  .set_compute_data_type(fe::DataType_t::FLOAT)
                                                  .set_is_deterministic(deterministic)),
                    C);
  }
};

template <typename Attr>
Attr conv_attributes(const UnitSpec& u) {
  return Attr()
      .set_padding({u.padding[0], u.padding[1]})
      .set_stride({u.stride[0], u.stride[1]})
      .set_dilation({u.dilation[0], u.dilation[1]});
}

Description describe_fprop(const Request& r) {
  const int64_t f = r.features;
  TORCH_CHECK(!((f & kStats) && (f & (kBias | kResidual | kRelu))), "cudnn fusion: an fprop graph with "
              "statistics writes the plain conv output (no bias, residual or ReLU after it)");
  Description d(r.dtype, r.deterministic);
  const std::vector<int64_t> y = conv_out_sizes(r.x, r.w, r.unit);
  TensorAttr operand = d.activation("x", r.x);
  if (f & kPrologue) {  // rounded to the activations' dtype, as the unfused path stores r
    operand = d.relu(d.affine(operand, r.x[1]));
    operand->set_data_type(d.io);
  }
  TensorAttr out = d.graph->conv_fprop(operand, d.activation("w", r.w),
                                       conv_attributes<fe::graph::Conv_fprop_attributes>(r.unit));
  if (f & kStats) {
    d.output("y", out, y);
    d.channel_sum("sum", out, r.w[0]);
    d.channel_sum("sq_sum", d.pointwise(out, out, fe::PointwiseMode_t::MUL), r.w[0]);
    return d;
  }
  if (f & kBias) out = d.pointwise(out, d.channels("bias", r.w[0]), fe::PointwiseMode_t::ADD);
  if (f & kResidual) out = d.pointwise(out, d.activation("residual", y), fe::PointwiseMode_t::ADD);
  if (f & kRelu) out = d.relu(out);
  d.output("y", out, y);
  return d;
}

// r.x: the dgrad output's sizes (the unit below's activations a)
Description describe_dgrad(const Request& r) {
  Description d(r.dtype, r.deterministic);
  const std::vector<int64_t> dy = conv_out_sizes(r.x, r.w, r.unit);
  const int64_t C = r.x[1];
  TensorAttr dx = d.graph->conv_dgrad(d.activation("dy", dy), d.activation("w", r.w),
                                      conv_attributes<fe::graph::Conv_dgrad_attributes>(r.unit));
  dx->set_dim({r.x[0], r.x[1], r.x[2], r.x[3]});
  const TensorAttr a = d.activation("a", r.x);
  const TensorAttr pre = d.affine(a, C);  // the unit below's BN output, as its forward computed it
  const TensorAttr dz = d.pointwise(dx, pre, fe::PointwiseMode_t::RELU_BWD);
  d.output("dz", dz, r.x);
  const TensorAttr relu_out = d.relu(pre);
  relu_out->set_data_type(d.io);
  d.output("r", relu_out, r.x);
  const TensorAttr xhat = d.pointwise(d.pointwise(a, d.channels("mean", C), fe::PointwiseMode_t::SUB),
                                      d.channels("rstd", C), fe::PointwiseMode_t::MUL);
  d.channel_sum("sum_dz", dz, C);
  d.channel_sum("sum_dz_xhat", d.pointwise(dz, xhat, fe::PointwiseMode_t::MUL), C);
  return d;
}

Description describe_wgrad(const Request& r) {
  Description d(r.dtype, r.deterministic);
  const std::vector<int64_t> dy = conv_out_sizes(r.x, r.w, r.unit);
  TensorAttr dw = d.graph->conv_wgrad(d.activation("dy", dy), d.activation("x", r.x),
                                      conv_attributes<fe::graph::Conv_wgrad_attributes>(r.unit));
  d.output("dw", dw, r.w);
  return d;
}

Description describe(const Request& r) {
  TORCH_CHECK(r.x.size() == 4 && r.w.size() == 4, "cudnn fusion: expected 4 sizes for x and for w");
  switch (r.graph) {
    case Graph::kFprop: return describe_fprop(r);
    case Graph::kDgrad: return describe_dgrad(r);
    case Graph::kWgrad: break;
  }
  return describe_wgrad(r);
}

std::string message(const char* step, fe::error_t e) { return std::string(step) + ": " + e.get_message(); }

// Validates d and builds its execution plan on the handle's GPU: "" when cuDNN has an engine, else the failing
// step and cuDNN's message.
std::string build_plans(Description& d, cudnnHandle_t handle) {
  fe::error_t e = d.graph->validate();
  if (e.is_bad()) return message("validate", e);
  if ((e = d.graph->build_operation_graph(handle)).is_bad()) return message("operation graph", e);
  if ((e = d.graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK})).is_bad()) {
    return message("heuristics", e);
  }
  if (d.deterministic) d.graph->deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
  if ((e = d.graph->check_support()).is_bad()) return message("support", e);
  if ((e = d.graph->build_plans()).is_bad()) return message("plans", e);
  if ((e = d.graph->get_workspace_size(d.workspace)).is_bad()) return message("workspace", e);
  return "";
}

// f()'s answer, or what it threw: cudnn-frontend reports through error_t, and through exceptions from deeper down
// (e.g. no CUDA device for the handle).
template <typename F>
std::string guarded(F f) {
  try {
    return f();
  } catch (const c10::Error& ex) {
    return std::string("building the graph threw: ") + ex.what_without_backtrace();
  } catch (const std::exception& ex) {
    return std::string("building the graph threw: ") + ex.what();
  }
}

// A graph's tensors by role for one call; the handles keep them alive until the call returns.
using Bindings = std::vector<std::pair<const char*, at::Tensor>>;

// The roles a graph writes (every other role it reads).
bool is_output(const std::string& role) {
  for (const char* out : {"y", "sum", "sq_sum", "dz", "r", "sum_dz", "sum_dz_xhat", "dw"}) {
    if (role == out) return true;
  }
  return false;
}

const at::Tensor& bound(const Bindings& b, const char* role) {
  for (const auto& [r, t] : b) {
    if (std::string(r) == role) return t;
  }
  TORCH_CHECK(false, "cudnn fusion: no tensor bound for role '", role, "'");
}

// The CPU twin of a request's graph: the same roles read and written, fp32 arithmetic, outputs rounded to the
// activations' dtype by the copy into them.
void run_twin(const Request& r, const Bindings& b) {
  const UnitSpec& u = r.unit;
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat); };
  const auto per_channel = [](const at::Tensor& v) { return v.view({1, -1, 1, 1}); };
  const auto channel_sum = [](const at::Tensor& t) { return t.sum({0, 2, 3}); };
  const std::array<int64_t, 2> none{0, 0};  // output padding
  switch (r.graph) {
    case Graph::kFprop: {
      at::Tensor x = f32(bound(b, "x"));
      if (r.features & kPrologue) {
        x = f32(at::relu(x * per_channel(bound(b, "scale")) + per_channel(bound(b, "shift"))).to(r.dtype));
      }
      at::Tensor y = at::convolution(x, f32(bound(b, "w")), std::nullopt, u.stride, u.padding, u.dilation, false,
                                     none, 1);
      if (r.features & kStats) {
        bound(b, "sum").copy_(channel_sum(y));
        bound(b, "sq_sum").copy_(channel_sum(y * y));
      }
      if (r.features & kBias) y = y + per_channel(bound(b, "bias"));
      if (r.features & kResidual) y = y + f32(bound(b, "residual"));
      if (r.features & kRelu) y = at::relu(y);
      bound(b, "y").copy_(y);
      return;
    }
    case Graph::kDgrad: {
      const at::Tensor a = f32(bound(b, "a"));
      const at::Tensor dx = std::get<0>(at::convolution_backward(
          f32(bound(b, "dy")), a, f32(bound(b, "w")), std::nullopt, u.stride, u.padding, u.dilation, false, none, 1,
          {true, false, false}));
      const at::Tensor pre = a * per_channel(bound(b, "scale")) + per_channel(bound(b, "shift"));
      const at::Tensor dz = at::where(pre > 0, dx, at::zeros_like(dx));
      const at::Tensor xhat = (a - per_channel(bound(b, "mean"))) * per_channel(bound(b, "rstd"));
      bound(b, "dz").copy_(dz);
      bound(b, "r").copy_(at::relu(pre));
      bound(b, "sum_dz").copy_(channel_sum(dz));
      bound(b, "sum_dz_xhat").copy_(channel_sum(dz * xhat));
      return;
    }
    case Graph::kWgrad: {
      const at::Tensor& dw = bound(b, "dw");
      dw.copy_(std::get<1>(at::convolution_backward(f32(bound(b, "dy")), f32(bound(b, "x")),
                                                    at::zeros(dw.sizes(), dw.options().dtype(at::kFloat)),
                                                    std::nullopt, u.stride, u.padding, u.dilation, false, none, 1,
                                                    {false, true, false})));
      return;
    }
  }
}

// A key's graph: built once (under its own lock), then shared by every call with that key.
struct Entry {
  std::mutex m;
  std::atomic<bool> attempted{false};
  std::shared_ptr<Description> d;  // the cuDNN graph and its plan
  bool twin = false;               // the CPU twin runs instead
  bool planned = false;            // meta tensors (the launch account): recorded, nothing runs
  std::string why;                 // no graph (the calls fall back)
  Request request;
  std::string k, lbl;
  bool usable() const { return d != nullptr || twin || planned; }
};

// The bounded cache: key → entry, least recently used first out. Evicting an entry in use is safe (the callers
// hold it).
std::mutex g_cache_mutex;
std::list<std::string> g_lru;  // most recent first
std::unordered_map<std::string, std::pair<std::shared_ptr<Entry>, std::list<std::string>::iterator>> g_cache;

bool capturing(const at::Device& device) {
  return device.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

std::shared_ptr<Entry> find_or_insert(const std::string& k, const Request& r, const at::Device& device) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto it = g_cache.find(k);
  if (it != g_cache.end()) {
    g_lru.splice(g_lru.begin(), g_lru, it->second.second);
    return it->second.first;
  }
  TORCH_CHECK(!capturing(device), "cudnn fusion: no plan for ", k, " while a CUDA graph is being captured (a plan "
              "is never built inside a capture): run the model once with these shapes before capturing, or call "
              "fused_resnet.backends.cuda.warm_up(model, x)");
  auto e = std::make_shared<Entry>();
  e->request = r;
  e->k = k;
  e->lbl = label(r.graph, r.features);
  g_lru.push_front(k);
  g_cache.emplace(k, std::make_pair(e, g_lru.begin()));
  while (static_cast<int64_t>(g_cache.size()) > g_capacity.load()) {
    g_cache.erase(g_lru.back());
    g_lru.pop_back();
  }
  return e;
}

void build(Entry& e, const at::Device& device) {
  const auto start = std::chrono::steady_clock::now();
  if (device.is_meta()) {
    e.planned = true;
  } else if (!device.is_cuda()) {
    if (g_cpu_twins.load()) {
      e.twin = true;
    } else {
      e.why = "tensors on " + device.str() + ": no cuDNN graph runs on them";
    }
  } else if (auto no_cudnn = load_cudnn()) {
    e.why = *no_cudnn;
  } else {
    const c10::DeviceGuard guard(device);
    e.why = guarded([&] {
      e.d = std::make_shared<Description>(describe(e.request));
      return build_plans(*e.d, at::native::getCudnnHandle());
    });
    if (!e.why.empty()) e.d = nullptr;
  }
  e.attempted = true;
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  if (e.usable()) {
    Tally& t = g_tallies[e.lbl];
    ++t.built;
    t.build_ms += ms;
  } else {
    g_unsupported[e.k] = e.why;
  }
}

// The entry with a usable graph for request r on `device`, or nullptr: the call falls back, counted.
std::shared_ptr<Entry> graph_for(const Request& r, const at::Device& device) {
  const std::string lbl = label(r.graph, r.features);
  if (g_refused[static_cast<int>(r.graph)] == static_cast<int>(Refusal::kAtBuild)) {
    count(lbl, false);
    return nullptr;
  }
  std::shared_ptr<Entry> e = find_or_insert(key(r, device), r, device);
  std::lock_guard<std::mutex> lock(e->m);
  if (!e->attempted) build(*e, device);
  if (!e->usable()) {
    count(lbl, false);
    return nullptr;
  }
  return e;
}

// Runs the entry's graph on these tensors: true when it ran; false when its execution failed, which removes the
// graph from this key for good (remembered with cuDNN's message) and counts the call as a fallback.
bool execute(Entry& e, const Bindings& bindings, const at::Device& device) {
  std::vector<at::Tensor> reads, writes;
  for (const auto& [role, tensor] : bindings) (is_output(role) ? writes : reads).push_back(tensor);
  const std::vector<int64_t> y = conv_out_sizes(e.request.x, e.request.w, e.request.unit);
  account::launch("cudnn " + e.lbl, "graph", reads, writes, account::conv_flops(e.request.w, y));
  if (e.planned) {
    count(e.lbl, true);
    return true;
  }
  std::shared_ptr<Description> d;
  {
    std::lock_guard<std::mutex> lock(e.m);
    d = e.d;
  }
  if (!e.twin && d == nullptr) {  // another call's execution failed meanwhile
    count(e.lbl, false);
    return false;
  }
  std::string failed;
  if (g_refused[static_cast<int>(e.request.graph)] == static_cast<int>(Refusal::kAtExecute)) {
    failed = "refused at execution (fusion_set_refused)";
  } else if (e.twin) {
    run_twin(e.request, bindings);
  } else {
    std::unordered_map<TensorAttr, void*> pack;
    for (const auto& [role, tensor] : bindings) {
      auto it = d->t.find(role);
      TORCH_CHECK(it != d->t.end(), "cudnn fusion ", e.lbl, ": the graph has no tensor '", role, "'");
      pack[it->second] = const_cast<void*>(tensor.const_data_ptr());
    }
    const at::Tensor workspace =
        at::empty({std::max<int64_t>(d->workspace, 1)}, at::TensorOptions().dtype(at::kByte).device(device));
    fe::error_t status = d->graph->execute(at::native::getCudnnHandle(), pack, workspace.data_ptr());
    if (status.is_bad()) failed = status.get_message();
  }
  if (!failed.empty()) {  // this key keeps no graph: its later calls fall back at once
    std::lock_guard<std::mutex> lock(e.m);
    e.d = nullptr;
    e.twin = false;
    e.why = "executing the built graph failed: " + failed;
    remember_unsupported(e.k, e.why);
    count(e.lbl, false);
    return false;
  }
  count(e.lbl, true);
  return true;
}

at::Tensor activation_like(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().memory_format(kNHWC));
}

// The dgrad graph's two reductions accumulate into their outputs: both start from zero. Two buffers, not one: the
// block ops return these sums as dγ and dβ, and an op's outputs may not share storage.
std::pair<at::Tensor, at::Tensor> zeroed_grad_sums(const at::Tensor& x, int64_t C) {
  std::pair<at::Tensor, at::Tensor> sums{at::zeros({C}, x.options().dtype(at::kFloat)),
                                         at::zeros({C}, x.options().dtype(at::kFloat))};
  account::launch("zero a sum", "elementwise", {}, {sums.first});
  account::launch("zero a sum", "elementwise", {}, {sums.second});
  return sums;
}

// What the caller passes is checked before cuDNN reads it: a wrong size would be an out-of-bounds read there.
at::Tensor channels_arg(const char* what, const at::Tensor& v, int64_t C) {
  TORCH_CHECK(v.numel() == C, "cudnn fusion: expected ", what, " with ", C, " values (one per channel), got ",
              v.numel());
  return vec32(v);
}

Request request_for(Graph g, int64_t features, const at::Tensor& x, at::IntArrayRef w_sizes, const UnitSpec& u) {
  return {g, features, x.sizes().vec(), w_sizes.vec(), u, x.scalar_type(), deterministic_now()};
}

}  // namespace

bool built() { return true; }

std::string build_info() {
  return "cudnn-frontend " + std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." + std::to_string(CUDNN_FRONTEND_PATCH_VERSION);
}

std::optional<FpropOut> fprop(const UnitSpec& u, const at::Tensor& x, const at::Tensor& w,
                              const std::optional<Prologue>& prologue, const std::optional<Sums>& sums,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              bool relu) {
  const c10::OptionalDeviceGuard guard(x.device());  // plans, handle and workspace on x's device
  const int64_t features = (prologue ? kPrologue : 0) | (sums ? kStats : 0) | (bias ? kBias : 0) |
                           (residual ? kResidual : 0) | (relu ? kRelu : 0);
  const at::Tensor xc = dense(x, kNHWC), wc = dense(w, kNHWC);
  auto e = graph_for(request_for(Graph::kFprop, features, xc, wc.sizes(), u), xc.device());
  if (e == nullptr) return std::nullopt;
  const int64_t C = xc.size(1), K = wc.size(0);
  FpropOut out;
  out.y = activation_like(xc, conv_out_sizes(xc.sizes(), wc.sizes(), u));
  Bindings b{{"x", xc}, {"w", wc}, {"y", out.y}};
  if (prologue) {
    b.emplace_back("scale", channels_arg("the prologue's scale", prologue->scale, C));
    b.emplace_back("shift", channels_arg("the prologue's shift", prologue->shift, C));
  }
  if (sums) {
    TORCH_CHECK(sums->sum.numel() == K && sums->sq_sum.numel() == K, "cudnn fusion: expected the sums' buffers "
                "with ", K, " values (one per output channel)");
    out.sum = sums->sum;
    out.sq_sum = sums->sq_sum;
    b.insert(b.end(), {{"sum", out.sum}, {"sq_sum", out.sq_sum}});
  }
  if (bias) b.emplace_back("bias", channels_arg("the bias", *bias, K));
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.y.sizes(), "cudnn fusion: expected the shortcut with sizes ",
                shape_str(out.y.sizes()), " (the block output's), got ", shape_str(residual->sizes()));
    b.emplace_back("residual", dense(residual->to(xc.scalar_type()), kNHWC));
  }
  if (!execute(*e, b, xc.device())) return std::nullopt;
  return out;
}

std::optional<DgradOut> dgrad_drelu_sums(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& w,
                                         const at::Tensor& a, const BelowBN& below,
                                         const std::optional<Sums>& into) {
  const c10::OptionalDeviceGuard guard(a.device());
  const at::Tensor dyc = dense(dy, kNHWC), wc = dense(w, kNHWC), ac = dense(a, kNHWC);
  auto e = graph_for(request_for(Graph::kDgrad, 0, ac, wc.sizes(), u), ac.device());
  if (e == nullptr) return std::nullopt;
  const int64_t C = ac.size(1);
  DgradOut out{activation_like(ac, ac.sizes()), {}, {}, activation_like(ac, ac.sizes())};
  if (into) {
    TORCH_CHECK(into->sum.numel() == C && into->sq_sum.numel() == C, "cudnn fusion: expected dgrad sums of ", C,
                " channels");
    out.sum_dz = into->sum;
    out.sum_dz_xhat = into->sq_sum;
  } else {
    std::tie(out.sum_dz, out.sum_dz_xhat) = zeroed_grad_sums(ac, C);
  }
  const Bindings b{{"dy", dyc}, {"w", wc}, {"a", ac},
                   {"scale", channels_arg("the scale", below.scale, C)},
                   {"shift", channels_arg("the shift", below.shift, C)},
                   {"mean", channels_arg("the mean", below.mean, C)},
                   {"rstd", channels_arg("rstd", below.rstd, C)},
                   {"dz", out.dz}, {"r", out.r}, {"sum_dz", out.sum_dz}, {"sum_dz_xhat", out.sum_dz_xhat}};
  if (!execute(*e, b, ac.device())) return std::nullopt;
  return out;
}

std::optional<at::Tensor> wgrad(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w) {
  const c10::OptionalDeviceGuard guard(x.device());
  const at::Tensor dyc = dense(dy, kNHWC), xc = dense(x, kNHWC);
  auto e = graph_for(request_for(Graph::kWgrad, 0, xc, w.sizes(), u), xc.device());
  if (e == nullptr) return std::nullopt;
  const at::Tensor dw = activation_like(xc, w.sizes());
  if (!execute(*e, {{"dy", dyc}, {"x", xc}, {"dw", dw}}, xc.device())) return std::nullopt;
  return dw.contiguous(w.suggest_memory_format());
}

namespace {

// Threads for building several plans at once: NVRTC's compile of a runtime-compiled engine (1–2 s, CPU-bound)
// dominates a build, and one block asks for several (FUSED_RESNET_CUDNN_BUILD_THREADS; 1 builds in the caller).
size_t build_threads(size_t jobs) {
  const char* v = std::getenv("FUSED_RESNET_CUDNN_BUILD_THREADS");
  const size_t wanted = v != nullptr && std::atoll(v) > 0 ? static_cast<size_t>(std::atoll(v))
                                                           : std::min<size_t>(std::thread::hardware_concurrency(), 16);
  return std::max<size_t>(1, std::min(wanted, jobs));
}

}  // namespace

std::vector<std::string> prepare(const std::vector<Request>& requests, const at::Tensor& x) {
  const at::Device device = x.device();
  std::vector<std::shared_ptr<Entry>> entries;
  for (const Request& r : requests) entries.push_back(find_or_insert(key_on(r, x), r, device));
  // Each thread builds on its own cuDNN handle (ATen's, per thread and device) under its own device guard; what one
  // throws is rethrown here once every thread has stopped.
  std::atomic<size_t> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto work = [&] {
    try {
      const c10::OptionalDeviceGuard guard(device);
      for (size_t i = next++; i < entries.size(); i = next++) {
        std::lock_guard<std::mutex> lock(entries[i]->m);
        if (!entries[i]->attempted) build(*entries[i], device);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (size_t t = 1; t < build_threads(entries.size()); ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (failure) std::rethrow_exception(failure);
  std::vector<std::string> none;
  for (const auto& e : entries) {
    if (!e->usable()) none.push_back(e->k + ": " + e->why);
  }
  return none;
}

std::vector<std::string> missing(const std::vector<Request>& requests, const at::Tensor& x) {
  std::vector<std::string> out;
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  for (const Request& r : requests) {
    const std::string k = key_on(r, x);
    auto it = g_cache.find(k);
    if (it == g_cache.end() || !it->second.first->attempted) out.push_back(k);
  }
  return out;
}

std::pair<std::string, std::string> validate(const Request& r) {
  if (auto no_cudnn = load_cudnn()) return {*no_cudnn, ""};
  Description d = describe(r);
  fe::error_t e = d.graph->validate();
  return {e.is_good() ? "" : e.get_message(), d.graph->print()};
}

std::string device_properties() {
  if (auto no_cudnn = load_cudnn()) return *no_cudnn;
  fe::DeviceProperties props;
  fe::error_t e = props.set_device_id(static_cast<int32_t>(c10::cuda::current_device())).build();
  TORCH_CHECK(e.is_good(), "cudnn fusion: reading the device's properties failed: ", e.get_message());
  std::vector<uint8_t> buf;
  e = props.serialize(buf);
  TORCH_CHECK(e.is_good(), "cudnn fusion: serialising the device's properties failed: ", e.get_message());
  return std::string(buf.begin(), buf.end());
}

namespace {

// Whether a CUDA driver library can be loaded here: without one, cuDNN does not consider its runtime-compiled
// engines at all (NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING), so "no engine" cannot be told from "not asked".
bool driver_loadable() {
  static const bool loadable = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_GLOBAL) != nullptr;
  return loadable;
}

bool runtime_compiled(const Description& d, int64_t i) {
  std::vector<fe::BehaviorNote_t> notes;
  if (d.graph->get_behavior_notes_for_plan_at_index(i, notes).is_bad()) return false;
  for (auto n : notes) {
    if (n == fe::BehaviorNote_t::RUNTIME_COMPILATION) return true;
  }
  return false;
}

std::string plan_name(const Description& d, int64_t i) {
  std::string name;
  return d.graph->get_plan_name_at_index(i, name).is_good() ? name : "engine config " + std::to_string(i);
}

}  // namespace

std::pair<std::string, std::string> support(const std::string& device_properties, const Request& r, bool compile) {
  if (auto no_cudnn = load_cudnn()) return {"unknown", *no_cudnn};
  int64_t sm = 0;
  try {
    sm = nlohmann::json::parse(device_properties).at("deviceVer").get<int64_t>() / 10;  // 900 → sm_90
  } catch (const std::exception& ex) {
    return {"error", std::string("device properties: no deviceVer read (") + ex.what() + ")"};
  }
  std::pair<std::string, std::string> verdict;
  const std::string why = guarded([&]() -> std::string {
    auto props = std::make_shared<fe::DeviceProperties>();
    fe::error_t e = props->deserialize(std::vector<uint8_t>(device_properties.begin(), device_properties.end()));
    if (e.is_bad()) {
      verdict = {"error", message("device properties", e)};
      return "";
    }
    Description d(r.dtype, r.deterministic);
    try {
      d = describe(r);
    } catch (const c10::Error& ex) {
      verdict = {"error", std::string("description: ") + ex.what_without_backtrace()};
      return "";
    }
    // Without the SM version check_support() asks cudaGetDevice: no GPU here, or the wrong one on a GPU machine.
    d.graph->set_device_properties(props).set_sm_version(static_cast<int32_t>(sm));
    if ((e = d.graph->validate()).is_bad()) {
      verdict = {"error", message("validate", e)};
      return "";
    }
    if ((e = d.graph->build_operation_graph()).is_bad()) return message("operation graph", e);
    if ((e = d.graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK})).is_bad()) {
      return message("heuristics", e);
    }
    if (r.deterministic) d.graph->deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
    if ((e = d.graph->check_support()).is_bad()) return message("support", e);
    std::string reasons;
    for (int64_t i = 0; i < d.graph->get_execution_plan_count(); ++i) {
      if (runtime_compiled(d, i)) {
        if (!compile) {
          verdict = {"runtime", plan_name(d, i)};
          return "";
        }
        e = d.graph->build_plan_at_index(i);
        // the build compiles with NVRTC, then loads the module: only the load needs the GPU
        if (e.is_good() || e.get_message().find("cuLibraryLoad") != std::string::npos) {
          verdict = {"runtime", plan_name(d, i) + " (compiled; loading it needs the GPU)"};
          return "";
        }
      } else if ((e = d.graph->build_plan_at_index(i)).is_good()) {
        verdict = {"plan", plan_name(d, i)};
        return "";
      }
      reasons += "\n" + plan_name(d, i) + ": " + e.get_message();
    }
    return "no engine configuration passed" + reasons;
  });
  if (!verdict.first.empty()) return verdict;
  if (!driver_loadable()) {
    return {"unknown", "no CUDA driver library here, so cuDNN did not consider its runtime-compiled engines; " + why};
  }
  return {"none", why};
}

void reset() {
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache.clear();
    g_lru.clear();
  }
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  g_tallies.clear();
  g_unsupported.clear();
}

#else  // built without cudnn-frontend: nothing is eligible (ineligible() says why), so no runner is reached

bool built() { return false; }

std::string build_info() {
  return "not built: cudnn-frontend's headers were not found at build time (pip install nvidia-cudnn-frontend, "
         "then rebuild; or set FUSED_RESNET_CUDNN_FRONTEND_INCLUDE)";
}

std::optional<FpropOut> fprop(const UnitSpec&, const at::Tensor&, const at::Tensor&, const std::optional<Prologue>&,
                              const std::optional<Sums>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, bool) {
  return std::nullopt;
}

std::optional<DgradOut> dgrad_drelu_sums(const UnitSpec&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const BelowBN&, const std::optional<Sums>&) {
  return std::nullopt;
}

std::optional<at::Tensor> wgrad(const UnitSpec&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return std::nullopt;
}

std::vector<std::string> prepare(const std::vector<Request>&, const at::Tensor&) { return {}; }
std::vector<std::string> missing(const std::vector<Request>&, const at::Tensor&) { return {}; }

std::pair<std::string, std::string> validate(const Request&) { return {build_info(), ""}; }

std::string device_properties() { return build_info(); }

std::pair<std::string, std::string> support(const std::string&, const Request&, bool) {
  return {"unknown", build_info()};
}

void reset() {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  g_tallies.clear();
  g_unsupported.clear();
}

#endif

}  // namespace fusion
}  // namespace fused_resnet
