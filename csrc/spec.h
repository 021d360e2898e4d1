// A residual block's configuration apart from its tensors: the C++ twin of fused_resnet/spec.py.
//
// The block ops take the spec as two flat schema lists written by fused_resnet.spec.BlockSpec (`ints`, `floats`):
//   ints   = [dim, shortcut, option_a_stride_h, option_a_stride_w, units,
//             per unit: stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w, groups, batch_stats,
//                       update_running, sync_group, avg_pool]
//   floats = [per unit: eps, momentum (NaN: None)]
// `BlockSpec::parse` reads them once per op call into one struct. tests/test_spec.py checks that the tables below
// (enum values, list layout) are the Python ones.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <vector>

namespace fused_resnet {

// What the block adds before its final ReLU (fused_resnet.spec.Shortcut). kOpen: y = bn(a_last), no shortcut and
// no final ReLU (the module closes the block in torch), so its backward starts from dz = dy, unmasked.
enum class Shortcut : int64_t { kNone = 0, kIdentity = 1, kProjection = 2, kOptionA = 3, kTensor = 4, kOpen = 5 };

// What a closing epilogue adds to its result (fused_resnet.spec.Residual; the Triton kernels' RES_MODE).
enum Residual : int { kResidualNone = 0, kResidualTensor = 1, kResidualAffine = 2, kResidualOptionA = 3 };

constexpr int64_t kSpecHeaderInts = 5;
constexpr int64_t kSpecUnitInts = 11;
constexpr int64_t kSpecUnitFloats = 2;

struct UnitSpec {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
  bool batch_stats;
  double eps;
  int64_t sync_group;  // 0, or the process group (fused_resnet.distributed) the BN statistics are reduced over
  // 1, or k: the conv reads the block input average-pooled, AvgPool2d(k, k, ceil_mode=True,
  // count_include_pad=False) (timm's "-d" shortcut); only a unit that reads the block input (the first, the projection)
  int64_t avg_pool;
};

// The size AvgPool2d(k, k, ceil_mode=True) makes of `size` (>= 1): every window starts inside
// (fused_resnet.spec.pooled_size).
inline int64_t pooled_size(int64_t size, int64_t k) { return (size + k - 1) / k; }

struct BlockSpec {
  std::vector<UnitSpec> units;
  Shortcut shortcut;
  std::array<int64_t, 2> option_a_stride;

  size_t n_main() const { return shortcut == Shortcut::kProjection ? units.size() - 1 : units.size(); }
  // Whether unit i's conv reads the block input (the first unit, the projection), not the unit below's output.
  bool reads_input(size_t i) const { return i == 0 || i == n_main(); }
  bool final_relu() const { return shortcut != Shortcut::kOpen; }
  bool synced() const {
    for (const auto& u : units) {
      if (u.sync_group != 0) return true;
    }
    return false;
  }

  // Checks the lists' layout and values; `op` names the caller in error messages.
  static BlockSpec parse(const char* op, at::IntArrayRef ints, at::ArrayRef<double> floats) {
    TORCH_CHECK(ints.size() >= static_cast<size_t>(kSpecHeaderInts), op, ": malformed block spec (", ints.size(),
                " ints)");
    const int64_t n = ints[4];
    TORCH_CHECK(n >= 1 && ints.size() == static_cast<size_t>(kSpecHeaderInts + kSpecUnitInts * n) &&
                    floats.size() == static_cast<size_t>(kSpecUnitFloats * n),
                op, ": malformed block spec: ", ints.size(), " ints and ", floats.size(), " floats for ", n,
                " unit(s)");
    TORCH_CHECK(ints[1] >= 0 && ints[1] <= static_cast<int64_t>(Shortcut::kOpen), op,
                ": unknown shortcut kind ", ints[1],
                " (0 none, 1 identity, 2 projection, 3 option A, 4 tensor, 5 open)");
    BlockSpec spec;
    spec.shortcut = static_cast<Shortcut>(ints[1]);
    spec.option_a_stride = {ints[2], ints[3]};
    TORCH_CHECK(spec.shortcut != Shortcut::kProjection || n >= 2, op,
                ": a projection shortcut needs its unit after the main path's");
    TORCH_CHECK(spec.shortcut != Shortcut::kOptionA || (ints[2] > 0 && ints[3] > 0), op,
                ": option A needs two positive strides");
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* v = ints.data() + kSpecHeaderInts + kSpecUnitInts * i;
      UnitSpec u{{v[0], v[1]}, {v[2], v[3]}, {v[4], v[5]}, v[6], v[7] != 0, floats[kSpecUnitFloats * i], v[9], v[10]};
      TORCH_CHECK(u.groups >= 1, op, ": unit ", i, " has groups ", u.groups);
      TORCH_CHECK(u.avg_pool >= 1, op, ": unit ", i, " has avg_pool ", u.avg_pool);
      spec.units.push_back(u);
    }
    // backward takes a pooled first unit's gradient back through its pool as the input's whole gradient
    // (fused_resnet.spec.BlockSpec has the same rule)
    for (size_t i = 0; i < spec.units.size(); ++i) {
      const bool first_alone = i != 0 || spec.shortcut == Shortcut::kNone || spec.shortcut == Shortcut::kTensor ||
                               spec.shortcut == Shortcut::kOpen;
      TORCH_CHECK(spec.units[i].avg_pool == 1 || (spec.reads_input(i) && first_alone), op, ": unit ", i,
                  " has avg_pool ", spec.units[i].avg_pool, " (only the projection, or the first unit where no "
                  "shortcut reads the block input, pools it)");
    }
    return spec;
  }
};

}  // namespace fused_resnet
