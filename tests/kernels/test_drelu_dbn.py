"""drelu_dbn_reduce (Triton: kernels/drelu_dbn.py) against fused_resnet.backends.reference.drelu_dbn_reduce with
the float64 rule: dz = dy·[y > 0] exact, Σdz and Σdz·x̂ (its per-tile partials summed) within 2 × torch's
same-dtype error + floor. (The extension's twin, csrc/dbn.cu, is tested in tests/backends/test_cuda.py.)"""
import pytest
import torch

from fused_resnet import testing
from fused_resnet.backends import reference

from conftest import GPU

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
SHAPES = [(2, 40, 5, 7), (3, 24, 9, 9), (1, 3, 2, 5), (2, 13, 33, 35)]  # odd C; more rows than one tile
DEVICE = "cuda" if GPU else "cpu"


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def act(scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g) * scale + shift).to(DEVICE, dtype).contiguous(
            memory_format=torch.channels_last)

    dy, y, a = act(), act(), act(3.0, 5.0)  # |mean| > std for a: x̂ must not cancel
    mean = a.float().mean((0, 2, 3))
    var = a.float().var((0, 2, 3), correction=0)
    return dy, y, a, mean.contiguous(), var.contiguous()


EPS = 1e-5


def _check_sums(partials, dz, a, mean, var, eps, channels):
    from fused_resnet.kernels.conv import sum_tile_partials

    sum_dz, sum_dz_xhat = sum_tile_partials(partials)
    ref = reference.drelu_dbn_reduce(dz.double(), a.double(), mean.double(), torch.rsqrt(var.double() + eps))
    same = reference.drelu_dbn_reduce(dz.float(), a, mean, torch.rsqrt(var + eps))  # torch's own fp32 sums
    for name, got, want, torch_same in zip(("Σdz", "Σdz·x̂"), (sum_dz, sum_dz_xhat), ref, same, strict=True):
        assert got.dtype == torch.float32 and got.shape == (channels,)
        c = testing.check(name, got, want, torch_same, want, torch.float32)
        assert c.ok, c.row()


@pytest.mark.parametrize("masked", [True, False], ids=["mask-from-y", "dz-given"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_drelu_dbn_reduce(shape, dtype, masked):
    from fused_resnet.kernels.drelu_dbn import drelu_dbn_reduce

    dy, y, a, mean, var = _inputs(shape, dtype)
    dz, partials = drelu_dbn_reduce(dy, a, mean, var, EPS, y=y if masked else None)
    want_dz = torch.where(y > 0, dy, torch.zeros_like(dy)) if masked else dy
    assert torch.equal(dz, want_dz) and dz.is_contiguous(memory_format=torch.channels_last)
    _check_sums(partials, want_dz, a, mean, var, EPS, shape[1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_drelu_dbn_reduce_second_bn_of_the_same_dz(shape):
    """A projection shortcut's BN, fed the same dz: its sums from the same pass, with its own statistics and eps."""
    from fused_resnet.kernels.drelu_dbn import drelu_dbn_reduce

    dy, y, a, mean, var = _inputs(shape, torch.float32)
    _, _, a2, mean2, var2 = _inputs(shape, torch.float32, seed=1)
    dz, first, second = drelu_dbn_reduce(dy, a, mean, var, EPS, y=y, second=(a2, mean2, var2, 1e-3))
    want_dz = torch.where(y > 0, dy, torch.zeros_like(dy))
    assert torch.equal(dz, want_dz)
    _check_sums(first, want_dz, a, mean, var, EPS, shape[1])
    _check_sums(second, want_dz, a2, mean2, var2, 1e-3, shape[1])
    alone = drelu_dbn_reduce(dz, a2, mean2, var2, 1e-3)[1]  # what a launch of its own computes, bit for bit
    assert torch.equal(second.first, alone.first) and torch.equal(second.second, alone.second)


def test_triton_drelu_dbn_reduce_rejects_bad_arguments():
    from fused_resnet.kernels.drelu_dbn import drelu_dbn_reduce

    dy, y, a, mean, var = _inputs((2, 8, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="gradient's shape"):
        drelu_dbn_reduce(dy, a[:1], mean, var, EPS)
    with pytest.raises(ValueError, match="channels_last"):
        drelu_dbn_reduce(dy.contiguous(), a, mean, var, EPS)
    with pytest.raises(ValueError, match="float32 per-channel vectors"):
        drelu_dbn_reduce(dy, a, mean.double(), var, EPS)
