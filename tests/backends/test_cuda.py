"""Backend "cuda": the C++/CUDA extension (csrc/).

* Every kernel op against fused_resnet.reference with the float64 rule, in float32 / float16 / bfloat16, over
  channel counts 24, 40, 13 and 64 (C not a multiple of 8, so the one-element path runs too), N·H·W not a
  multiple of any block size, 4-D channels_last and 2-D [M, C] tensors.
* The whole-block ops through fused modules and converted models, train and eval mode, every shortcut kind; blocks
  whose projection or first unit reads the input average-pooled (timm's "-d" shortcut) against the reference.
* The ops' fakes, autograd, opcheck and torch.compile; clear errors for bad arguments.

Without a GPU the ops run their CPU registrations — the same kernel bodies in host loops (conftest sets
FUSED_RESNET_EXT_ON_CPU=1) — so the op logic and the per-element math are checked in CI; the CUDA launch
geometry, the block reductions and the 16-byte vector paths on device are checked by the GPU runs only
(bench/gpu_suite.sh tests).
"""
import copy

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import backends, models, ops, testing
from fused_resnet.backends import cuda as cuda_backend, extension, reference, registry
from fused_resnet.spec import HEADER_INTS, UNIT_INTS, BlockSpec, Shortcut, UnitSpec
from fused_resnet.tensors import Params, pack_forward

from conftest import (GPU, MODELS, assert_checks, case_id, check_frozen_bn_and_no_input_grad, make_block,
                      requires_gpu)

pytestmark = pytest.mark.skipif(extension.load() is None, reason=f"extension not built: {extension.status()['reason']}")

DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 24, 5, 7), (3, 40, 3, 3), (1, 13, 4, 5), (4, 64, 6, 6), (37, 16)]
EPS = 1e-5


def _ops():
    return torch.ops.fused_resnet_C


