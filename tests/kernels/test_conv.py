"""Triton conv engine (kernels/conv.py): fprop, dgrad and wgrad against torch's conv and its autograd with the
float64 rule — error ≤ 2 × torch's same-dtype error + floor — over testing.CONV_CASES; the fused epilogues
(bias, residual, option-A shortcut, ReLU); every output element written (buffers poisoned with NaN); clear errors.
CPU: under TRITON_INTERPRET=1 in float32 and float16. GPU: bfloat16 too, and ResNet-50's shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import testing

from conftest import GPU, requires_gpu

DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])  # interpreter: no bf16 (see DESIGN)


@pytest.fixture
def K(monkeypatch):
    """The kernel module, with every buffer it allocates filled with NaN (integers: -7) first: an unwritten
    element shows."""
    from fused_resnet.kernels import conv

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)

    monkeypatch.setattr(conv, "_alloc", poisoned)
    return conv


def _assert_rule(name, fused, ref64, torch_same, dtype):
    c = testing.check(name, fused, ref64, torch_same, ref64, dtype)
    assert c.ok, c.row()


def _check_fprop_dgrad_wgrad(K, shape, dtype):
    x, w, dy = shape.problem(dtype, DEVICE)
    stride, pad = (shape.stride,) * 2, shape.pad
    y = K.conv_fprop(x, w, stride, pad)
    dx = K.conv_dgrad(dy, w, (shape.h, shape.w), stride, pad)
    dw = K.conv_wgrad(dy, x, (shape.r, shape.s), stride, pad)
    for t, like in ((y, dy), (dx, x), (dw, w)):
        assert t.shape == like.shape and t.dtype == dtype and t.is_contiguous(memory_format=torch.channels_last)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    dx64, dw64 = shape.backward(dy64, x64, w64)
    dx_same, dw_same = shape.backward(dy, x, w)
    _assert_rule("fprop", y, F.conv2d(x64, w64, None, stride, pad), F.conv2d(x, w, None, stride, pad), dtype)
    _assert_rule("dgrad", dx, dx64, dx_same, dtype)
    _assert_rule("wgrad", dw, dw64, dw_same, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", testing.CONV_CASES, ids=str)
def test_fprop_dgrad_wgrad(K, shape, dtype):
    _check_fprop_dgrad_wgrad(K, shape, dtype)


@pytest.mark.parametrize("shape", [testing.CONV_CASES[1], testing.CONV_CASES[3]], ids=str)
def test_nchw_inputs(K, shape):
    """Inputs in NCHW layout give the same numbers (the kernels read a channels_last copy)."""
    x, w, dy = shape.problem(torch.float32, DEVICE, channels_last=False)
    stride, pad = (shape.stride,) * 2, shape.pad
    torch.testing.assert_close(K.conv_fprop(x, w, stride, pad), F.conv2d(x, w, None, stride, pad),
                               rtol=1e-5, atol=1e-5)
    dx, dw = shape.backward(dy, x, w)
    torch.testing.assert_close(K.conv_dgrad(dy, w, (shape.h, shape.w), stride, pad), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.conv_wgrad(dy, x, (shape.r, shape.s), stride, pad), dw, rtol=1e-5, atol=1e-5)


def _epilogue_ref(x, w, bias, res, stride, pad, relu, dtype_out):
    """conv (in x's dtype, rounded like torch) then bias + residual + ReLU in fp32, rounded once."""
    z = F.conv2d(x, w, None, stride, pad).float() + bias.view(1, -1, 1, 1)
    if res is not None:
        z = z + res.float()
    return (torch.relu(z) if relu else z).to(dtype_out)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [testing.CONV_CASES[1], testing.CONV_CASES[4], testing.CONV_CASES[7]], ids=str)
