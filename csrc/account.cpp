// The launch account's records (account.h).
#include "account.h"

#include <unordered_set>

namespace fused_resnet {
namespace account {
namespace {

thread_local std::vector<Record> t_records;
thread_local bool t_recording = false;

int64_t distinct_bytes(const std::vector<at::Tensor>& ts) {
  std::unordered_set<const void*> seen;  // meta tensors share address 0: a tensor is its TensorImpl
  int64_t bytes = 0;
  for (const at::Tensor& t : ts) {
    if (t.defined() && seen.insert(t.unsafeGetTensorImpl()).second) bytes += t.numel() * t.element_size();
  }
  return bytes;
}

bool dry(const std::vector<at::Tensor>& writes) {
  for (const at::Tensor& t : writes) {
    if (t.defined()) return t.is_meta();
  }
  return false;
}

}  // namespace

void launch(const std::string& name, const char* kind, const std::vector<at::Tensor>& reads,
            const std::vector<at::Tensor>& writes, int64_t flops) {
  if (!t_recording && !dry(writes)) return;
  t_records.push_back({name, kind, distinct_bytes(reads), distinct_bytes(writes), flops});
}

void launch(const char* name, const char* kind, std::initializer_list<at::Tensor> reads,
            std::initializer_list<at::Tensor> writes, int64_t flops) {
  launch(std::string(name), kind, std::vector<at::Tensor>(reads), std::vector<at::Tensor>(writes), flops);
}

int64_t conv_flops(at::IntArrayRef w, at::IntArrayRef y) {
  int64_t macs = 1;
  for (int64_t v : y) macs *= v;  // N·K·P·Q
  for (size_t d = 1; d < w.size(); ++d) macs *= w[d];  // (C/groups)·R·S
  return 2 * macs;
}

bool set_recording(bool on) {
  const bool previous = t_recording;
  t_recording = on;
  return previous;
}

std::vector<Record> take() {
  std::vector<Record> out;
  out.swap(t_records);
  return out;
}

}  // namespace account
}  // namespace fused_resnet