def _act(shape, dtype, seed, offset=0.0, scale=1.0):
    """A channels-innermost activation on DEVICE (4-D channels_last or 2-D contiguous)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(DEVICE, dtype)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


def _vec(c, seed, low=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(c, generator=g) + 0.5 if low is None else torch.randn(c, generator=g)
    return v.to(DEVICE)


def _nchw(t):
    """2-D [M, C] as [M, C, 1, 1] for the reference (which reduces over dims 0, 2, 3)."""
    return t.view(*t.shape, 1, 1) if t.dim() == 2 else t


def _check(name, fused, fused_ref, same, same_ref, dtype):
    c = testing.check(name, fused, fused_ref, same, same_ref, dtype)
    assert c.ok, c.row()


def _stats(a):
    mean, var = reference.bn_stats(_nchw(a))
    return mean, var


# --------------------------------------------------------------------------------------------- kernel ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_stats_and_finalize(shape, dtype):
    """Mean / biased var / s / t against float64, with |mean| ≫ std (Welford + Chan keep the variance)."""
    a = _act(shape, dtype, 1, offset=50.0, scale=0.5)
    gamma, beta = _vec(shape[1], 2), _vec(shape[1], 3, low=True)
    mean, var, s, t = _ops().bn_stats(a, gamma, beta, EPS)
    m64, v64 = _stats(a.double())
    m32, v32 = _stats(a)  # torch's same-dtype statistics (fp32 accumulation)
    s64, t64, _ = reference.scale_shift(gamma.double(), beta.double(), m64, v64, EPS)
    s32, t32, _ = reference.scale_shift(gamma, beta, m32, v32, EPS)
    for name, got, ref, same in (("mean", mean, m64, m32), ("var", var, v64, v32), ("s", s, s64, s32),
                                 ("t", t, t64, t32)):
        assert got.dtype == torch.float32 and got.shape == (shape[1],)
        _check(name, got, ref, same, ref, torch.float32)


def test_bn_scale_shift():
    mean, var = _vec(24, 1, low=True), _vec(24, 2)
    gamma, beta = _vec(24, 3), _vec(24, 4, low=True)
    s, t, rstd = _ops().bn_scale_shift(gamma, beta, mean, var, EPS)
    for got, want in zip((s, t, rstd), reference.scale_shift(gamma, beta, mean, var, EPS), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_bn_running_update_matches_torch(momentum, buffer_dtype):
    """Against nn.BatchNorm2d's own update (momentum, momentum=None cumulative average, unbiased running_var,
    num_batches_tracked) over three batches."""
    bn = torch.nn.BatchNorm2d(24, momentum=momentum).to(DEVICE, buffer_dtype).train()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    for step in range(3):
        x = _act((4, 24, 3, 5), buffer_dtype, 10 + step, offset=2.0)
        mean, var = _stats(x)
        bn(x)
        _ops().bn_running_update(rm, rv, nbt, mean, var, 4 * 3 * 5, momentum)
        assert nbt.item() == bn.num_batches_tracked.item() == step + 1
        tol = {"rtol": 1e-6, "atol": 1e-6} if buffer_dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
        torch.testing.assert_close(rm, bn.running_mean, **tol)
        torch.testing.assert_close(rv, bn.running_var, **tol)


def test_bn_running_update_matches_the_reference_exactly():
    rm, rv, nbt = _vec(40, 1, low=True), _vec(40, 2), torch.tensor(3, device=DEVICE)
    mean, var = _vec(40, 3, low=True), _vec(40, 4)
    for momentum in (0.1, None):
        mine = (rm.clone(), rv.clone(), nbt.clone())
        ref = (rm.clone(), rv.clone(), nbt.clone())
        _ops().bn_running_update(*mine, mean, var, 77, momentum)
        reference.bn_running_update(*ref, mean, var, 77, momentum)
        for got, want in zip(mine, ref, strict=True):
            assert torch.equal(got, want), (momentum, got, want)


def _bn_act_case(shape, dtype, mode):
    """(kernel output, float64 reference, eager same-dtype) for one closing-kernel mode."""
    a = _act(shape, dtype, 1)
    C = shape[1]
    s, t = _vec(C, 2), _vec(C, 3, low=True)
    kwargs, ref_sc = {}, None
    if mode == "tensor":
        r = _act(shape, dtype, 4)
        kwargs, ref_sc = {"residual": r}, lambda d: r.to(d)
    elif mode == "projection":
        r, rs, rt = _act(shape, dtype, 4), _vec(C, 5), _vec(C, 6, low=True)
        kwargs = {"residual": r, "residual_scale": rs, "residual_shift": rt}
        ref_sc = lambda d: reference.bn_act(r.to(d), rs.to(d), rt.to(d), None, relu=False)  # noqa: E731
    elif mode == "option A":  # x has C/2 channels (rounded down to even) and 2× the spatial size (+1 for odd)
        c_in = C // 2
        x = _act((shape[0], c_in, 2 * shape[2] - 1, 2 * shape[3]), dtype, 7)
        kwargs = {"residual": x, "option_a_stride": [2, 2]}
        ref_sc = lambda d: reference.option_a(x.to(d), (2, 2), C, torch.channels_last)  # noqa: E731
    y = _ops().bn_act(a, s, t, kwargs.pop("residual", None), True, **kwargs)

    def ref(d):
        return reference.bn_act(a.to(d), s.to(torch.promote_types(d, torch.float32)),
                                t.to(torch.promote_types(d, torch.float32)),
                                None if ref_sc is None else ref_sc(d).to(d))
    return y, ref(torch.float64), ref(dtype)


@pytest.mark.parametrize("mode", ["none", "tensor", "projection", "option A"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) == 4], ids=str)
def test_bn_act_modes(shape, dtype, mode):
    y, ref64, same = _bn_act_case(shape, dtype, mode)
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous(memory_format=torch.channels_last)
    _check(f"bn_act {mode}", y, ref64, same, ref64, dtype)


def test_bn_act_two_dimensional():
    a = _act((37, 16), torch.float16, 1)
    s, t = _vec(16, 2), _vec(16, 3, low=True)
    y = _ops().bn_act(a, s, t, None, False)
    torch.testing.assert_close(y, reference.bn_act(_nchw(a), s, t, None, relu=False).view(37, 16))


def _dbn_inputs(shape, dtype, mask):
    a = _act(shape, dtype, 1, offset=3.0)
    g = _act(shape, dtype, 2)
    C = shape[1]
    mean, var = _stats(a)
    gamma, beta = _vec(C, 3), _vec(C, 4, low=True)
    s, t, rstd = reference.scale_shift(gamma, beta, mean, var, EPS)
    y = _act(shape, dtype, 5) if mask == "y" else None
    return g, y, a, mean, rstd, s, t


def _masked(g, y, a, s, t, d, mask=True):
    """dz = g·mask in dtype d (fp32 for low precision, as the reference computes it)."""
    acc = torch.promote_types(d, torch.float32)
    view = (lambda v: v.view(1, -1, 1, 1)) if a.dim() == 4 else (lambda v: v.view(1, -1))
    if not mask:
        return g.to(acc)
    if y is not None:
        return g.to(acc) * (y > 0)
    return g.to(acc) * ((a.to(acc) * view(s.to(acc)) + view(t.to(acc))) > 0)


@pytest.mark.parametrize("mask", ["y", "own relu", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_drelu_dbn_reduce_and_apply(shape, dtype, mask):
    """Σdz, Σdz·x̂ and da = s·(dz − Σdz/M − x̂·Σdz·x̂/M) (and s·dz with fixed statistics), the dReLU recomputed
    from y or from the BN's own input, or no mask at all (mask=False: an open block's last BN), against float64."""
    g, y, a, mean, rstd, s, t = _dbn_inputs(shape, dtype, mask)
    masked = mask != "none"
    sum_dz, sum_dz_xhat = _ops().drelu_dbn_reduce(g, y, a, mean, rstd, s, t, mask=masked)

    def ref(d):
        acc = torch.promote_types(d, torch.float32)
        dz = _nchw(_masked(g, y, a, s, t, acc, masked))
        vecs = [v.to(acc) for v in (mean, rstd, s)]
        sums = reference.drelu_dbn_reduce(dz, _nchw(a).to(d), vecs[0], vecs[1])
        das = [reference.dbn_apply(dz, _nchw(a).to(d), vecs[0], vecs[1], vecs[2], *sums, batch).view(a.shape)
               for batch in (True, False)]
        return sums, das

    (r_sum, r_sumx), r_da = ref(torch.float64)
    (s_sum, s_sumx), s_da = ref(dtype)
    _check("Σdz", sum_dz, r_sum, s_sum, r_sum, torch.float32)
    _check("Σdz·x̂", sum_dz_xhat, r_sumx, s_sumx, r_sumx, torch.float32)
    for batch, want, same in zip((True, False), r_da, s_da, strict=True):
        da = _ops().dbn_apply(g, y, a, mean, rstd, s, t, sum_dz, sum_dz_xhat, batch, mask=masked)
        assert da.dtype == dtype and da.shape == a.shape and da.stride() == a.stride()
        _check(f"da (batch statistics {batch})", da, want, same, want, dtype)


@pytest.mark.parametrize("kind", ["identity", "tensor", "option A"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_grad(kind, dtype):
    shape = (2, 24, 5, 4)
    dy, y = _act(shape, dtype, 1), _act(shape, dtype, 2)
    if kind == "option A":
        like = _act((2, 8, 9, 8), dtype, 3)  # ceil(9/2) = 5, 8/2 = 4
        d_main, pad = _act(like.shape, dtype, 4), [2, 2]
    else:
        like, pad = _act(shape, dtype, 3), []
        d_main = None if kind == "tensor" else _act(shape, dtype, 4)
    out = _ops().residual_grad(d_main, dy, y, like, pad)

    def ref(d):
        dz = dy.to(torch.float64) * (y > 0)
        sc = reference.option_a_backward(dz, like, (2, 2)) if pad else dz
        total = sc if d_main is None else sc + d_main.to(torch.float64)
        return total.to(d)

    assert out.dtype == dtype and out.shape == like.shape and out.is_contiguous(memory_format=torch.channels_last)
    _check(f"residual_grad {kind}", out, ref(torch.float64), ref(dtype), ref(torch.float64), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_unaligned_tensors_take_the_one_element_path(dtype):
    """A view starting one element into its storage is not 16-byte aligned: every kernel must notice and fall back
    to one element per thread (same results as the aligned copy: bitwise for elementwise kernels, to rounding for
    reductions, whose summation order follows the vector width)."""
    rows, C = 37, 24
    flat = _act((rows * C + 1,), dtype, 1, offset=1.0)
    a = flat[1:].view(rows, C)
    assert a.data_ptr() % 16 != 0
    g = _act((rows, C), dtype, 2)
    s, t = _vec(C, 3), _vec(C, 4, low=True)
    aligned = a.clone()
    for fn, tol in ((lambda x: _ops().bn_act(x, s, t, g, True), 0),
                    (lambda x: _ops().bn_stats(x, s, t, EPS)[1], 1e-6),
                    (lambda x: _ops().drelu_dbn_reduce(g, None, x, s, s, s, t)[1], 1e-6),
                    (lambda x: _ops().dbn_apply(g, None, x, s, s, s, t, s, t, True), 0),
                    (lambda x: _ops().residual_grad(x, g, g, x, []), 0)):
        torch.testing.assert_close(fn(a), fn(aligned), rtol=tol, atol=tol)


def test_degenerate_sizes():
    """No channels, or no rows: empty sums, NaN statistics (as torch.var_mean of nothing), no crash."""
    a0 = _act((5, 0), torch.float32, 1)
    empty = torch.empty(0, device=DEVICE)
    sums = _ops().drelu_dbn_reduce(a0, None, a0, empty, empty, empty, empty)
    assert all(s.shape == (0,) for s in sums)
    assert _ops().bn_act(a0, empty, empty, None, True).shape == (5, 0)
    rows0 = _act((0, 8), torch.float16, 1)
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    assert torch.isnan(_ops().bn_stats(rows0, ones, zeros, EPS)[0]).all()
    assert torch.equal(_ops().drelu_dbn_reduce(rows0, None, rows0, zeros, ones, ones, zeros)[0], zeros)


def test_kernel_ops_reject_bad_arguments_clearly():
    a = _act((2, 24, 3, 3), torch.float16, 1)
    s, t = _vec(24, 2), _vec(24, 3)
    with pytest.raises(RuntimeError, match="channels_last"):
        _ops().bn_act(a.contiguous(), s, t, None, True)
    with pytest.raises(RuntimeError, match="contiguous float32 \\[24\\]"):
        _ops().bn_act(a, s.half(), t, None, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _ops().bn_stats(a.double(), s, t, EPS)
    with pytest.raises(RuntimeError, match="with sizes \\[2, 24, 3, 3\\]"):
        _ops().bn_act(a, s, t, _act((2, 24, 3, 4), torch.float16, 2), True)
    with pytest.raises(RuntimeError, match="option A maps"):
        _ops().bn_act(a, s, t, _act((2, 8, 9, 9), torch.float16, 2), True, option_a_stride=[2, 2])
    with pytest.raises(RuntimeError, match="residual_scale and residual_shift together"):
        _ops().bn_act(a, s, t, a, True, residual_scale=s)
    with pytest.raises(RuntimeError, match="needs num_batches_tracked"):
        _ops().bn_running_update(s.clone(), t.clone(), None, s, t, 10, None)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        _ops().bn_running_update(s.clone(), t.clone(), torch.tensor(0, device=DEVICE), s, t, 1, 0.1)
    w = torch.randn(24, 24, 3, 3, device=DEVICE, dtype=torch.float16)
    spec = BlockSpec((UnitSpec(padding=(1, 1), eps=EPS),), Shortcut.NONE)
    bad_kind = spec.ints
    bad_kind[1] = 7
    with pytest.raises(RuntimeError, match="unknown shortcut kind 7"):
        _ops().block_inference(a, [w], [s], [t], [s], [t], None, bad_kind, spec.floats, True)
    with pytest.raises(RuntimeError, match=f"malformed block spec: {len(spec.ints) - 1} ints and 2 floats for 1 unit"):
        _ops().block_inference(a, [w], [s], [t], [s], [t], None, spec.ints[:-1], spec.floats, True)
    with pytest.raises(RuntimeError, match="one tensor per unit"):
        _ops().block_inference(a, [w, w], [s], [t], [s], [t], None, spec.ints, spec.floats, True)


# --------------------------------------------------------------------------------------------- block ops
def _cuda(m):
    return fused_resnet.convert(m, backend="cuda", inplace=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", testing.BLOCK_CASES, ids=case_id)
def test_train_block(case, dtype):
    """Every block kind, training forward + backward over two passes then eval: outputs, input grad, every
    parameter grad, running statistics, num_batches_tracked and branch flips against float64 with the rule
    (bottlenecks in channels_last, basic blocks in NCHW)."""
    n, h, w = case[5]
    block = testing.randomize_batchnorm(make_block(case, fused=False), torch.Generator().manual_seed(7))
    x = torch.randn(n, case[1], h, w, generator=torch.Generator().manual_seed(7))
    checks = testing.compare_models(block, _cuda, x, testing.DTYPES[dtype], DEVICE,
                                    channels_last=case[0] == "bottleneck", train_steps=2)
    assert_checks(checks, f"{case_id(case)} {dtype}")


@pytest.mark.parametrize("name,shape", [
    ("resnet18", (4, 3, 64, 64)), ("resnet50", (2, 3, 64, 64)), ("cifar20-A", (4, 3, 16, 16)),
    ("cifar20-B-1d", (4, 1, 40)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_converted_models_over_sgd_steps(name, shape):
    """Whole converted models: three train passes with SGD steps between them, then eval, against float64."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    model = testing.randomize_batchnorm(MODELS[name](), torch.Generator().manual_seed(3))
    checks = testing.compare_models(model, _cuda, x, torch.float32, DEVICE, channels_last=len(shape) == 4,
                                    train_steps=3, lr=0.01)
    assert_checks(checks, name)