def test_fprop_epilogue_bias_residual_relu(K, shape, dtype, relu):
    x, w, dy = shape.problem(dtype, DEVICE, seed=1)
    stride, pad = (shape.stride,) * 2, shape.pad
    bias = torch.randn(shape.k, device=DEVICE)
    res = torch.randn_like(dy)
    y = K.conv_fprop(x, w, stride, pad, bias=bias, residual=res, relu=relu)
    ref64 = _epilogue_ref(x.double(), w.double(), bias.double(), res.double(), stride, pad, relu, torch.float64)
    _assert_rule("fprop+bias+res+relu", y, ref64, _epilogue_ref(x, w, bias, res, stride, pad, relu, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_in, stride", [((2, 8, 8, 6), 2), ((1, 16, 7, 7), 2), ((2, 16, 5, 5), 1)])
def test_fprop_option_a_shortcut(K, block_in, stride, dtype):
    """The residual is the block input subsampled by the stride with zero channels appended, read in the epilogue."""
    n, c_in, h, w_ = block_in
    k = 2 * c_in if stride == 2 else c_in
    g = torch.Generator().manual_seed(3)
    blk = torch.randn(n, c_in, h, w_, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    p, q = (h - 1) // stride + 1, (w_ - 1) // stride + 1
    a = torch.randn(n, k, p, q, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(k, k, 3, 3, generator=g) / (9 * k) ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(k, device=DEVICE)
    y = K.conv_fprop(a, wt, (1, 1), (1, 1), bias=bias, residual=blk, relu=True, option_a_stride=(stride, stride))
    sc = F.pad(blk[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, k - c_in))
    ref64 = _epilogue_ref(a.double(), wt.double(), bias.double(), sc.double(), (1, 1), (1, 1), True, torch.float64)
    _assert_rule("fprop+optionA", y, ref64, _epilogue_ref(a, wt, bias, sc, (1, 1), (1, 1), True, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [testing.CONV_CASES[i] for i in (0, 1, 3, 7, 9, 10)], ids=str)
def test_fprop_prologue_and_stats_epilogue(K, shape, dtype):
    """Training-mode fusion: relu(x·s + t) applied while loading (zero padding stays zero after the transform),
    and the per-channel mean / biased variance of the stored output from per-tile partials (Chan merge, by
    kernels/bn_finalize.py on the device)."""
    from fused_resnet.kernels.bn_finalize import bn_finalize

    x, w, _ = shape.problem(dtype, DEVICE, seed=2)
    stride, pad = (shape.stride,) * 2, shape.pad
    g = torch.Generator().manual_seed(4)
    s = (torch.rand(shape.c, generator=g) + 0.5).to(DEVICE)
    t = (torch.randn(shape.c, generator=g) * 0.5 + 0.3).to(DEVICE)  # t > 0 somewhere: padding must not become t

    def act(v):
        return torch.relu(v.float() * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))

    y, partials = K.conv_fprop(x, w, stride, pad, in_affine=(s, t), stats=True)
    mean, var, _, _ = bn_finalize(None, None, 0.0, partials=partials)
    twin = K.merge_tile_stats(partials)  # the torch merge the kernel replaces: the same formula
    for got, want in zip((mean, var), twin, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ref64 = F.conv2d(act(x.double()).double(), w.double(), None, stride, pad)
    _assert_rule("fprop+prologue", y, ref64, F.conv2d(act(x).to(dtype), w, None, stride, pad), dtype)
    # torch's CPU var_mean accumulates fp32 input in double, so it is no fp32 yardstick here: the bound adds an
    # fp32 summation allowance of 4·log2(M)·eps (pairwise sums; M values per channel).
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    var32, mean32 = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    allowance = 4 * math.log2(y.numel() // shape.k) * torch.finfo(torch.float32).eps
    for name, got, ref64, same in (("mean", mean, mean64, mean32), ("var", var, var64, var32)):
        c = testing.check(f"stats {name}", got, ref64, same, ref64, torch.float32)
        assert c.err_fused <= c.bound + allowance, c.row()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [testing.CONV_CASES[i] for i in (1, 2, 3, 7, 9, 10)], ids=str)
def test_dgrad_wgrad_training_fusion(K, shape, dtype):
    """The backward fusion options against the same math unfused (each fused result rounds once where the
    unfused sequence rounds at every step, so the comparison is the float64 rule with that sequence as torch):
    dBN apply on the gradient operand (dgrad and wgrad), BN + ReLU on wgrad's input, the previous ReLU mask with
    Σdz / Σdz·x̂ in dgrad's epilogue, the input relu(prev·s + t) written by that epilogue (and a wgrad reading
    it), and a residual added to dx."""
    x, w, dy = shape.problem(dtype, DEVICE, seed=5)
    stride, pad = (shape.stride,) * 2, shape.pad
    g = torch.Generator().manual_seed(6)

    def vec(n, lo, hi):
        return (torch.rand(n, generator=g) * (hi - lo) + lo).to(DEVICE)

    a = torch.randn(dy.shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    alpha, beta, gamma = vec(shape.k, 0.5, 1.5), vec(shape.k, -0.3, 0.3), vec(shape.k, -0.2, 0.2)
    a_mean = vec(shape.k, 1.0, 3.0)  # |mean| above the spread of a: the form β·(a − mean) must not cancel
    s, t = vec(shape.c, 0.5, 1.5), vec(shape.c, -0.3, 0.5)
    mean, rstd = vec(shape.c, -0.2, 0.2), vec(shape.c, 0.8, 1.2)
    prev = x  # the previous unit's pre-BN output (x's shape)
    res = torch.randn(x.shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)

    def chan(v):
        return v.double().view(1, -1, 1, 1)

    def unfused(dy, a, prev, res, w, round_to):
        da = (dy.double() * chan(alpha) + (a.double() - chan(a_mean)) * chan(beta) + chan(gamma)).to(round_to)
        r_in = torch.relu(prev.double() * chan(s) + chan(t)).to(round_to)
        dr, dw = shape.backward(da, r_in, w.to(round_to))
        dr = (dr.double() + res.double()).to(round_to).double()
        dz = dr * (prev.double() * chan(s) + chan(t) > 0)
        xhat = (prev.double() - chan(mean)) * chan(rstd)
        return dz, dw, dz.sum((0, 2, 3)), (dz * xhat).sum((0, 2, 3))

    dz, partials, r_in = K.conv_dgrad(dy, w, (shape.h, shape.w), stride, pad,
                                      dbn=(a, a_mean, alpha, beta, gamma), relu_of=(prev, s, t, mean, rstd),
                                      residual=res, relu_out=True)
    sdz, sdzx = K.sum_tile_partials(partials)
    dw = K.conv_wgrad(dy, x, (shape.r, shape.s), stride, pad, dbn=(a, a_mean, alpha, beta, gamma),
                      in_affine=(s, t))
    dw_of_r = K.conv_wgrad(dy, r_in, (shape.r, shape.s), stride, pad, dbn=(a, a_mean, alpha, beta, gamma))
    ref = unfused(dy, a, prev, res, w, torch.float64)
    same = [v.to(dtype) if i < 2 else v for i, v in enumerate(unfused(dy, a, prev, res, w, dtype))]
    for name, got, r64, r_same in zip(("dz", "dW", "sum dz", "sum dz*xhat"), (dz, dw, sdz, sdzx), ref, same,
                                      strict=True):
        _assert_rule(name, got, r64, r_same, dtype)
    _assert_rule("dW from dgrad's written input", dw_of_r, ref[1], same[1], dtype)
    # The written input is relu(prev·s + t) in fp32 (one fused multiply-add on a GPU, two roundings under the
    # interpreter), rounded to dtype: within those roundings of the exact value (subnormal spacing included).
    prod = prev.double() * chan(s)
    exact = torch.relu(prod + chan(t))
    f32, fd = torch.finfo(torch.float32), torch.finfo(dtype)
    tol = f32.eps * (prod.abs() + (prod + chan(t)).abs()) + fd.eps * exact + fd.tiny * fd.eps
    assert ((r_in.double() - exact).abs() <= tol).all()
    assert r_in.is_contiguous(memory_format=torch.channels_last)


# (N, C, H, W, K, R, stride, padding, dilation, groups): ResNeXt's grouped 3x3 (with its stride-2 form), a
# depth-wise one, DeepLab's dilated 3x3s (stride 1, dilation 2 and 4), and both at once with stride and dilation
# above 1 on one axis (dgrad's every-tap loop; no ResNet has it); the stem's small-C row layout dilated.
GEOMETRIES = [(2, 8, 7, 6, 8, 3, 1, 1, 1, 2), (2, 8, 9, 8, 16, 3, 2, 1, 1, 4), (2, 8, 7, 6, 8, 3, 1, 1, 1, 8),
              (2, 8, 7, 6, 8, 3, 1, 2, 2, 1), (1, 8, 9, 9, 8, 3, 1, 4, 4, 1), (2, 8, 9, 8, 8, 3, 2, 2, 2, 2),
              (2, 3, 9, 8, 8, 3, 1, 2, 2, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "n{}c{}h{}w{}k{}r{}s{}p{}d{}g{}".format(*g))
def test_grouped_and_dilated_convs(K, geometry, dtype):
    """fprop (with the training prologue, statistics epilogue, bias, residual and ReLU), dgrad (with the dBN
    operand, the previous ReLU mask and its sums, the written input, a residual) and wgrad (dBN operand) of
    grouped and dilated convs against torch in float64, by the float64 rule; every output element written."""
    n, c, h, wd, k, r, st, pad, dil, groups = geometry
    g = torch.Generator().manual_seed(7)

    def rnd(*shape, lo=None, hi=None):
        v = torch.randn(*shape, generator=g) if lo is None else torch.rand(*shape, generator=g) * (hi - lo) + lo
        return v.to(DEVICE)

    x = rnd(n, c, h, wd).to(dtype).contiguous(memory_format=torch.channels_last)
    w = rnd(k, c // groups, r, r).to(dtype)
    stride, padding, dilation = (st, st), (pad, pad), (dil, dil)
    s_in, t_in = rnd(c, lo=0.5, hi=1.5), rnd(c, lo=-0.3, hi=0.5)
    bias = rnd(k)

    def chan(v, dt):
        return v.to(dt).view(1, -1, 1, 1)

    def fprop(dt):
        xin = torch.relu(x.to(dt) * chan(s_in, dt) + chan(t_in, dt)).to(dtype if dt != torch.float64 else dt)
        return F.conv2d(xin, w.to(xin.dtype), None, stride, padding, dilation, groups)

    y_plain = fprop(torch.float64)
    res = rnd(*y_plain.shape).to(dtype)
    y, partials = K.conv_fprop(x, w, stride, padding, in_affine=(s_in, t_in), stats=True, dilation=dilation,
                               groups=groups)
    _assert_rule("fprop", y, y_plain, fprop(torch.float32).to(dtype), dtype)
    mean, var = K.merge_tile_stats(partials)
    y64 = y.double()
    torch.testing.assert_close(mean.double(), y64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), y64.var((0, 2, 3), correction=0), rtol=1e-4, atol=1e-5)
    y_epi = K.conv_fprop(x, w, stride, padding, bias=bias, residual=res, relu=True, dilation=dilation,
                         groups=groups)
    want = F.conv2d(x.double(), w.double(), bias.double(), stride, padding, dilation, groups)
    same = F.conv2d(x, w, None, stride, padding, dilation, groups).float() + chan(bias, torch.float32)
    _assert_rule("fprop epilogue", y_epi, (want + res.double()).relu(), (same + res.float()).relu().to(dtype),
                 dtype)

    dy = rnd(*y_plain.shape).to(dtype)
    a = rnd(*y_plain.shape).to(dtype)
    alpha, beta, gamma, a_mean = (rnd(k, lo=0.5, hi=1.5), rnd(k, lo=-0.3, hi=0.3), rnd(k, lo=-0.2, hi=0.2),
                                  rnd(k, lo=1.0, hi=3.0))
    prev, s, t = x, rnd(c, lo=0.5, hi=1.5), rnd(c, lo=-0.3, hi=0.5)
    pmean, prstd = rnd(c, lo=-0.2, hi=0.2), rnd(c, lo=0.8, hi=1.2)
    dres = rnd(n, c, h, wd).to(dtype)

    def unfused(round_to):
        da = (dy.double() * chan(alpha, torch.float64) + (a.double() - chan(a_mean, torch.float64))
              * chan(beta, torch.float64) + chan(gamma, torch.float64)).to(round_to)
        dr, dw, _ = torch.ops.aten.convolution_backward(
            da, x.to(round_to), w.to(round_to), None, list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [True, True, False])
        dr = (dr.double() + dres.double()).to(round_to).double()
        dz = dr * (prev.double() * chan(s, torch.float64) + chan(t, torch.float64) > 0)
        xhat = (prev.double() - chan(pmean, torch.float64)) * chan(prstd, torch.float64)
        return dz, dw, dz.sum((0, 2, 3)), (dz * xhat).sum((0, 2, 3))

    dbn = (a, a_mean, alpha, beta, gamma)
    dz, sums, r_in = K.conv_dgrad(dy, w, (h, wd), stride, padding, dbn=dbn, relu_of=(prev, s, t, pmean, prstd),
                                  residual=dres, relu_out=True, dilation=dilation, groups=groups)
    dw = K.conv_wgrad(dy, x, (r, r), stride, padding, dbn=dbn, dilation=dilation, groups=groups)
    assert dw.shape == w.shape and dz.shape == x.shape
    ref, same = unfused(torch.float64), unfused(dtype)
    for name, got, r64, r_same in zip(("dz", "dW", "sum dz", "sum dz*xhat"), (dz, dw, *K.sum_tile_partials(sums)),
                                      ref, same, strict=True):
        _assert_rule(name, got, r64, r_same.to(dtype) if name in ("dz", "dW") else r_same, dtype)
    exact = torch.relu(prev.double() * chan(s, torch.float64) + chan(t, torch.float64))
    torch.testing.assert_close(r_in.double(), exact, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def _workspace(split, c, cp, dtype, seed):
    from fused_resnet.kernels import conv

    ws = torch.randn(split, 6, 3, 2, cp, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return conv.WgradWorkspace(ws, c, dtype)


def _check_dw(dw, work):
    from fused_resnet.kernels import conv

    k, r, s = work.ws.shape[1:4]
    assert dw.shape == (k, work.c, r, s) and dw.dtype == work.dtype
    assert dw.is_contiguous(memory_format=torch.channels_last)
    twin = conv.wgrad_reduce_reference(work)
    ref64 = work.ws.double().sum(0)[..., :work.c].permute(0, 3, 1, 2)
    _assert_rule("dW", dw, ref64, twin, work.dtype)
    # the same fp32 additions, perhaps in another order (torch's reduction picks its own), then one rounding
    eps = torch.finfo(work.dtype).eps
    torch.testing.assert_close(dw, twin, rtol=2 * eps, atol=2 * eps * twin.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split,c,cp", [(3, 24, 24), (1, 3, 8), (5, 3, 4)], ids=str)
def test_wgrad_reduce_sums_slices_and_casts_the_workspace(K, split, c, cp, dtype):
    """The wgrad workspace's split partials summed in fp32, the padded channels dropped and the result cast, in
    one launch (its output poisoned first), against the twin (sum, slice, cast) and float64. No dot product:
    bf16 runs under the interpreter too."""
    work = _workspace(split, c, cp, dtype, split * c)
    assert work.direct() is None or (split == 1 and c == cp and dtype == torch.float32)
    _check_dw(K.wgrad_reduce(work), work)


def test_dgrad_option_a_shortcut_gradient(K):
    """dx += the option-A shortcut's gradient: dz[:, :C_in] scattered back to the subsampled positions."""
    shape = testing.ConvShape(2, 8, 7, 6, 8, 3, 3, 1, (1, 1))
    x, w, dy = shape.problem(torch.float32, DEVICE, seed=7)
    dz_out = torch.randn(2, 16, 4, 3).contiguous(memory_format=torch.channels_last).to(DEVICE)
    dx = K.conv_dgrad(dy, w, (7, 6), (1, 1), (1, 1), residual=dz_out, option_a_stride=(2, 2))
    expected = shape.backward(dy, x, w)[0]
    expected[:, :, ::2, ::2] += dz_out[:, :8]
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors(K):
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    w = torch.randn(16, 8, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="one dtype"):
        K.conv_fprop(x, w.half())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.conv_fprop(x.double(), w.double())
    with pytest.raises(ValueError, match="expects 4 input channels"):
        K.conv_fprop(x, w[:, :4])
    with pytest.raises(ValueError, match="residual of shape"):
        K.conv_fprop(x, w, (1, 1), (1, 1), residual=torch.randn(2, 16, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="output size would be"):
        K.conv_fprop(x[:, :, :2, :2], w)
    with pytest.raises(ValueError, match="does not match"):
        K.conv_dgrad(torch.randn(2, 16, 4, 4, device=DEVICE), w, (6, 6), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="float32 of shape"):
        K.conv_fprop(x, w, bias=torch.randn(16, device=DEVICE).half())


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", testing.conv_shapes("resnet50", batch=8), ids=str)
def test_resnet50_shapes_gpu(K, shape, dtype):
    _check_fprop_dgrad_wgrad(K, shape, dtype)


@requires_gpu
def test_new_batch_size_does_not_recompile(K):
    """Batch and spatial sizes are not specialised on: the compiled-kernel cache does not grow with them."""
    kernel = K.conv_fprop_kernel
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version does not expose JITFunction.device_caches")
    shape = testing.ConvShape(8, 64, 14, 14, 64, 3, 3, 1, (1, 1))
    x, w, _ = shape.problem(torch.bfloat16, DEVICE)
    K.conv_fprop(x, w, (1, 1), (1, 1))
    count = sum(len(c[0]) for c in caches.values())
    for n in (1, 3, 17, 64):
        K.conv_fprop(x[:1].expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last), w, (1, 1), (1, 1))
    assert sum(len(c[0]) for c in caches.values()) == count


def test_heuristic_order_fits_the_problem_and_tries_the_256_wide_tile_last(K):
    """FUSED_RESNET_AUTOTUNE=heuristic tries first the largest tile the GEMM fills, the 256-wide one last (the first
    to spill on sm_90); a wgrad with 64 output channels takes a 64-row tile."""
    first = lambda tiles, mnk: K.heuristic_order(tiles, mnk)[0]  # noqa: E731
    assert first(K._GEMM_TILES, (256 * 56 * 56, 64, 576)) == (128, 64, 64, 8, 4)
    assert first(K._GEMM_TILES, (256 * 14 * 14, 1024, 256)) == (128, 128, 64, 8, 3)
    assert first(K._GEMM_TILES, (32, 16, 8)) == (128, 64, 64, 8, 4)  # smaller than every tile
    assert first(K._WGRAD_TILES, (64, 576, 4096)) == (64, 128, 64, 4, 4)
    assert first(K._WGRAD_TILES, (64, 48, 4096)) == (64, 64, 128, 4, 3)
    for tiles in (K._GEMM_TILES, K._WGRAD_TILES):
        for mnk in [(1, 1, 1), (10**6, 4096, 64), (64, 64, 64), (100, 3000, 7)]:
            order = K.heuristic_order(tiles, mnk)
            assert sorted(order) == sorted(tiles) and order[0][1] <= 128
            assert [t[1] > 128 for t in order] == sorted(t[1] > 128 for t in order)  # wide ones last


def _launches(K, monkeypatch, *calls):
    """(kernel, kwargs) of every conv kernel launch the calls make (launched as usual)."""
    seen = []
    real = K._launch

    def spy(kernel, grid, kwargs, gemm_mnk, caps, **traffic):
        seen.append((kernel, dict(kwargs)))
        return real(kernel, grid, kwargs, gemm_mnk, caps, **traffic)

    monkeypatch.setattr(K, "_launch", spy)
    for call in calls:
        call()
    return seen


def _two_fprops(K):
    shape = testing.ConvShape(2, 16, 6, 6, 16, 3, 3, 1, (1, 1))
    x, w, _ = shape.problem(torch.float32, DEVICE)
    ones = torch.ones(16, device=DEVICE)
    return (lambda: K.conv_fprop(x, w, (1, 1), (1, 1)),
            lambda: K.conv_fprop(x, w, (1, 1), (1, 1), in_affine=(ones, ones), stats=True))


def test_tuning_key_holds_every_feature(K, monkeypatch):
    """Two variants of one conv shape (plain; BN + ReLU on load with the statistics epilogue) are tuned apart."""
    for kernel in K._TILES:
        features = set(K.constexpr_args(kernel)) - set(K._TILE_ARGS)
        assert {"R", "S", "UPCAST"} <= features and features <= set(K.tuning_key_args(kernel)), kernel.__name__
    (k1, a1), (k2, a2) = _launches(K, monkeypatch, *_two_fprops(K))
    assert k1 is k2 is K.conv_fprop_kernel
    tuned = K._TUNED[k1]
    assert K.tuning_key(tuned, a1) != K.tuning_key(tuned, a2)


def test_tuning_key_is_the_autotuners(K, monkeypatch):
    """``tuning_key`` (used to tell, inside a CUDA graph capture, whether a variant is tuned) computes the key that
    Triton's Autotuner caches its choice under: run the Autotuner with its benchmark and launch stubbed."""
    (kernel, kwargs), _ = _launches(K, monkeypatch, *_two_fprops(K))
    tuned = K._TUNED[kernel]
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned, "cache_results", False)
    monkeypatch.setattr(tuned, "_bench", lambda *a, config, **kw: [float(config.kwargs["BLOCK_M"])] * 3)
    monkeypatch.setattr(tuned.fn, "run", lambda *a, **kw: None)
    with K.spill_probe(_Spills({})):  # the prune hook's measurement: nothing compiles under the interpreter
        tuned.run(grid=(1,), warmup=False, **kwargs)
    assert list(tuned.cache) == [K.tuning_key(tuned, kwargs)]


def test_tuning_key_holds_every_specialised_integer(K):
    """The autotuning key holds every integer argument Triton specialises on (a value of 1 becomes a constant, a
    multiple of 16 is marked divisible: both change the compiled kernel and its registers), so the spill check
    made for one key holds for every launch under it; batch and spatial sizes are not in it."""
    for kernel in K._TILES:
        params = K.inspect.signature(kernel.fn).parameters
        ints = {n for n in params if not n.endswith("_ptr") and n not in K.constexpr_args(kernel)}
        key = set(K.tuning_key_args(kernel))
        assert ints - key == set(K._NOT_SPECIALISED[kernel]), kernel.__name__
        assert {"C", "K", "stride_h", "stride_w", "pad_h", "pad_w"} <= key and not set(K._SIZE_ARGS) & key


def _residual_fprop(K, n=1, pad=(1, 1)):
    """A 3x3 fprop with bias, residual and ReLU epilogue (float32, 64 GEMM rows at n = 1) and its float64 twin."""
    shape = testing.ConvShape(n, 16, 8, 8, 16, 3, 3, 1, pad)
    x, w, _ = shape.problem(torch.float32, DEVICE)
    res = torch.randn(n, 16, *shape.out_hw, device=DEVICE)
    bias = torch.randn(16, device=DEVICE)

    def run():
        return K.conv_fprop(x, w, (1, 1), pad, bias=bias, residual=res, relu=True)

    def want():
        return F.conv2d(x.double(), w.double(), bias.double(), 1, pad).add(res.double()).relu()
    return run, want


class _Spills:
    """An injected spill measurement (kernels.conv.spill_probe): ``table`` maps a tile to the bytes its compiled
    kernel spills (0 if absent); every call is recorded."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, kernel, kwargs, tile):
        self.calls.append((kernel, tile))
        return self.table.get(tile, 0)


def _launched_tiles(K, monkeypatch, kernel):
    """The (BLOCK_M, BLOCK_N, BLOCK_K) of every launch of ``kernel`` that runs (interpreted)."""
    seen = []
    real = kernel.run

    def run(*args, **kwargs):
        seen.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    return seen


def test_spilling_configurations_are_never_benchmarked_or_chosen(K, monkeypatch):
    """Triton's Autotuner, running the prune hook, with the spill of each compiled configuration injected (the
    interpreter compiles nothing): the spilling ones are never benchmarked though they would time fastest, the
    fastest clean one is launched, and the conv is right."""
    kernel = K.conv_fprop_kernel
    tuned = K._TUNED[kernel]
    wide, square = (128, 256, 64, 8, 3), (128, 128, 64, 8, 3)
    spills = _Spills({wide: 216, square: 40})
    timings = {wide: 1.0, square: 2.0, (128, 64, 64, 8, 4): 4.0, (64, 128, 64, 4, 4): 3.0}
    benched = []

    def bench(*args, config, **kwargs):
        benched.append(K._config_tile(config))
        return [timings[K._config_tile(config)]] * 3

    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned, "cache_results", False)
    monkeypatch.setattr(tuned, "_bench", bench)
    monkeypatch.setattr(K, "_launch",
                        lambda kernel, grid, kwargs, mnk, caps, **_: K._launch_tuned(kernel, grid, kwargs, mnk))
    launched = _launched_tiles(K, monkeypatch, kernel)
    run, want = _residual_fprop(K)
    with K.spill_probe(spills):
        y = run()
    assert sorted(benched) == [(64, 128, 64, 4, 4), (128, 64, 64, 8, 4)]
    assert launched == [(64, 128, 64)]
    assert sorted(t for _, t in spills.calls) == sorted(K._GEMM_TILES)  # each compiled once, before benchmarking
    torch.testing.assert_close(y.double(), want(), rtol=1e-4, atol=1e-4)


def test_heuristic_mode_launches_the_first_tile_that_does_not_spill(K, monkeypatch):
    """FUSED_RESNET_AUTOTUNE=heuristic: the heuristic's first choice spills (injected), so the next one in its
    order runs; only those two are compiled, once per tuning key (a new batch size measures nothing again, a new
    padding does)."""
    kernel = K.conv_fprop_kernel
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "heuristic")
    monkeypatch.setattr(K, "_launch",
                        lambda kernel, grid, kwargs, mnk, caps, **_: K._launch_tuned(kernel, grid, kwargs, mnk))
    launched = _launched_tiles(K, monkeypatch, kernel)
    first, second = K.heuristic_order(K._GEMM_TILES, (64, 16, 144))[:2]
    spills = _Spills({first: 8})
    with K.spill_probe(spills):
        run, want = _residual_fprop(K)
        torch.testing.assert_close(run().double(), want(), rtol=1e-4, atol=1e-4)
        assert [t for _, t in spills.calls] == [first, second] and launched == [second[:3]]
        _residual_fprop(K, n=2)[0]()
        assert len(spills.calls) == 2 and launched[-1] == second[:3]
        _residual_fprop(K, pad=(0, 0))[0]()
        assert [t for _, t in spills.calls[2:]] == [first, second] and launched[-1] == second[:3]


def _recorded_kwargs(K, call):
    """The keyword arguments of the one conv-kernel launch ``call`` makes (nothing runs)."""
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_launch", lambda kernel, grid, kwargs, mnk, caps, **_: seen.append(kwargs))
        call()
    return seen[0]


def test_selectable_tiles_when_every_tile_spills_or_none_compiles(K):
    """A launch needs a configuration: if every one spills, the one spilling least; if none compiles for this GPU
    (out of shared memory, ptxas refused: as Triton's autotuner treats them), all of them, for Triton to report."""
    from triton.runtime.errors import OutOfResources

    kernel = K.conv_fprop_kernel
    kwargs = _recorded_kwargs(K, _residual_fprop(K)[0])
    with K.spill_probe(_Spills({t: 100 - t[1] // 4 for t in K._GEMM_TILES})):
        assert K.selectable_tiles(kernel, kwargs) == [(128, 256, 64, 8, 3)]
        assert K.heuristic_tile(kernel, kwargs, (64, 16, 144)) == (128, 256, 64, 8, 3)

    def out_of_memory(kernel, kwargs, tile):
        raise OutOfResources(300000, 232448, "shared memory")

    with K.spill_probe(out_of_memory):
        assert K.selectable_tiles(kernel, kwargs) == K._GEMM_TILES
    with K.spill_probe(_Spills({})):
        assert K.selectable_tiles(kernel, kwargs) == K._GEMM_TILES


@requires_gpu
def test_autotuning_on_the_gpu_never_benchmarks_a_configuration_that_spills(K, monkeypatch):
    """On the GPU the prune hook measures each tile from the loaded kernel (n_spills): every tile of a dgrad with
    every epilogue is measured once, the benchmarked and the chosen ones spill nothing, and on an sm_90 GPU the
    measurement agrees with the stack frame of the sm_90 cubin (what bench/aot_check.py reads without a GPU)."""
    from fused_resnet.kernels import aot

    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "full")
    kernel = K.conv_dgrad_kernel
    tuned = K._TUNED[kernel]
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned, "cache_results", False)
    monkeypatch.setattr(tuned, "configs_timings", {}, raising=False)
    monkeypatch.setattr(K, "_spills", {})
    shape = testing.ConvShape(8, 64, 14, 14, 64, 3, 3, 1, (1, 1))
    x, w, dy = shape.problem(torch.bfloat16, DEVICE)
    vec = [torch.rand(64, device=DEVICE) + 0.5 for _ in range(7)]
    seen = _launches(K, monkeypatch, lambda: K.conv_dgrad(dy, w, (14, 14), (1, 1), (1, 1), dbn=(dy, *vec[:4]),
                                                           relu_of=(x, *vec[4:], vec[0]), relu_out=True))
    kwargs = seen[0][1]
    key = K.tuning_key(tuned, kwargs)
    spills = {t: K._spills[(kernel, key, t)] for t in K._GEMM_TILES}
    assert all(b is not None for b in spills.values()), spills
    assert spills[K._config_tile(tuned.cache[key])] == 0, spills
    assert all(spills[K._config_tile(c)] == 0 for c in tuned.configs_timings), spills
    if torch.cuda.get_device_capability() == (9, 0):
        cubin = aot.spill_probe(90)
        assert {t: cubin(kernel, kwargs, t) > 0 for t in K._GEMM_TILES} == {t: b > 0 for t, b in spills.items()}


def test_channel_counts_share_one_compiled_variant(K, monkeypatch):
    """Channel counts are runtime arguments: convs with 16 and 32 input channels launch the same constexprs (one
    compiled variant), while the stem's row layout carries its padded channel count."""
    def conv(c, stem=False):
        shape = testing.ConvShape(2, c, 6, 6, 16, 3, 3, 1, (1, 1))
        x, w, dy = shape.problem(torch.float32, DEVICE)
        return lambda: (K.conv_fprop(x, w, (1, 1), (1, 1)), K.conv_wgrad(dy, x, (3, 3), (1, 1), (1, 1)))

    launches = _launches(K, monkeypatch, conv(16), conv(32), conv(3))
    consts = [(k.__name__, {n: kw[n] for n in K.constexpr_args(k) if n in kw}) for k, kw in launches]
    fprop16, wgrad16, fprop32, wgrad32, fprop3, wgrad3 = consts
    assert fprop16 == fprop32 and wgrad16 == wgrad32
    assert fprop3[1]["ROW"] and fprop3[1]["CP"] == 4 and wgrad3[1]["FLAT"] and wgrad3[1]["CP"] == 4  # float32


def _pooled_conv(x, w, k, stride=1, pad=0):
    return F.conv2d(F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False), w, None, stride, pad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw,c,k", [((7, 9), 32, 2), ((8, 8), 16, 2), ((5, 7), 16, 3), ((6, 6), 4, 2)], ids=str)
def test_avg_pool_on_load_and_on_store(K, hw, c, k, dtype):
    """timm's "-d" shortcut, AvgPool2d(k, k, ceil_mode=True, count_include_pad=False) → 1x1 conv: fprop and wgrad
    pool their input while loading it, dgrad spreads the gradient over the pool's windows in its epilogue (odd
    sizes: the windows the edge cuts divide by what they hold; every element of dx written). Four input channels:
    the small-C layouts take torch's pool first. The float64 rule against torch's pool + conv and autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, *hw, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(24, c, 1, 1, generator=g) / math.sqrt(c)).to(DEVICE, dtype)
    y64 = _pooled_conv(x.double(), w.double(), k)
    dy = torch.randn(y64.shape, generator=g).to(DEVICE, dtype)
    y = K.conv_fprop(x, w, avg_pool=k)
    dx = K.conv_dgrad(dy, w, hw, avg_pool=k)
    dw = K.conv_wgrad(dy, x, (1, 1), avg_pool=k)
    assert dx.shape == x.shape and dw.shape == w.shape and y.shape == y64.shape

    def grads(x_, w_, dy_):
        x_, w_ = x_.detach().requires_grad_(), w_.detach().requires_grad_()
        _pooled_conv(x_, w_, k).backward(dy_)
        return x_.grad, w_.grad

    dx64, dw64 = grads(x.double(), w.double(), dy.double())
    dx_same, dw_same = grads(x, w, dy)
    _assert_rule("fprop", y, y64, _pooled_conv(x, w, k), dtype)
    _assert_rule("dgrad", dx, dx64, dx_same, dtype)
    _assert_rule("wgrad", dw, dw64, dw_same, dtype)


def test_avg_pool_refuses_what_it_cannot_pool(K):
    x, w = torch.randn(1, 16, 4, 4), torch.randn(8, 16, 1, 1)
    with pytest.raises(ValueError, match="avg_pool"):
        K.conv_fprop(x, w, in_affine=(torch.ones(16), torch.zeros(16)), avg_pool=2)
    with pytest.raises(ValueError, match="avg_pool spreads"):
        K.conv_dgrad(torch.randn(1, 8, 2, 2), w, (4, 4), residual=torch.randn(1, 16, 4, 4), avg_pool=2)
