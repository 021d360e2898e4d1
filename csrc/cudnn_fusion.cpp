// cuDNN runtime-fusion graphs for the block ops: see cudnn_fusion.h for what each graph computes.
//
// cudnn-frontend is header-only; it reaches cuDNN through dlopen/dlsym (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING),
// bound here to the libcudnn.so.9 torch has already loaded, so the extension links no cuDNN of its own and uses
// exactly torch's. The handle is ATen's (per device and thread, bound to the current stream).
#include "cudnn_fusion.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "ops.h"  // shape_str

#ifdef FUSED_RESNET_WITH_CUDNN_FRONTEND
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAFunctions.h>
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

namespace {

constexpr auto kNHWC = at::MemoryFormat::ChannelsLast;

std::atomic<bool> g_enabled{[] {
  const char* v = std::getenv("FUSED_RESNET_CUDNN_FUSION");
  return v == nullptr || std::string(v) != "0";
}()};
std::array<std::atomic<bool>, kGraphs> g_refused{};
std::atomic<bool> g_cpu_probe{false};

struct Tally {
  int64_t fused = 0, fallback = 0;
};
std::mutex g_tally_mutex;
std::map<std::string, Tally> g_tallies;           // by graph label
std::map<std::string, std::string> g_unsupported;  // key → cuDNN's message

void count(const std::string& label, bool fused) {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  Tally& t = g_tallies[label];
  ++(fused ? t.fused : t.fallback);
}

// The feature words of a graph's label, in one fixed order.
std::string features_label(Graph g, bool prologue, bool stats, bool bias, bool residual, bool relu) {
  std::string s = graph_name(g);
  if (prologue) s += "+prologue";
  if (stats) s += "+stats";
  if (bias) s += "+bias";
  if (residual) s += "+residual";
  if (relu) s += "+relu";
  if (g == Graph::kDgrad) s += "+drelu+dbn";
  return s;
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

// cuDNN reads operands with vector loads: every pointer 16-byte aligned, every tensor dense in its layout.
at::Tensor dense(const at::Tensor& t, at::MemoryFormat fmt) {
  at::Tensor c = t.contiguous(fmt);
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone(fmt);
}

at::Tensor vec32(const at::Tensor& v) { return dense(v.to(at::kFloat), at::MemoryFormat::Contiguous); }

}  // namespace

std::string key(const std::string& label, at::IntArrayRef x_sizes, at::IntArrayRef w_sizes,
                const UnitSpec& u, at::ScalarType dtype, int64_t device) {
  return label + " " + c10::toString(dtype) + " x" + join(x_sizes) + " w" + join(w_sizes) + " s" +
         join(u.stride) + " p" + join(u.padding) + " d" + join(u.dilation) + " dev" + std::to_string(device);
}

bool set_enabled(bool on) { return g_enabled.exchange(on); }
bool enabled() { return g_enabled.load(); }
void set_refused(Graph g, bool refused) { g_refused[static_cast<int>(g)].store(refused); }
bool set_cpu_probe(bool on) { return g_cpu_probe.exchange(on); }

std::vector<std::tuple<std::string, int64_t, int64_t>> tallies() {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  std::vector<std::tuple<std::string, int64_t, int64_t>> out;
  for (const auto& [label, t] : g_tallies) out.emplace_back(label, t.fused, t.fallback);
  return out;
}

std::vector<std::tuple<std::string, std::string>> unsupported() {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  return {g_unsupported.begin(), g_unsupported.end()};
}

std::optional<std::string> ineligible(const at::Tensor& x, const at::Tensor& w, const UnitSpec& u) {
  if (!built()) return "cudnn fusion " + build_info();
  if (!enabled()) return std::string("cudnn fusion switched off (FUSED_RESNET_CUDNN_FUSION=0 or set_enabled)");
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) {
    const std::string name = x.scalar_type() == at::kFloat ? "float32" : c10::toString(x.scalar_type());
    return "dtype " + name + " (the fusion graphs run float16 and bfloat16)";
  }
  if (w.scalar_type() != x.scalar_type()) return std::string("weight dtype differs from the input's");
  if (x.dim() != 4) return std::string("not a 2-D convolution");
  if (u.groups != 1) return std::string("grouped convolution");
  if (u.sync_group != 0) return std::string("synchronised BatchNorm (its statistics cross processes)");
  if (!x.is_cuda() && !(x.is_cpu() && g_cpu_probe.load())) {
    return std::string("tensors on ") + x.device().str() + " (cuDNN runs on CUDA tensors)";
  }
  if (x.size(0) == 0) return std::string("empty batch");
  return std::nullopt;
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