def test_train_under_autocast_and_with_a_frozen_bn():
    case = testing.BLOCK_CASES[7]
    n, h, w = case[5]
    x = torch.randn(n, case[1], h, w, generator=torch.Generator().manual_seed(8))
    block = testing.randomize_batchnorm(make_block(case, fused=False), torch.Generator().manual_seed(1))
    checks = testing.compare_models(block, _cuda, x, torch.bfloat16, DEVICE, channels_last=True, train_steps=2,
                                    autocast=True)
    assert_checks(checks, "autocast bf16")

    tv = testing.randomize_batchnorm(torchvision.models.resnet.Bottleneck(16, 4), torch.Generator().manual_seed(2))
    check_frozen_bn_and_no_input_grad(tv, "cuda", DEVICE)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", testing.BLOCK_CASES, ids=case_id)
def test_eval_block(case, dtype):
    n, h, w = case[5]
    dt = testing.DTYPES[dtype]
    block = testing.randomize_batchnorm(make_block(case, fused=False), torch.Generator().manual_seed(4)).eval()
    x = torch.randn(n, case[1], h, w, generator=torch.Generator().manual_seed(3))
    fmt = torch.channels_last if case[0] == "bottleneck" else torch.contiguous_format
    same = copy.deepcopy(block).to(DEVICE, dt)
    fused = fused_resnet.convert(copy.deepcopy(same), backend="cuda")
    oracle = copy.deepcopy(block).to(DEVICE, torch.float64)
    with torch.no_grad():
        xl = x.to(DEVICE, dt).contiguous(memory_format=fmt)
        y = fused(xl)
        ref = oracle(x.to(DEVICE, torch.float64))
        assert y.dtype == dt and y.is_contiguous(memory_format=fmt)
        _check("eval output", y, ref, same(xl), ref, dt)


