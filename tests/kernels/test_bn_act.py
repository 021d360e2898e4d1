"""bn_act kernels (Triton: kernels/bn_act.py; CUDA: csrc/bn_act.cu) against fused_resnet.reference.bn_act, with
the float64 rule: error ≤ 2 × (torch's same-dtype eager error) + floor. Outputs are poisoned first."""
import pytest
import torch

from fused_resnet import testing
from fused_resnet.backends import extension, reference

from conftest import GPU, requires_gpu

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])  # interpreter: no bf16 (see DESIGN)
SHAPES = [(2, 40, 5, 7), (3, 24, 9, 9), (1, 3, 2, 5), (4, 64, 8, 8), (2, 13, 3, 3)]  # C not a multiple of 8 too


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    r = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    s = (torch.rand(shape[1], generator=g) + 0.5).to(device)
    t = torch.randn(shape[1], generator=g).to(device)
    return a, s, t, r


def _eager(a, s, t, r, relu):
    """What eager PyTorch computes in a's dtype: BN output rounded, then add, then ReLU."""
    z = (a.float() * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)).to(a.dtype)
    if r is not None:
        z = z + r
    return torch.relu(z) if relu else z


def _check_kernel(fn, shape, dtype, device, with_res, relu, seed=0):
    a, s, t, r = _inputs(shape, dtype, device, seed)
    r = r if with_res else None
    y = fn(a, s, t, r, relu)
    assert y.shape == a.shape and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ref64 = reference.bn_act(a.double(), s.double(), t.double(), None if r is None else r.double(), relu)
    c = testing.check("bn_act", y, ref64, _eager(a, s, t, r, relu), ref64, dtype)
    assert c.ok, c.row()


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_res", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_bn_act(shape, dtype, with_res, relu):
    from fused_resnet.kernels import bn_act as k

    device = "cuda" if GPU else "cpu"
    _check_kernel(lambda a, s, t, r, relu: k.bn_act(a, s, t, r, relu), shape, dtype, device, with_res, relu)


def test_triton_bn_act_writes_every_element_and_rejects_bad_layout():
    from fused_resnet.kernels import bn_act as k

    device = "cuda" if GPU else "cpu"
    a, s, t, _ = _inputs((2, 40, 5, 7), torch.float32, device, 1)
    out = torch.full_like(a, float("nan"))  # poisoned: an unwritten element stays NaN
    y = k.bn_act(a, s, t, None, relu=False, out=out)
    assert y is out and not torch.isnan(y).any()
    torch.testing.assert_close(y, reference.bn_act(a, s, t, None, relu=False), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="channels_last"):
        k.bn_act(a.contiguous(), s, t)
    with pytest.raises(ValueError, match="float32 tensor of shape"):
        k.bn_act(a, s.double(), t)


@requires_gpu
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_res", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(8, 256, 56, 56)], ids=str)
def test_cuda_bn_act(shape, dtype, with_res, relu):
    assert extension.load(jit=True) is not None, extension.status()["reason"]

    _check_kernel(torch.ops.fused_resnet_C.bn_act, shape, dtype, "cuda", with_res, relu)


@requires_gpu
def test_cuda_bn_act_poisoned_output_fully_written():
    assert extension.load(jit=True) is not None, extension.status()["reason"]
    a, s, t, r = _inputs((3, 24, 9, 9), torch.float16, "cuda", 2)
    poison = torch.full_like(a, float("nan"))  # freed, then handed back by the caching allocator as the output
    del poison
    y = torch.ops.fused_resnet_C.bn_act(a, s, t, r, True)
    assert not torch.isnan(y).any()


@requires_gpu
def test_cuda_bn_act_bad_arguments_raise():
    assert extension.load(jit=True) is not None, extension.status()["reason"]
    a, s, t, _ = _inputs((3, 24, 9, 9), torch.float16, "cuda", 2)
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.fused_resnet_C.bn_act(a.contiguous(), s, t, None, True)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fused_resnet_C.bn_act(a, s.half(), t, None, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fused_resnet_C.bn_act(a.int(), s, t, None, True)


def test_extension_status_is_reported():
    """Where the extension was built (CI builds it), it loads and registers its ops, and its argument checks raise
    from inside the extension; elsewhere status says why it is missing."""
    status = extension.status()
    if status["loaded"]:
        for op in ("bn_act", "bn_stats", "drelu_dbn_reduce", "dbn_apply", "block_forward", "block_backward"):
            assert f"fused_resnet_C::{op}" in status["ops"]
        with pytest.raises(RuntimeError, match="channels_last"):
            torch.ops.fused_resnet_C.bn_act(torch.randn(2, 8, 3, 3), torch.ones(8), torch.ones(8), None, True)
    else:
        assert status["reason"]