  explicit Description(at::ScalarType dtype) : io(io_type(dtype)) {
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

  // relu(x·scale + shift), rounded to the activations' dtype as the unfused path stores r (and as the tensor
  // cores read it)
  TensorAttr prologue(const TensorAttr& x, int64_t C) {
    TensorAttr v = pointwise(x, channels("scale", C), fe::PointwiseMode_t::MUL);
    v = pointwise(v, channels("shift", C), fe::PointwiseMode_t::ADD);
    v = graph->pointwise(v, fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::RELU_FWD));
    v->set_data_type(io);
    return v;
  }
};

template <typename Attr>
Attr conv_attributes(const UnitSpec& u) {
  return Attr()
      .set_padding({u.padding[0], u.padding[1]})
      .set_stride({u.stride[0], u.stride[1]})
      .set_dilation({u.dilation[0], u.dilation[1]});
}

struct FpropFeatures {
  bool prologue, stats, bias, residual, relu;
};

Description describe_fprop(const FpropFeatures& f, at::IntArrayRef x, at::IntArrayRef w, const UnitSpec& u,
                           at::ScalarType dtype) {
  TORCH_CHECK(!(f.stats && (f.bias || f.residual || f.relu)), "cudnn fusion: an fprop graph with statistics writes "
              "the plain conv output (no bias, residual or ReLU after it)");
  Description d(dtype);
  const auto pq = conv_out(x, w, u);
  const std::array<int64_t, 4> y{x[0], w[0], pq[0], pq[1]};
  TensorAttr operand = d.activation("x", x);
  if (f.prologue) operand = d.prologue(operand, x[1]);
  TensorAttr out =
      d.graph->conv_fprop(operand, d.activation("w", w), conv_attributes<fe::graph::Conv_fprop_attributes>(u));
  if (f.stats) {
    d.output("y", out, y);
    auto [sum, sq_sum] = d.graph->genstats(out, fe::graph::Genstats_attributes());
    d.channels_output("sum", sum, w[0]);
    d.channels_output("sq_sum", sq_sum, w[0]);
    return d;
  }
  if (f.bias) out = d.pointwise(out, d.channels("bias", w[0]), fe::PointwiseMode_t::ADD);
  if (f.residual) out = d.pointwise(out, d.activation("residual", y), fe::PointwiseMode_t::ADD);
  if (f.relu) {
    out = d.graph->pointwise(out, fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::RELU_FWD));
  }
  d.output("y", out, y);
  return d;
}

// x: the dgrad output's sizes (the unit below's activations a)
Description describe_dgrad(at::IntArrayRef x, at::IntArrayRef w, const UnitSpec& u, at::ScalarType dtype) {
  Description d(dtype);
  const auto pq = conv_out(x, w, u);
  const std::array<int64_t, 4> dy{x[0], w[0], pq[0], pq[1]};
  TensorAttr dx = d.graph->conv_dgrad(d.activation("dy", dy), d.activation("w", w),
                                      conv_attributes<fe::graph::Conv_dgrad_attributes>(u));
  dx->set_dim({x[0], x[1], x[2], x[3]});
  // the unit below's BN output, (a − mean)·rstd·gamma + beta: the chain of cudnn-frontend's dgrad + dReLU + dBN
  // weight sample, the pattern its engines are known to fuse
  const TensorAttr a = d.activation("a", x);
  const TensorAttr mean = d.channels("mean", x[1]), rstd = d.channels("rstd", x[1]), gamma = d.channels("gamma", x[1]);
  TensorAttr pre = d.pointwise(a, mean, fe::PointwiseMode_t::SUB);
  pre = d.pointwise(pre, rstd, fe::PointwiseMode_t::MUL);
  pre = d.pointwise(pre, gamma, fe::PointwiseMode_t::MUL);
  pre = d.pointwise(pre, d.channels("beta", x[1]), fe::PointwiseMode_t::ADD);
  const TensorAttr dz = d.pointwise(dx, pre, fe::PointwiseMode_t::RELU_BWD);
  d.output("dz", dz, x);
  auto [dscale, dbias, eq_dy, eq_x, eq_bias] =
      d.graph->dbn_weight(dz, a, mean, rstd, gamma, fe::graph::DBN_weight_attributes());
  d.channels_output("sum_dz_xhat", dscale, x[1]);
  d.channels_output("sum_dz", dbias, x[1]);
  d.channels_output("eq_dy", eq_dy, x[1]);
  d.channels_output("eq_x", eq_x, x[1]);
  d.channels_output("eq_bias", eq_bias, x[1]);
  return d;
}