@pytest.mark.parametrize("case", [testing.BLOCK_CASES[i] for i in (0, 1, 6, 7)], ids=case_id)
def test_saved_for_backward_is_the_design_minimum(case):
    """Autograd keeps x, the pre-BN conv outputs, y and per-channel vectors only (DESIGN §1), less than eager."""
    n, h, w = case[5]
    block = fused_resnet.convert(make_block(case, fused=False), backend="cuda").train().to(DEVICE)
    x = torch.randn(n, case[1], h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
    total, design, eager = testing.saved_bytes_vs_design(block, x)
    assert total <= design < eager, (total, design, eager)


# --------------------------------------------------------------------------------------------- op registration
def _block_args(case=testing.BLOCK_CASES[7], dtype=torch.float32, grad=False):
    """(flat arguments of fused_resnet_C::block_forward, the spec) for one block case, from a converted block."""
    n, h, w = case[5]
    block = testing.randomize_batchnorm(make_block(case, fused=False), torch.Generator().manual_seed(1))
    fused = fused_resnet.convert(block, backend="cuda").to(DEVICE, dtype).train()
    captured = {}
    real = ops.forward

    def spy(spec, x, params, residual, backend, sample_scale=None):
        captured.update(spec=spec, args=[x, *params, residual, spec.ints, spec.floats, True, sample_scale])
        return real(spec, x, params, residual, backend, sample_scale)

    original, ops.forward = ops.forward, spy
    try:
        with torch.no_grad():
            fused(torch.randn(n, case[1], h, w, device=DEVICE, dtype=dtype).contiguous(
                memory_format=torch.channels_last))
    finally:
        ops.forward = original
    args = [[t.detach() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, (list, tuple))
            else a.detach() if isinstance(a, torch.Tensor) else a for a in captured["args"]]
    if grad:
        args[0] = args[0].detach().requires_grad_(True)
        for k in (1, 2, 3):
            args[k] = [t.detach().requires_grad_(True) for t in args[k]]
    return args, captured["spec"]


def test_cpp_block_forward_autograd_matches_the_reference():
    """fused_resnet_C::block_forward is differentiable on its own (register_autograd → block_backward)."""
    args, spec = _block_args(grad=True)
    ref_args = [args[0].detach().double().requires_grad_(True)] + [
        [t.detach().double().requires_grad_(True) for t in args[k]] for k in (1, 2, 3)] + args[4:7]
    out = _ops().block_forward(*args)
    ref = reference.block_forward(spec, ref_args[0], Params(*ref_args[1:6]), ref_args[6])
    gy = torch.randn_like(ref.y)
    out[0].backward(gy.to(out[0].dtype))
    ref.y.backward(gy)
    _check("y", out[0], ref.y, out[0], ref.y, torch.float32)
    for got, want in zip([args[0]] + args[1] + args[2] + args[3],
                         [ref_args[0]] + ref_args[1] + ref_args[2] + ref_args[3], strict=True):
        assert got.grad is not None
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_opcheck_on_the_extension_ops():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the block and kernel ops."""
    args, _ = _block_args(grad=True)
    torch.library.opcheck(_ops().block_forward, tuple(args))
    no_grad, spec = _block_args()
    eval_spec = spec.with_batch_stats([False] * len(spec.units))
    torch.library.opcheck(_ops().block_inference, tuple(no_grad[:7] + [eval_spec.ints, eval_spec.floats, True]))
    g, y, a, mean, rstd, s, t = _dbn_inputs((2, 24, 5, 7), torch.float32, "y")
    torch.library.opcheck(_ops().drelu_dbn_reduce, (g, y, a, mean, rstd, s, t))
    torch.library.opcheck(_ops().dbn_apply, (g, None, a, mean, rstd, s, t, mean, rstd, True))
    torch.library.opcheck(_ops().drelu_dbn_reduce, (g, None, a, mean, rstd, s, t), {"mask": False})
    torch.library.opcheck(_ops().dbn_apply, (g, None, a, mean, rstd, s, t, mean, rstd, True), {"mask": False})
    torch.library.opcheck(_ops().bn_stats, (a, s, t, EPS))
    torch.library.opcheck(_ops().bn_act, (a, s, t, y, True), {"residual_scale": s, "residual_shift": t})
    torch.library.opcheck(_ops().residual_grad, (a, g, y, a, []))


def test_compile_fullgraph_traces_the_cpp_ops():
    torch._dynamo.reset()
    model = testing.randomize_batchnorm(models.cifar_resnet(20, "A", backend="cuda"),
                                        torch.Generator().manual_seed(0)).to(DEVICE)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    args, _ = _block_args()
    fn = torch.compile(lambda *a: _ops().block_forward(*a)[0], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(*args), _ops().block_forward(*args)[0])


def test_backend_status_and_fallbacks():
    assert backends.backend_status()["cuda"] is None
    assert "cuda" in backends.available_backends()
    backend = backends.get("cuda")
    plain, grouped = BlockSpec((UnitSpec(),)), BlockSpec((UnitSpec(dilation=(2, 2), groups=2),))
    assert "float64" in backend.unsupported_reason(DEVICE.type, torch.float64, plain)
    assert backend.unsupported_reason(DEVICE.type, torch.float32, grouped) is None
    if GPU:
        assert "needs CUDA tensors" in backend.unsupported_reason("cpu", torch.float32, plain)
    registry._warned.clear()
    backends.refresh()
    tv = torchvision.models.resnet.BasicBlock(4, 4).double().to(DEVICE)
    fused = fused_resnet.convert(tv, backend="cuda")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="dtype torch.float64"):
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-12, atol=1e-12)
    registry._warned.clear()


def test_grouped_and_dilated_convs_in_the_block_ops():
    """The convs are ATen's, so the C++ block ops take groups > 1 and dilation > 1 (a ResNeXt-style chain): forward
    and backward against the reference block ops in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 7, 7, generator=g).to(DEVICE)
    weights = [torch.randn(8, 4, 3, 3, generator=g).to(DEVICE), torch.randn(8, 2, 3, 3, generator=g).to(DEVICE)]
    gammas = [torch.rand(8, generator=g).to(DEVICE) + 0.5 for _ in range(2)]
    betas = [torch.randn(8, generator=g).to(DEVICE) for _ in range(2)]
    spec = BlockSpec((UnitSpec((1, 1), (2, 2), (2, 2), 2, EPS), UnitSpec((1, 1), (1, 1), (1, 1), 4, EPS)))
    nones = [None, None]
    out = _ops().block_forward(x, weights, gammas, betas, nones, nones, None, spec.ints, spec.floats, True, None)
    p64 = Params(*[[t.double() for t in ts] for ts in (weights, gammas, betas)], nones, nones)
    ref = reference.block_forward(spec, x.double(), p64, None)
    same = reference.block_forward(spec, x, Params(weights, gammas, betas, nones, nones), None)  # torch in fp32
    for name, got, want, fp32 in zip(["y", "a0", "a1", "mean0", "mean1", "var0", "var1"], out, pack_forward(ref),
                                     pack_forward(same), strict=True):
        _check(name, got, want, fp32, want, torch.float32)
    dy = torch.randn(out[0].shape, generator=g).to(DEVICE)
    grads = _ops().block_backward(dy, x, out[0], weights, gammas, betas, out[1:3], out[3:5], out[5:7], spec.ints,
                                  spec.floats, True, True)
    ref_grads = reference.block_backward(spec, dy.double(), x.double(), p64, ref, True)
    same_grads = reference.block_backward(spec, dy, x, Params(weights, gammas, betas, nones, nones), same, True)

    def flat(g):
        return [g.dx] + g.dws + g.dgammas + g.dbetas

    for got, want, fp32 in zip([grads[0]] + list(grads[2:]), flat(ref_grads), flat(same_grads), strict=True):
        _check("grad", got, want, fp32, want, torch.float32)


