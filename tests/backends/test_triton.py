"""Backend "triton" (fused_resnet/backends/triton.py on kernels/conv.py).

Eval mode: blocks and converted models against torch with the float64 rule; one conv kernel per conv and nothing
else (no BN, ReLU or add kernels); the folded-BN cache never serves stale weights (load_state_dict, optimizer
steps, running statistics updated by training, a replaced parameter). Training mode (Triton convs, reference BN):
blocks through testing.compare_models. On a CPU the kernels run under TRITON_INTERPRET=1 (set in conftest)."""
import copy
import warnings

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import backends, models, testing
from fused_resnet.backends import folding, reference, registry, triton as triton_backend
from fused_resnet.spec import BlockSpec, UnitSpec

from conftest import GPU, MODELS, assert_checks, case_id, check_frozen_bn_and_no_input_grad, make_block, requires_gpu

DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPES = ["float32", "float16"] + (["bfloat16"] if GPU else [])


def _eval_check(reference_model, x, dtype, name="eval output", channels_last=False):
    """Eval-mode output of the triton-converted model vs torch in ``dtype``, both against float64 torch."""
    dt = testing.DTYPES[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch_same = copy.deepcopy(reference_model).to(DEVICE, dt).eval()
    fused = fused_resnet.convert(torch_same, backend="triton").eval()
    oracle = copy.deepcopy(reference_model).to(DEVICE, torch.float64).eval()
    with torch.no_grad():
        xl = x.to(DEVICE, dt).contiguous(memory_format=fmt)
        y = fused(xl)
        assert y.dtype == dt and y.shape == oracle(x.to(DEVICE, torch.float64)).shape
        if channels_last and y.dim() == 4:
            assert y.is_contiguous(memory_format=torch.channels_last)
        return testing.check(name, y, oracle(x.to(DEVICE, torch.float64)), torch_same(xl),
                             oracle(x.to(DEVICE, torch.float64)), dt)


def _randomized(model, seed=7):
    return testing.randomize_batchnorm(model, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", testing.BLOCK_CASES, ids=case_id)
def test_eval_block_matches_torch(case, dtype):
    n, h, w = case[5]
    x = torch.randn(n, case[1], h, w, generator=torch.Generator().manual_seed(3))
    c = _eval_check(_randomized(make_block(case, fused=False)), x, dtype, channels_last=case[0] == "bottleneck")
    assert c.ok, c.row()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape", [
    ("resnet18", (2, 3, 32, 32)), ("resnet50", (1, 3, 32, 32)), ("cifar20-A", (2, 3, 16, 16)),
    ("cifar20-B-1d", (2, 1, 40)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_eval_converted_models_match_torch(name, shape, dtype):
    if name == "resnet50" and dtype != "float32" and not GPU:
        pytest.skip("resnet50 runs once on the CPU interpreter (float32); every dtype on the GPU")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    c = _eval_check(_randomized(MODELS[name]()), x, dtype, name, channels_last=len(shape) == 4)
    assert c.ok, c.row()


def test_eval_runs_one_conv_kernel_per_conv_and_nothing_else(monkeypatch):
    """In eval mode every conv is one fused kernel (BN folded, ReLU / shortcut in its epilogue): the reference
    backend's BN-apply, conv and shortcut ops are never called."""
    from fused_resnet.kernels import conv as kernels

    calls = []
    real = kernels.conv_fprop
    monkeypatch.setattr(kernels, "conv_fprop", lambda *a, **k: calls.append(k) or real(*a, **k))
    triton_backend._kernels.cache_clear()
    for fn in ("bn_act", "conv", "option_a", "bn_stats", "block_forward"):
        monkeypatch.setattr(reference, fn, lambda *a, _fn=fn, **k: pytest.fail(f"reference.{_fn} called in eval"))
    model = _randomized(models.cifar_resnet(20, "B", backend="triton")).eval()
    for case in testing.BLOCK_CASES:  # every shortcut kind, plus a bottleneck
        block = fused_resnet.convert(make_block(case, fused=False), backend="triton").eval()
        n, h, w = case[5]
        calls.clear()
        with torch.no_grad():
            block(torch.randn(n, case[1], h, w))
        # the avg-pool shortcut's conv-BN ("tensor") is a one-unit open op of its own, its conv without ReLU, its
        # output entering the block's last epilogue
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in block.modules())
        assert len(calls) == convs, case_id(case)
        assert sum(bool(k.get("relu")) for k in calls) == len(calls) - (case[4] in ("B", "C", "tensor")), \
            case_id(case)
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    triton_backend._kernels.cache_clear()


def _eval_pair(seed=0):
    torch.manual_seed(seed)
    tv = _randomized(torchvision.models.resnet.BasicBlock(8, 8), seed)
    return tv, fused_resnet.convert(tv, backend="triton")


def _assert_same_eval(fused, tv, x):
    """The fused block's eval output agrees, within the float64 rule, with a torch block holding the fused block's
    current state (a stale folded weight is off by O(1))."""
    twin = copy.deepcopy(tv)
    twin.load_state_dict(fused.state_dict())
    fused.eval()
    twin.eval()
    with torch.no_grad():
        ref64 = copy.deepcopy(twin).double()(x.double())
        c = testing.check("eval output", fused(x), ref64, twin(x), ref64, torch.float32)
    assert c.ok, c.row()


def test_folded_weights_follow_load_state_dict_optimizer_steps_and_running_stats():
    tv, fused = _eval_pair()
    x = torch.randn(2, 8, 6, 6)
    _assert_same_eval(fused, tv, x)  # fills the cache
    assert len(folding._FOLD_CACHE) >= 2

    other, _ = _eval_pair(seed=1)  # new weights, γ, β and running statistics, copied in place
    fused.load_state_dict(other.state_dict())
    tv.load_state_dict(other.state_dict())
    _assert_same_eval(fused, tv, x)

    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(tv.parameters(), lr=0.1)
    for model, opt in ((fused, opt_f), (tv, opt_t)):  # a train step: weights and running statistics change
        model.train()
        model(x).square().sum().backward()
        opt.step()
    _assert_same_eval(fused, tv, x)

    with torch.no_grad():  # in-place edits of a single buffer / parameter
        fused.bn2.running_var.mul_(3.0)
        tv.bn2.running_var.mul_(3.0)
        fused.conv1.weight[0].neg_()
        tv.conv1.weight[0].neg_()
    _assert_same_eval(fused, tv, x)

    new_w = torch.nn.Parameter(torch.randn_like(tv.conv2.weight))  # a replaced parameter object
    fused.conv2.weight = new_w
    tv.conv2.weight = torch.nn.Parameter(new_w.detach().clone())
    _assert_same_eval(fused, tv, x)


def test_fold_cache_entries_die_with_their_tensors():
    tv, fused = _eval_pair()
    _assert_same_eval(fused, tv, torch.randn(2, 8, 6, 6))
    keys = [k for k in folding._FOLD_CACHE if id(fused.conv1.weight) in k]
    assert keys
    del fused, tv
    import gc

    gc.collect()
    assert not any(k in folding._FOLD_CACHE for k in keys)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", testing.BLOCK_CASES, ids=case_id)
def test_train_block_fused(case, dtype):
    """Training forward and backward fused on the Triton engine (BN statistics in the conv epilogue, BN + ReLU in
    the next conv's prologue, dBN in the dgrad / wgrad prologues, ReLU mask and Σ in the dgrad epilogue):
    every output, gradient and running statistic against float64 with the rule, every shortcut kind
    (bottlenecks in channels_last, basic blocks in NCHW: the outputs keep the input's layout either way)."""
    n, h, w = case[5]
    gen = torch.Generator().manual_seed(7)
    block = _randomized(make_block(case, fused=False))
    x = torch.randn(n, case[1], h, w, generator=gen)
    checks = testing.compare_models(
        block, lambda m: fused_resnet.convert(m, backend="triton", inplace=True), x, testing.DTYPES[dtype],
        DEVICE, channels_last=case[0] == "bottleneck", train_steps=2,
    )
    assert_checks(checks, f"{case_id(case)} {dtype}")


@pytest.mark.parametrize("name,shape", [("resnet18", (4, 3, 64, 64)), ("cifar20-A", (4, 3, 16, 16))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_train_converted_models_over_sgd_steps(name, shape):
    """Whole converted models on the fused training path: three train passes with SGD steps between them (lr
    0.01), then eval — outputs, input grad, every parameter grad, running statistics and eval output against
    float64 with the rule. (resnet18 at 64 px, batch 4: at 32 px, batch 2 its last stage normalises 2 values
    per channel and torch's own float32 error is O(1), which makes the rule meaningless.)"""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    checks = testing.compare_models(
        _randomized(MODELS[name]()), lambda m: fused_resnet.convert(m, backend="triton", inplace=True), x,
        torch.float32, DEVICE, channels_last=True, train_steps=3, lr=0.01,
    )
    assert_checks(checks, name)


@pytest.mark.parametrize("case", [testing.BLOCK_CASES[i] for i in (0, 1, 6, 7)], ids=case_id)
def test_saved_for_backward_is_the_design_minimum(case):
    """Bytes autograd keeps for a fused block's backward, parameters aside: x, the pre-BN conv outputs, y and
    per-channel fp32 vectors only — no BN output, no ReLU output, no mask (DESIGN §1)."""
    n, h, w = case[5]
    block = fused_resnet.convert(make_block(case, fused=False), backend="triton").train()
    x = torch.randn(n, case[1], h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
    total, design, eager_total = testing.saved_bytes_vs_design(block, x)
    assert total <= design < eager_total, (total, design, eager_total)  # eager keeps BN and ReLU outputs too


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_train_block_under_autocast(dtype):
    """float32 modules under torch.autocast: inputs and conv weights run in the autocast dtype on the fused path
    (the interpreter upcasts bf16 products to fp32; bf16 is also tested on the GPU), BN parameters stay fp32."""
    case = testing.BLOCK_CASES[7]
    n, h, w = case[5]
    x = torch.randn(n, case[1], h, w, generator=torch.Generator().manual_seed(8))
    checks = testing.compare_models(
        _randomized(make_block(case, fused=False)), lambda m: fused_resnet.convert(m, backend="triton", inplace=True),
        x, testing.DTYPES[dtype], DEVICE, channels_last=True, train_steps=2, autocast=True,
    )
    assert_checks(checks, f"autocast {dtype}")


def test_train_with_a_frozen_bn_and_no_input_grad():
    """A BN frozen in eval inside a training block uses running statistics (da = s·dz) and still gets γ/β
    gradients; an input that needs no gradient skips the first dgrad."""
    check_frozen_bn_and_no_input_grad(_randomized(torchvision.models.resnet.Bottleneck(16, 4)), "triton", DEVICE)


def test_float64_falls_back_to_reference_with_a_warning():
    registry._warned.clear()
    backends.refresh()
    tv = torchvision.models.resnet.BasicBlock(4, 4).double()
    fused = fused_resnet.convert(tv, backend="triton")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="dtype torch.float64"):
        y = fused(x)
    torch.testing.assert_close(y, tv(x), rtol=1e-12, atol=1e-12)
    reason = triton_backend.TritonBackend().unsupported_reason("cpu", torch.float64, BlockSpec((UnitSpec(),)))
    assert "capability 'dtypes'" in reason
    registry._warned.clear()


def test_compile_fullgraph_eval_on_triton():
    torch._dynamo.reset()
    model = _randomized(models.cifar_resnet(20, "A", backend="triton")).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), warnings.catch_warnings():
        # no fallback to reference (its warning is a RuntimeWarning); the interpreter of Triton 3.6 raises numpy's
        # DeprecationWarning for its own array-to-scalar conversions, which say nothing about the fused path
        warnings.simplefilter("error", RuntimeWarning)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_device_guard_is_the_inputs_cuda_device():
    """The guard a block op enters: the input's CUDA device (Triton launches on the current one), nothing on a
    CPU (the interpreter). Built, not entered: this needs no GPU."""
    guard = triton_backend._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(triton_backend._device_guard(torch.device("cpu")), torch.cuda.device)


def test_block_ops_launch_under_the_inputs_device_guard(monkeypatch):
    """Training forward, backward and eval forward of a block, and each BN's running-statistics update, enter the
    guard of their input's device (dy's for the backward) before their first kernel launch and leave it after
    the last (every Triton launcher reports its launch to fused_resnet.launches first)."""
    import contextlib

    from fused_resnet import launches

    events = []

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    real = launches.record
    monkeypatch.setattr(triton_backend, "_device_guard", guard)
    monkeypatch.setattr(launches, "record", lambda *args, **kw: events.append(("launch", args[0])) or real(*args, **kw))
    triton_backend._kernels.cache_clear()
    case = testing.BLOCK_CASES[1]  # a basic block with a projection shortcut: every kind of conv launch
    n, h, w = case[5]
    block = fused_resnet.convert(make_block(case, fused=False), backend="triton").to(DEVICE)
    x = torch.randn(n, case[1], h, w, device=DEVICE, requires_grad=True)
    block.train()(x).sum().backward()
    with torch.no_grad():
        block.eval()(x)
    spans, depth = [], 0
    for kind, device in events:
        if kind == "enter":
            assert depth == 0 and device == x.device
            spans.append(0)
        elif kind == "exit":
            assert device == x.device
        else:
            assert depth == 1, f"{device} launched outside the device guard"
            spans[-1] += 1
        depth += {"enter": 1, "exit": -1, "launch": 0}[kind]
    # forward, a running-statistics update per BN (3), backward, eval; each launches
    assert depth == 0 and len(spans) == 6 and all(spans), spans
    assert spans[1:4] == [1, 1, 1]


@requires_gpu
def test_a_model_on_another_device_than_the_current_one():
    """A block on cuda:1 while cuda:0 is current: trained and evaluated on cuda:1 (its kernels launched there),
    against float64 with the rule, and cuda:0 is current again afterwards."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    case = testing.BLOCK_CASES[7]
    n, h, w = case[5]
    x = torch.randn(n, case[1], h, w, generator=torch.Generator().manual_seed(9))
    with torch.cuda.device(0):
        checks = testing.compare_models(
            _randomized(make_block(case, fused=False)), lambda m: fused_resnet.convert(m, backend="triton",
                                                                                      inplace=True),
            x, torch.float32, torch.device("cuda", 1), channels_last=True, train_steps=2)
        assert torch.cuda.current_device() == 0
    assert_checks(checks, "cuda:1 while cuda:0 is current")