Description describe_wgrad(bool prologue, at::IntArrayRef x, at::IntArrayRef w, const UnitSpec& u,
                           at::ScalarType dtype) {
  Description d(dtype);
  const auto pq = conv_out(x, w, u);
  const std::array<int64_t, 4> dy{x[0], w[0], pq[0], pq[1]};
  TensorAttr operand = d.activation("x", x);
  if (prologue) operand = d.prologue(operand, x[1]);
  TensorAttr dw = d.graph->conv_wgrad(d.activation("dy", dy), operand,
                                      conv_attributes<fe::graph::Conv_wgrad_attributes>(u));
  d.output("dw", dw, w);
  return d;
}

std::string message(const char* step, fe::error_t e) {
  return std::string(step) + ": " + e.get_message();
}

// Validates d and builds its execution plans: "" when cuDNN has an engine, else the failing step and cuDNN's
// message. With a handle the plans are for that handle's GPU (and the workspace size is read); without one, for
// the device properties set on the graph (deviceless: no GPU needed).
std::string build_plans(Description& d, cudnnHandle_t handle) {
  fe::error_t e = d.graph->validate();
  if (e.is_bad()) return message("validate", e);
  e = handle != nullptr ? d.graph->build_operation_graph(handle) : d.graph->build_operation_graph();
  if (e.is_bad()) return message("operation graph", e);
  if ((e = d.graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK})).is_bad()) {
    return message("heuristics", e);
  }
  if ((e = d.graph->check_support()).is_bad()) return message("support", e);
  if ((e = d.graph->build_plans()).is_bad()) return message("plans", e);
  if (handle != nullptr && (e = d.graph->get_workspace_size(d.workspace)).is_bad()) return message("workspace", e);
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

// The built graph of a key, or nullptr when cuDNN has none (its message remembered in g_unsupported).
std::mutex g_cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Description>> g_cache;

template <typename Describe>
std::shared_ptr<Description> lookup(const std::string& k, const at::Device& device, Describe describe) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto it = g_cache.find(k);
  if (it != g_cache.end()) return it->second;
  std::string why;
  std::shared_ptr<Description> d;
  if (!device.is_cuda()) {  // the tests' CPU probe: never a plan for host memory, even where a GPU exists
    why = "tensors on " + device.str() + ": no cuDNN graph runs on them";
  } else if (auto no_cudnn = load_cudnn()) {
    why = *no_cudnn;
  } else {
    why = guarded([&] {
      d = std::make_shared<Description>(describe());
      return build_plans(*d, at::native::getCudnnHandle());
    });
  }
  if (!why.empty()) {
    d = nullptr;
    std::lock_guard<std::mutex> tally_lock(g_tally_mutex);
    g_unsupported[k] = why;
  }
  g_cache.emplace(k, d);
  return d;
}

// A graph's tensors by role for one call; the handles keep them alive until the call's execute returns.
using Bindings = std::vector<std::pair<const char*, at::Tensor>>;

void execute(const Description& d, const std::string& label, const Bindings& bindings, const at::Device& device) {
  std::unordered_map<TensorAttr, void*> pack;
  for (const auto& [role, tensor] : bindings) {
    auto it = d.t.find(role);
    TORCH_CHECK(it != d.t.end(), "cudnn fusion ", label, ": the graph has no tensor '", role, "'");
    pack[it->second] = const_cast<void*>(tensor.const_data_ptr());
  }
  const at::Tensor workspace =
      at::empty({std::max<int64_t>(d.workspace, 1)}, at::TensorOptions().dtype(at::kByte).device(device));
  fe::error_t e = d.graph->execute(at::native::getCudnnHandle(), pack, workspace.data_ptr());
  TORCH_CHECK(e.is_good(), "cudnn fusion ", label, ": executing the built graph failed: ", e.get_message());
}

at::Tensor activation_like(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().memory_format(kNHWC));
}

at::Tensor channels_like(const at::Tensor& x, int64_t C) { return at::empty({C}, x.options().dtype(at::kFloat)); }

}  // namespace

bool built() { return true; }

