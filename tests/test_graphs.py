"""CUDA graphs readiness: a converted model's whole training step, and its eval, can be captured and replayed.

On the CPU: a fused training step (forward, backward, running statistics, SGD step) reads no tensor value on the
host through the dispatcher (no .item(), bool(tensor): what a capture forbids), on every backend (with synchronised
BN too: tests/test_distributed.py). On a GPU: torch.cuda.graph capture of a whole step, and torch.compile
mode="reduce-overhead", replayed steps against eager steps; capture of eval (BN folded into the conv weights,
tests/backends/test_folding.py on the CPU), replayed after the weights and running statistics change."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_resnet

from conftest import GPU, requires_gpu

BACKENDS = ["reference", "triton", "cuda"]
_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _model(shortcut: str, backend: str, momentum=0.1):
    model = fused_resnet.models.cifar_resnet(8, shortcut, num_classes=4, width=4, backend=backend)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    return model


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_training_step_reads_nothing_on_the_host(backend, shortcut, momentum):
    model = _model(shortcut, backend, momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    _step(model, opt, x, y)  # a first step outside: optimiser state, caches
    with _HostReads() as reads:
        _step(model, opt, x, y)
    assert reads.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_eval_reads_nothing_on_the_host(backend, monkeypatch):
    """Eval, the BN fold included: a first call (entries made), a refold after in-place changes, and a call as
    inside a capture (the query patched: every unit refolds) read no tensor value on the host."""
    model = _model("B", backend).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        with _HostReads() as reads:
            model(x)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.mul_(1.5)
            model(x)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with _HostReads() as capture_reads:
            model(x)
    assert reads.calls == [] and capture_reads.calls == []


def _data(steps, device):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 16, 16, generator=g).to(device), torch.randint(0, 4, (8,), generator=g).to(device))
            for _ in range(steps)]


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_captured_training_step_replays_like_eager_steps(backend):
    """torch.cuda.graph of forward + backward + SGD step (the pattern of torch's CUDA graphs documentation): warm-up
    on a side stream (autotuning and compilation happen there, never inside the capture), capture, replay."""
    device = torch.device("cuda")
    eager = _model("B", backend).to(device)
    graphed = copy.deepcopy(eager)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, graphed)]
    data = _data(6, device)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = copy.deepcopy(graphed)
        warm_opt = torch.optim.SGD(warm.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            _step(warm, warm_opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opts[1].zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.cross_entropy(graphed(static_x), static_y)
        loss.backward()
        opts[1].step()
    # the capture ran nothing: replay from the start, next to eager steps on the same data
    graphed.load_state_dict(eager.state_dict())
    for x, y in data:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        _step(eager, opts[0], x, y)
    torch.cuda.synchronize()
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


_GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device,backend", [
    ("cpu", "reference"),
    pytest.param("cuda", "cuda", marks=_GPU_ONLY),
    pytest.param("cuda", "triton", marks=_GPU_ONLY),
])
def test_reduce_overhead_compile_matches_eager(device, backend):
    """torch.compile(mode="reduce-overhead", fullgraph=True): train steps (forward, backward, running statistics)
    then eval calls, against eager. On a CPU inductor traces and lowers the same graphs without CUDA graphs; on a
    GPU every graph must also be captured (no cudagraph skip: a host read, a CPU tensor or an unsupported input
    mutation in a fused op would make inductor run it uncaptured)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _model("B", backend).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, compiled_model)]
    for x, y in _data(3, device):
        torch.compiler.cudagraph_mark_step_begin()
        losses = []
        for run, opt in ((eager, opts[0]), (compiled, opts[1])):
            loss = torch.nn.functional.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        for x, _ in _data(2, device):
            torch.compiler.cudagraph_mark_step_begin()
            torch.testing.assert_close(compiled(x).clone(), eager(x), rtol=1e-4, atol=1e-5)
    if device == "cuda":
        assert counters["inductor"]["cudagraph_skips"] == 0, "a graph ran without CUDA graphs (TORCH_LOGS=perf_hints)"


def _change_in_place(model, scale):
    """Every conv weight, BN affine parameter and running statistic of ``model`` changed in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(-scale)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(scale)
                m.bias.add_(0.1 * scale)
                m.running_mean.add_(0.2 * scale)
                m.running_var.mul_(scale)


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_captured_eval_replays_current_weights_and_running_statistics(backend, dtype):
    """Eval of a converted bottleneck (projection shortcut: four folded units) captured with torch.cuda.CUDAGraph:
    each replay computes what torch's eager block computes from the state of that moment — after in-place changes
    of the weights and running statistics, after an eager call in between (which refolds in place, so the graph
    still reads live memory) and after load_state_dict."""
    import torchvision

    from fused_resnet import testing

    device, dt = torch.device("cuda"), testing.DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1, 2, bias=False), torch.nn.BatchNorm2d(64))
    tv = testing.randomize_batchnorm(torchvision.models.resnet.Bottleneck(32, 16, 2, downsample), gen).eval()
    fused = fused_resnet.convert(copy.deepcopy(tv), backend=backend).to(device, dt).eval()
    static_x = torch.randn(4, 32, 14, 14, generator=gen).to(device, dt).contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():  # autotuning, compilation, cuDNN plans, the fold cache's entries
        for _ in range(3):
            fused(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = fused(static_x)

    def check(label):
        twin = copy.deepcopy(tv)
        twin.load_state_dict(fused.state_dict())
        oracle = copy.deepcopy(twin).to(device, torch.float64)
        torch_same = twin.to(device, dt)
        graph.replay()
        with torch.no_grad():
            ref64 = oracle(static_x.double())
            c = testing.check(label, static_y, ref64, torch_same(static_x), ref64, dt)
        assert c.ok, c.row()
        return static_y.clone()

    first = check("replay")
    _change_in_place(fused, 1.5)
    moved = check("replay after in-place changes")
    assert not torch.equal(first, moved)
    _change_in_place(fused, 0.8)
    with torch.no_grad():
        fused(static_x)  # an eager call between replays refolds in place
    check("replay after an eager refold")
    other = testing.randomize_batchnorm(copy.deepcopy(tv), torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    fused.load_state_dict(other.state_dict())
    check("replay after load_state_dict")