# --------------------------------------------------------------------------------------------- pooled units
# Blocks whose projection, or whose first unit where no shortcut reads the block input, reads the block input
# average-pooled (UnitSpec.avg_pool; timm's "-d" shortcut), on a 7x9 input: ceil_mode's last windows are cut in both
# directions. name → (shortcut, convs (out, in, kernel, stride, avg_pool) with the projection last).
POOLED_BLOCKS = {
    "bottleneck-d": (Shortcut.PROJECTION, [(4, 4, 1, 1, 1), (4, 4, 3, 2, 1), (8, 4, 1, 1, 1), (8, 4, 1, 1, 2)]),
    "basic-d": (Shortcut.PROJECTION, [(8, 4, 3, 2, 1), (8, 8, 3, 1, 1), (8, 4, 1, 1, 2)]),
    "open": (Shortcut.OPEN, [(6, 4, 3, 1, 2)]),
    "plain": (Shortcut.NONE, [(6, 4, 1, 1, 3), (6, 6, 3, 1, 1)]),
}


def _pooled_problem(name, fmt, dtype=torch.float64):
    """(spec, x, params with running statistics) of a POOLED_BLOCKS block, float64 unless asked, on DEVICE."""
    shortcut, convs = POOLED_BLOCKS[name]
    units = tuple(UnitSpec((st, st), (k // 2, k // 2), eps=EPS, momentum=0.1, avg_pool=pool)
                  for _, _, k, st, pool in convs)
    spec = BlockSpec(units, shortcut)
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    x = rnd(2, 4, 7, 9).contiguous(memory_format=fmt)
    params = Params([rnd(o, i, k, k) for o, i, k, _, _ in convs], [rnd(c[0]) * 0.3 + 1 for c in convs],
                    [rnd(c[0]) * 0.3 for c in convs], [rnd(c[0]) * 0.1 for c in convs],
                    [rnd(c[0]).abs() + 0.5 for c in convs])
    return spec, x, params


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) else t


def _cast_params(params, dtype):
    return Params(*[[_cast(t, dtype) for t in ts] for ts in params])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("name", list(POOLED_BLOCKS))
def test_pooled_units_match_the_reference(name, fmt, dtype):
    """Training forward (y, pre-BN outputs, statistics), backward (dx, every dW, dγ, dβ), the running statistics'
    update from the batch statistics, eval and eval with BN folded, against the reference backend in float64 with
    the rule (the reference in the same dtype is torch's error). bfloat16 runs the fusion graphs' routes (their
    CPU twins without a GPU)."""
    spec, x64, p64 = _pooled_problem(name, fmt)
    x, params = x64.to(dtype), _cast_params(p64, dtype)
    cuda, n = backends.get("cuda"), len(spec.units)
    out = cuda.block_forward(spec, x, params, None)
    ref = reference.block_forward(spec, x64, p64, None)
    same = reference.block_forward(spec, x, params, None)
    assert out.y.shape == ref.y.shape and out.y.dtype == dtype and out.y.is_contiguous(memory_format=fmt)
    _check("y", out.y, ref.y, same.y, ref.y, dtype)
    # Statistics to a tolerance on the channel's spread: a mean near zero is all cancellation (the statistics
    # kernels themselves are checked above)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for i in range(n):
        assert out.acts[i].shape == ref.acts[i].shape, i
        _check(f"a{i}", out.acts[i], ref.acts[i], same.acts[i], ref.acts[i], dtype)
        spread = float(ref.variances[i].max().sqrt())
        # the update's count is the pooled unit's N·P·Q
        count = out.acts[i].numel() // out.acts[i].shape[1]
        got = [t.float().clone() for t in (p64.running_means[i], p64.running_vars[i])]
        want = [t.clone() for t in (p64.running_means[i], p64.running_vars[i])]
        cuda.bn_running_update(*got, None, out.means[i], out.variances[i], count, 0.1)
        reference.bn_running_update(*want, None, ref.means[i], ref.variances[i], count, 0.1)
        for what, g, w in zip(("mean", "var", "running_mean", "running_var"),
                              [out.means[i], out.variances[i], *got], [ref.means[i], ref.variances[i], *want],
                              strict=True):
            torch.testing.assert_close(g.double(), w, rtol=rel, atol=rel * spread, msg=f"{what}{i}")

    dy64 = torch.randn(ref.y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(DEVICE)
    dy = dy64.to(dtype).contiguous(memory_format=fmt)
    grads = cuda.block_backward(spec, dy, x, params, out, True)
    ref_grads = reference.block_backward(spec, dy64, x64, p64, ref, True)
    same_grads = reference.block_backward(spec, dy, x, params, same, True)
    assert grads.dx.shape == x.shape and grads.dx.is_contiguous(memory_format=fmt)
    _check("dx", grads.dx, ref_grads.dx, same_grads.dx, ref_grads.dx, dtype)
    for what in ("dws", "dgammas", "dbetas"):
        for i, (got, want, fp) in enumerate(zip(getattr(grads, what), getattr(ref_grads, what),
                                                getattr(same_grads, what), strict=True)):
            _check(f"{what}[{i}]", got, want, fp, want, dtype)
    without_dx = cuda.block_backward(spec, dy, x, params, out, False)
    assert without_dx.dx is None
    for got, want in zip(without_dx.dws, grads.dws, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    eval_spec = spec.with_batch_stats([False] * n)
    want = reference.block_inference(eval_spec, x64, p64, None)
    same_eval = reference.block_inference(eval_spec, x, params, None)
    y = cuda.block_inference(eval_spec, x, params, None)
    assert y.shape == want.shape and y.is_contiguous(memory_format=fmt)
    _check("eval y", y, want, same_eval, want, dtype)
    folded = fused_resnet.backends.folding.fold_block(params, spec.units)
    y = _ops().block_inference_folded(x, [w for w, _ in folded], [t for _, t in folded], None, eval_spec.ints,
                                      eval_spec.floats, True)
    _check("eval y (BN folded)", y, want, same_eval, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [8, 13, 16])
def test_avg_pool_kernels_are_torchs(C, dtype):
    """The pool and its gradient bit for bit as torch's avg_pool2d (ceil_mode, count_include_pad=False) and its
    backward, for k = 1, 2, 3 on 7x9 (cut windows); the gradient kernel adds d_main (rounded once)."""
    x = _act((2, C, 7, 9), dtype, 1)
    for k in (1, 2, 3):
        y = _ops().avg_pool(x, k)
        want = torch.nn.functional.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
        assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, want), k
        d = _act(y.shape, dtype, 2)
        d_main = _act(x.shape, dtype, 3)
        back = torch.ops.aten.avg_pool2d_backward(d, x, [k, k], [k, k], [0, 0], True, False, None)
        assert torch.equal(_ops().avg_pool_grad_add(None, d, x, k), back), k
        back64 = torch.ops.aten.avg_pool2d_backward(d.double(), x.double(), [k, k], [k, k], [0, 0], True, False,
                                                    None)
        torch.testing.assert_close(_ops().avg_pool_grad_add(d_main, d, x, k), (back64 + d_main.double()).to(dtype))
    with pytest.raises(RuntimeError, match="expected d_pooled with sizes \\[2, 8, 4, 5\\]"):
        _ops().avg_pool_grad_add(None, _act((2, 8, 3, 5), torch.float32, 2), _act((2, 8, 7, 9), torch.float32, 1), 2)
    with pytest.raises(RuntimeError, match="pool size k >= 1"):
        _ops().avg_pool(x, 0)
    torch.library.opcheck(_ops().avg_pool, (x, 2))
    torch.library.opcheck(_ops().avg_pool_grad_add, (_act(x.shape, dtype, 3), _ops().avg_pool(x, 2), x, 2))


def test_pooled_blocks_dry_account_is_what_they_launch():
    """A pooled block's step recorded as it really runs (the graphs' CPU twins in bfloat16) and as a dry run on
    fake tensors: the same launches, one pool per op call (the backward recomputes it for the wgrad), and the
    projection's gradient unpooled and added to dx in one kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    from fused_resnet import launches

    spec, x, params = _pooled_problem("bottleneck-d", torch.channels_last, torch.bfloat16)
    cuda = backends.get("cuda")
    eval_spec = spec.with_batch_stats([False] * len(spec.units))

    def step(x, params):
        saved = cuda.block_forward(spec, x, params, None)
        grads = cuda.block_backward(spec, torch.ones_like(saved.y), x, params, saved, True)
        return saved.y, grads.dx

    with launches.recording(dry=False) as real:
        shapes = [t.shape for t in step(x, params)]
    fake_mode = FakeTensorMode()
    fake = tree_map(lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, (x, params))
    with fake_mode, launches.recording(dry=True) as dry:
        assert [t.shape for t in step(*fake)] == shapes == [(2, 8, 4, 5), x.shape]
    traffic = [(r.name, r.kind, r.reads, r.writes, r.flops) for r in real]
    assert traffic == [(r.name, r.kind, r.reads, r.writes, r.flops) for r in dry]
    names = [r.name for r in real]
    assert names.count("avg_pool") == 2 and names.count("avg_pool_grad_add") == 1, names
    assert "add the projection's gradient" not in names
    # eval's dry run (BN folded, as on the GPU): one pool
    with fake_mode, launches.recording(dry=True) as dry:
        assert cuda.block_inference(eval_spec, *fake, None).shape == (2, 8, 4, 5)
    assert [r.name for r in dry].count("avg_pool") == 1


def test_cuda_backends_declare_pooled_units_and_the_ops_check_where_they_pool():
    spec, x, params = _pooled_problem("bottleneck-d", torch.channels_last, torch.float32)
    for name in ("cuda", "cuda-unfused"):
        assert backends.get(name).capabilities.avg_pool
        assert backends.get(name).capabilities.refusal(spec, torch.float32) is None
    # a first unit pooling beside the projection, and a unit reading the unit below pooling: refused, as the
    # Python spec refuses them
    for unit in (0, 1):
        ints = list(spec.ints)
        ints[len(HEADER_INTS) + len(UNIT_INTS) * unit + UNIT_INTS.index("avg_pool")] = 2
        with pytest.raises(RuntimeError, match=f"unit {unit} has avg_pool 2"):
            _ops().block_inference(x, *params, None, ints, spec.floats, True)


# --------------------------------------------------------------------------------------------- stochastic depth
# name → (shortcut, input [N, C, H, W], convs (out, in, kernel, stride) with the projection last)
DROP_PATH_BLOCKS = {
    "bottleneck-projection": (Shortcut.PROJECTION, (3, 8, 7, 9),
                              [(8, 8, 1, 1), (8, 8, 3, 2), (16, 8, 1, 1), (16, 8, 1, 2)]),
    "basic-identity": (Shortcut.IDENTITY, (3, 8, 5, 6), [(8, 8, 3, 1), (8, 8, 3, 1)]),
}


@pytest.mark.parametrize("backend", ["cuda", "cuda-unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(DROP_PATH_BLOCKS))
def test_drop_path_in_the_block_ops_matches_the_reference(name, dtype, backend):
    """Stochastic depth's per-sample scale d (sample 1 dropped, the others kept at 1/0.8) in the closing kernel and
    the last unit's BN backward: y, dx and every dW, dγ, dβ against the reference backend in float64 with the rule,
    channels_last. The projection's BN takes the shortcut's unscaled gradient."""
    shortcut, shape, convs = DROP_PATH_BLOCKS[name]
    spec = BlockSpec(tuple(UnitSpec((st, st), (k // 2, k // 2), eps=EPS) for _, _, k, st in convs), shortcut)
    g = torch.Generator().manual_seed(7)

    def rnd(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(DEVICE)

    x64 = rnd(*shape).contiguous(memory_format=torch.channels_last)
    nones = [None] * len(convs)
    p64 = Params([rnd(o, i, k, k) for o, i, k, _ in convs], [rnd(c[0]) * 0.3 + 1 for c in convs],
                 [rnd(c[0]) * 0.3 for c in convs], nones, nones)
    d64 = torch.tensor([1 / 0.8, 0.0, 1 / 0.8], dtype=torch.float64, device=DEVICE)
    x, params, d = x64.to(dtype), _cast_params(p64, dtype), d64.to(dtype)
    fused = backends.get(backend)
    assert fused.capabilities.drop_path and fused.capabilities.refusal(spec, dtype, drop_path=True) is None

    out = fused.block_forward(spec, x, params, None, sample_scale=d)
    ref = reference.block_forward(spec, x64, p64, None, d64)
    same = reference.block_forward(spec, x, params, None, d)
    assert out.y.is_contiguous(memory_format=torch.channels_last)
    _check("y", out.y, ref.y, same.y, ref.y, dtype)
    # the dropped sample's output is the shortcut's alone: not the block without stochastic depth
    plain = fused.block_forward(spec, x, params, None)
    assert not torch.equal(out.y[1], plain.y[1])

    dy64 = rnd(*ref.y.shape).contiguous(memory_format=torch.channels_last)
    dy = dy64.to(dtype)
    grads = fused.block_backward(spec, dy, x, params, out, True, sample_scale=d)
    ref_grads = reference.block_backward(spec, dy64, x64, p64, ref, True, d64)
    same_grads = reference.block_backward(spec, dy, x, params, same, True, d)
    _check("dx", grads.dx, ref_grads.dx, same_grads.dx, ref_grads.dx, dtype)
    for what in ("dws", "dgammas", "dbetas"):
        for i, (got, want, fp) in enumerate(zip(getattr(grads, what), getattr(ref_grads, what),
                                                getattr(same_grads, what), strict=True)):
            _check(f"{what}[{i}]", got, want, fp, want, dtype)

    # The C++ op's own autograd formula takes d to its backward op: the backend's gradients, bit for bit (running
    # statistics given, unread in training: register_autograd's structure check refuses a list of Nones)
    xg = x.detach().clone().requires_grad_(True)
    wg = [w.detach().clone().requires_grad_(True) for w in params.weights]
    running = [torch.ones(c[0], device=DEVICE) for c in convs]
    flat = _ops().block_forward(xg, wg, params.gammas, params.betas, running, running, None, spec.ints, spec.floats,
                                backend == "cuda", d)
    assert torch.equal(flat[0], out.y)
    flat[0].backward(dy)
    assert torch.equal(xg.grad, grads.dx)
    for got, want in zip([w.grad for w in wg], grads.dws, strict=True):
        assert torch.equal(got, want)


def test_block_ops_refuse_a_sample_scale_of_the_wrong_length():
    shortcut, shape, convs = DROP_PATH_BLOCKS["basic-identity"]
    spec = BlockSpec(tuple(UnitSpec((st, st), (k // 2, k // 2), eps=EPS) for _, _, k, st in convs), shortcut)
    x = _act(shape, torch.float32, 1)
    weights = [_act((o, i, k, k), torch.float32, 2 + j) for j, (o, i, k, _) in enumerate(convs)]
    gammas, betas = [_vec(8, 5), _vec(8, 6)], [_vec(8, 7, low=True), _vec(8, 8, low=True)]
    nones = [None, None]
    d = torch.ones(shape[0], device=DEVICE)
    out = _ops().block_forward(x, weights, gammas, betas, nones, nones, None, spec.ints, spec.floats, False, d)
    for bad in (torch.ones(shape[0] + 1, device=DEVICE), torch.ones(1, shape[0], device=DEVICE)):
        with pytest.raises(RuntimeError, match="sample_scale"):
            _ops().block_forward(x, weights, gammas, betas, nones, nones, None, spec.ints, spec.floats, False, bad)
        with pytest.raises(RuntimeError, match="sample_scale"):
            _ops().block_backward(torch.ones_like(out[0]), x, out[0], weights, gammas, betas, out[1:3], out[3:5],
                                  out[5:7], spec.ints, spec.floats, True, False, bad)


# --------------------------------------------------------------------------------------------- open blocks
# Shortcut.OPEN: y = bn(a_last), no shortcut and no final ReLU (the module closes the block in torch). The
# extension parses it: its closing is the BN-apply kernel without ReLU, its backward starts from dz = dy unmasked.
OPEN_CONVS = [(4, 4, 1, 1), (4, 4, 3, 2), (8, 4, 1, 1)]  # (out, in, kernel, stride): a bottleneck's main path


def _open_problem(dtype, shortcut=Shortcut.OPEN):
    """(spec, x64, params64, x, params) of a three-unit block on a 7x9 channels_last input, on DEVICE."""
    spec = BlockSpec(tuple(UnitSpec((st, st), (k // 2, k // 2), eps=EPS, momentum=0.1) for _, _, k, st in OPEN_CONVS),
                     shortcut)
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)

    x64 = rnd(2, 4, 7, 9).contiguous(memory_format=torch.channels_last)
    p64 = Params([rnd(o, i, k, k) for o, i, k, _ in OPEN_CONVS], [rnd(c[0]) * 0.3 + 1 for c in OPEN_CONVS],
                 [rnd(c[0]) * 0.3 for c in OPEN_CONVS], [rnd(c[0]) * 0.1 for c in OPEN_CONVS],
                 [rnd(c[0]).abs() + 0.5 for c in OPEN_CONVS])
    return spec, x64, p64, x64.to(dtype), _cast_params(p64, dtype)


@pytest.mark.parametrize("backend", ["cuda", "cuda-unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_open_block_runs_in_the_extension(dtype, backend):
    """An open block's training step, eval and folded eval against the reference backend in float64 with the rule
    (y negative where bn(a_last) is: no ReLU; dz = dy unmasked), the step's launches those of the same units closed
    by NONE (one closing kernel, no torch op, no fill), recorded alike by the real run and the dry one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    from fused_resnet import launches

    spec, x64, p64, x, params = _open_problem(dtype)
    cuda, n = backends.get(backend), len(spec.units)
    out = cuda.block_forward(spec, x, params, None)
    ref = reference.block_forward(spec, x64, p64, None)
    same = reference.block_forward(spec, x, params, None)
    assert out.y.shape == ref.y.shape and out.y.dtype == dtype and (out.y < 0).any()
    _check("y", out.y, ref.y, same.y, ref.y, dtype)
    dy64 = torch.randn(ref.y.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(DEVICE)
    dy = dy64.to(dtype).contiguous(memory_format=torch.channels_last)
    grads = cuda.block_backward(spec, dy, x, params, out, True)
    ref_grads = reference.block_backward(spec, dy64, x64, p64, ref, True)
    same_grads = reference.block_backward(spec, dy, x, params, same, True)
    _check("dx", grads.dx, ref_grads.dx, same_grads.dx, ref_grads.dx, dtype)
    for what in ("dws", "dgammas", "dbetas"):
        for i, (got, want, fp) in enumerate(zip(getattr(grads, what), getattr(ref_grads, what),
                                                getattr(same_grads, what), strict=True)):
            _check(f"{what}[{i}]", got, want, fp, want, dtype)

    eval_spec = spec.with_batch_stats([False] * n)
    want = reference.block_inference(eval_spec, x64, p64, None)
    same_eval = reference.block_inference(eval_spec, x, params, None)
    assert (want < 0).any()
    _check("eval y", cuda.block_inference(eval_spec, x, params, None), want, same_eval, want, dtype)
    folded = fused_resnet.backends.folding.fold_block(params, spec.units)
    y = _ops().block_inference_folded(x, [w for w, _ in folded], [t for _, t in folded], None, eval_spec.ints,
                                      eval_spec.floats, cuda.graphs)
    _check("eval y (BN folded)", y, want, same_eval, want, dtype)

    def step(spec, x, params):
        saved = cuda.block_forward(spec, x, params, None)
        return saved.y, cuda.block_backward(spec, torch.ones_like(saved.y), x, params, saved, True).dx

    def traffic(records):
        return [(r.name, r.kind, r.reads, r.writes, r.flops) for r in records]

    with launches.recording(dry=False) as real:
        y = step(spec, x, params)[0]
    with launches.recording(dry=False) as closed:
        step(spec.with_shortcut(Shortcut.NONE), x, params)
    # the same launches, but the last unit's BN backward (the first of each kernel) does not read y: no mask
    unread = {"drelu_dbn_reduce partials": y.nbytes, "dbn_apply": y.nbytes}
    assert [(r.name, r.kind, r.reads + unread.pop(r.name, 0), r.writes, r.flops) for r in real] == traffic(closed)
    assert not unread
    assert not [r.name for r in real if "open" in r.name or r.name in ("ones", "fill")]
    fake_mode = FakeTensorMode()
    fake = tree_map(lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, (x, params))
    with fake_mode, launches.recording(dry=True) as dry:
        step(spec, *fake)
    assert traffic(dry) == traffic(real)
    # eval (BN folded in bfloat16, as on the GPU): the NONE closing's launches, its closing graph without the ReLU
    with fake_mode, launches.recording(dry=True) as dry_eval:
        cuda.block_inference(eval_spec, *fake, None)
    with fake_mode, launches.recording(dry=True) as dry_closed:
        cuda.block_inference(eval_spec.with_shortcut(Shortcut.NONE), *fake, None)
    closed_eval = traffic(dry_closed)
    if closed_eval[-1][0] == "cudnn fprop+bias+relu":
        closed_eval[-1] = ("cudnn fprop+bias",) + closed_eval[-1][1:]
    else:
        assert dtype == torch.float32 or not cuda.graphs, closed_eval
    assert traffic(dry_eval) == closed_eval


def test_open_block_requests_its_eval_closing_without_relu():
    """fusion.requests for an open block: the NONE closing's training graphs, and an eval closing unit of conv +
    bias with no ReLU (what block_inference asks for)."""
    from fused_resnet.backends.cuda import fusion

    spec, _, _, x, params = _open_problem(torch.bfloat16)
    closed = spec.with_shortcut(Shortcut.NONE)

    def listed(spec, train):
        return [(r.graph, r.features, r.unit) for r in fusion.requests(spec, x, params.weights, train)]

    assert listed(spec, True) == listed(closed, True)
    evals, closed_evals = listed(spec, False), listed(closed, False)
    if not closed_evals:  # no cuDNN frontend in this build: no graphs to ask for
        return
    assert evals[:-1] == closed_evals[:-1]
    assert evals[-1] == (closed_evals[-1][0], closed_evals[-1][1] & ~fusion.RELU, closed_evals[-1][2])
    assert evals[-1][1] & fusion.BIAS and not evals[-1][1] & (fusion.RELU | fusion.RESIDUAL)


def test_open_block_ops_refuse_a_sample_scale_and_an_unmasked_y():
    spec, _, _, x, params = _open_problem(torch.float32)
    nones = [None] * len(spec.units)
    d = torch.ones(x.shape[0], device=DEVICE)
    out = _ops().block_forward(x, params.weights, params.gammas, params.betas, nones, nones, None, spec.ints,
                               spec.floats, False, None)
    with pytest.raises(RuntimeError, match="open block .* takes no sample_scale"):
        _ops().block_forward(x, params.weights, params.gammas, params.betas, nones, nones, None, spec.ints,
                             spec.floats, False, d)
    n = len(spec.units)
    with pytest.raises(RuntimeError, match="open block .* takes no sample_scale"):
        _ops().block_backward(torch.ones_like(out[0]), x, out[0], params.weights, params.gammas, params.betas,
                              out[1:1 + n], out[1 + n:1 + 2 * n], out[1 + 2 * n:1 + 3 * n], spec.ints, spec.floats,
                              True, False, d)
    g, y, a, mean, rstd, s, t = _dbn_inputs((2, 24, 5, 7), torch.float32, "y")
    with pytest.raises(RuntimeError, match="mask=False .* takes no y"):
        _ops().drelu_dbn_reduce(g, y, a, mean, rstd, s, t, mask=False)
    with pytest.raises(RuntimeError, match="mask=False .* takes no y"):
        _ops().dbn_apply(g, y, a, mean, rstd, s, t, mean, mean, True, mask=False)
    # a kind past the last is still refused, naming them all
    ints = list(spec.ints)
    ints[HEADER_INTS.index("shortcut")] = 6
    with pytest.raises(RuntimeError, match="unknown shortcut kind 6 .*5 open"):
        _ops().block_inference(x, *params, None, ints, spec.floats, False)


# --------------------------------------------------------------------------------------------- GPU only
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernels_on_a_resnet50_sized_tensor(dtype):
    """The 16-byte vector path and the block reductions at scale (256·56·56 rows)."""
    shape = (256, 64, 56, 56)
    a = _act(shape, dtype, 1, offset=2.0)
    gamma, beta = _vec(64, 2), _vec(64, 3, low=True)
    mean, var, s, t = _ops().bn_stats(a, gamma, beta, EPS)
    m64, v64 = _stats(a.double())
    m32, v32 = _stats(a)
    _check("mean", mean, m64, m32, m64, torch.float32)
    _check("var", var, v64, v32, v64, torch.float32)
    y = _ops().bn_act(a, s, t, a, True)
    ref = reference.bn_act(a.double(), s.double(), t.double(), a.double())
    _check("bn_act", y, ref, reference.bn_act(a, s, t, a), ref, dtype)


@requires_gpu
def test_gpu_outputs_fully_written_and_current_stream():
    """Outputs come from the caching allocator poisoned with NaN; the kernels run on a side stream correctly."""
    poison = torch.full((4 * 24 * 9 * 9 * 8,), float("nan"), device="cuda")
    del poison
    a = _act((4, 24, 9, 9), torch.float16, 1)
    s, t = _vec(24, 2), _vec(24, 3, low=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = _ops().bn_act(a, s, t, a, True)
        mean, var, _, _ = _ops().bn_stats(a, s, t, EPS)
    torch.cuda.current_stream().wait_stream(side)
    assert not torch.isnan(y).any() and not torch.isnan(mean).any()
    torch.testing.assert_close(y, reference.bn_act(a, s, t, a))
    torch.testing.assert_close(var, _stats(a)[1], rtol=1e-5, atol=1e-6)