std::string build_info() {
  return "cudnn-frontend " + std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." + std::to_string(CUDNN_FRONTEND_PATCH_VERSION);
}

namespace {

// The built graph for x (the tensor whose sizes, dtype and device key it) and w's sizes, or nullptr when the graph
// is refused or has no engine: that call is counted as a fallback.
template <typename Describe>
std::shared_ptr<Description> graph_for(Graph g, const std::string& label, const at::Tensor& x, at::IntArrayRef w_sizes,
                                       const UnitSpec& u, Describe describe) {
  std::shared_ptr<Description> d;
  if (!g_refused[static_cast<int>(g)]) {
    d = lookup(key(label, x.sizes(), w_sizes, u, x.scalar_type(), x.get_device()), x.device(), describe);
  }
  if (d == nullptr) count(label, false);
  return d;
}

// What the caller passes is checked before cuDNN reads it: a wrong size would be an out-of-bounds read there.
at::Tensor channels_arg(const char* what, const at::Tensor& v, int64_t C) {
  TORCH_CHECK(v.numel() == C, "cudnn fusion: expected ", what, " with ", C, " values (one per channel), got ",
              v.numel());
  return vec32(v);
}

// The prologue's scale and shift for an operand of C channels, when there is one.
void bind_prologue(Bindings& b, const std::optional<Prologue>& prologue, int64_t C) {
  if (prologue) {
    b.emplace_back("scale", channels_arg("the prologue's scale", prologue->scale, C));
    b.emplace_back("shift", channels_arg("the prologue's shift", prologue->shift, C));
  }
}

}  // namespace

std::optional<FpropOut> fprop(const UnitSpec& u, const at::Tensor& x, const at::Tensor& w,
                              const std::optional<Prologue>& prologue, bool stats,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              bool relu) {
  const c10::OptionalDeviceGuard guard(x.device());  // plans, handle and workspace on x's device
  const FpropFeatures f{prologue.has_value(), stats, bias.has_value(), residual.has_value(), relu};
  const std::string label = features_label(Graph::kFprop, f.prologue, f.stats, f.bias, f.residual, f.relu);
  const at::Tensor xc = dense(x, kNHWC), wc = dense(w, kNHWC);
  auto d = graph_for(Graph::kFprop, label, xc, wc.sizes(), u,
                     [&] { return describe_fprop(f, xc.sizes(), wc.sizes(), u, xc.scalar_type()); });
  if (d == nullptr) return std::nullopt;
  const auto pq = conv_out(xc.sizes(), wc.sizes(), u);
  const int64_t C = xc.size(1), K = wc.size(0);
  FpropOut out;
  out.y = activation_like(xc, {xc.size(0), K, pq[0], pq[1]});
  Bindings b{{"x", xc}, {"w", wc}, {"y", out.y}};
  bind_prologue(b, prologue, C);
  if (stats) {
    out.sum = channels_like(xc, K);
    out.sq_sum = channels_like(xc, K);
    b.insert(b.end(), {{"sum", out.sum}, {"sq_sum", out.sq_sum}});
  }
  if (bias) b.emplace_back("bias", channels_arg("the bias", *bias, K));
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.y.sizes(), "cudnn fusion: expected the shortcut with sizes ",
                shape_str(out.y.sizes()), " (the block output's), got ", shape_str(residual->sizes()));
    b.emplace_back("residual", dense(residual->to(xc.scalar_type()), kNHWC));
  }
  execute(*d, label, b, xc.device());
  count(label, true);
  return out;
}

std::optional<DgradOut> dgrad_drelu_dbn(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& w,
                                        const at::Tensor& a, const BelowBN& below) {
  const c10::OptionalDeviceGuard guard(a.device());
  const std::string label = features_label(Graph::kDgrad, false, false, false, false, false);
  const at::Tensor dyc = dense(dy, kNHWC), wc = dense(w, kNHWC), ac = dense(a, kNHWC);
  auto d = graph_for(Graph::kDgrad, label, ac, wc.sizes(), u,
                     [&] { return describe_dgrad(ac.sizes(), wc.sizes(), u, ac.scalar_type()); });
  if (d == nullptr) return std::nullopt;
  const int64_t C = ac.size(1);
  DgradOut out{activation_like(ac, ac.sizes()), channels_like(ac, C), channels_like(ac, C)};
  execute(*d, label,
          {{"dy", dyc}, {"w", wc}, {"a", ac}, {"mean", channels_arg("the mean", below.mean, C)},
           {"rstd", channels_arg("rstd", below.rstd, C)}, {"gamma", channels_arg("gamma", below.gamma, C)},
           {"beta", channels_arg("beta", below.beta, C)}, {"dz", out.dz}, {"sum_dz", out.sum_dz},
           {"sum_dz_xhat", out.sum_dz_xhat}, {"eq_dy", channels_like(ac, C)}, {"eq_x", channels_like(ac, C)},
           {"eq_bias", channels_like(ac, C)}},
          ac.device());
  count(label, true);
  return out;
}

