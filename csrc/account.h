// The launch account's C++ side: on meta tensors (a dry run: shapes, no data) the extension's launchers, convs and
// fusion graphs run no kernel and record each launch instead — its name, kind, the bytes of every distinct tensor
// it reads and writes once, and its FLOPs (2 × MACs, tensor-core work only). The records are the block ops' own
// launch sequence, taken by fused_resnet.backends.cuda into fused_resnet.launches after each dry-run call.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <vector>

namespace fused_resnet {
namespace account {

struct Record {
  std::string name, kind;  // kind: conv, gemm, elementwise, reduction, graph, copy (fused_resnet.launches)
  int64_t reads = 0, writes = 0, flops = 0;
};

// Records one launch when its outputs are meta tensors, or while this thread records real launches too
// (set_recording; undefined tensors are skipped, a tensor listed twice counts once); otherwise does nothing.
void launch(const char* name, const char* kind, std::initializer_list<at::Tensor> reads,
            std::initializer_list<at::Tensor> writes, int64_t flops = 0);
// The same from lists (the fusion graphs' bindings).
void launch(const std::string& name, const char* kind, const std::vector<at::Tensor>& reads,
            const std::vector<at::Tensor>& writes, int64_t flops = 0);
// 2·MACs of a convolution with filter sizes w ([K, C/groups, R, S]) and output sizes y ([N, K, P, Q]).
int64_t conv_flops(at::IntArrayRef w, at::IntArrayRef y);
// This thread's records since the last take(), in launch order.
std::vector<Record> take();
// Whether this thread records the launches of real (not meta) calls as well; returns the previous setting. A run
// on real tensors then records exactly what its dry run on meta tensors records (the account cannot drift).
bool set_recording(bool on);

}  // namespace account
}  // namespace fused_resnet