std::optional<at::Tensor> wgrad(const UnitSpec& u, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                const std::optional<Prologue>& prologue) {
  const c10::OptionalDeviceGuard guard(x.device());
  const std::string label = features_label(Graph::kWgrad, prologue.has_value(), false, false, false, false);
  const at::Tensor dyc = dense(dy, kNHWC), xc = dense(x, kNHWC);
  auto d = graph_for(Graph::kWgrad, label, xc, w.sizes(), u,
                     [&] { return describe_wgrad(prologue.has_value(), xc.sizes(), w.sizes(), u, xc.scalar_type()); });
  if (d == nullptr) return std::nullopt;
  const at::Tensor dw = activation_like(xc, w.sizes());
  Bindings b{{"dy", dyc}, {"x", xc}, {"dw", dw}};
  bind_prologue(b, prologue, xc.size(1));
  execute(*d, label, b, xc.device());
  count(label, true);
  return dw.contiguous(w.suggest_memory_format());
}

namespace {

Description describe(Graph g, int64_t features, at::IntArrayRef x_sizes, at::IntArrayRef w_sizes, const UnitSpec& u,
                     at::ScalarType dtype) {
  TORCH_CHECK(x_sizes.size() == 4 && w_sizes.size() == 4, "cudnn fusion: expected 4 sizes for x and for w");
  const bool prologue = features & kPrologue;
  switch (g) {
    case Graph::kFprop:
      return describe_fprop({prologue, bool(features & kStats), bool(features & kBias), bool(features & kResidual),
                             bool(features & kRelu)},
                            x_sizes, w_sizes, u, dtype);
    case Graph::kDgrad: return describe_dgrad(x_sizes, w_sizes, u, dtype);
    case Graph::kWgrad: break;
  }
  return describe_wgrad(prologue, x_sizes, w_sizes, u, dtype);
}

}  // namespace

std::pair<std::string, std::string> validate(Graph g, int64_t features, at::IntArrayRef x_sizes,
                                             at::IntArrayRef w_sizes, const UnitSpec& u, at::ScalarType dtype) {
  if (auto no_cudnn = load_cudnn()) return {*no_cudnn, ""};
  Description d = describe(g, features, x_sizes, w_sizes, u, dtype);
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

std::string support(const std::string& device_properties, Graph g, int64_t features, at::IntArrayRef x_sizes,
                    at::IntArrayRef w_sizes, const UnitSpec& u, at::ScalarType dtype) {
  if (auto no_cudnn = load_cudnn()) return *no_cudnn;
  return guarded([&] {
    auto props = std::make_shared<fe::DeviceProperties>();
    fe::error_t e = props->deserialize(std::vector<uint8_t>(device_properties.begin(), device_properties.end()));
    if (e.is_bad()) return message("device properties", e);
    Description d = describe(g, features, x_sizes, w_sizes, u, dtype);
    d.graph->set_device_properties(props);
    return build_plans(d, nullptr);
  });
}

void reset() {
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache.clear();
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
                              bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool) {
  return std::nullopt;
}

std::optional<DgradOut> dgrad_drelu_dbn(const UnitSpec&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const BelowBN&) {
  return std::nullopt;
}

std::optional<at::Tensor> wgrad(const UnitSpec&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<Prologue>&) {
  return std::nullopt;
}

std::pair<std::string, std::string> validate(Graph, int64_t, at::IntArrayRef, at::IntArrayRef, const UnitSpec&,
                                             at::ScalarType) {
  return {build_info(), ""};
}

std::string device_properties() { return build_info(); }

std::string support(const std::string&, Graph, int64_t, at::IntArrayRef, at::IntArrayRef, const UnitSpec&,
                    at::ScalarType) {
  return build_info();
}

void reset() {
  std::lock_guard<std::mutex> lock(g_tally_mutex);
  g_tallies.clear();
  g_unsupported.clear();
}

#endif

}  // namespace fusion
}  // namespace fused_resnet
